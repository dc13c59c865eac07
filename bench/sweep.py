"""An N-SAE sweep in one run vs N separate runs, on the embedded model: wall time of each.

Both sides run `bridge.run.run` (what `jsae train` runs) on configs/default.yaml with the same
overrides; the sweep run varies lr and seed over N members, the separate runs train each member
on its own (model load, data pipeline and compilation included every time, as N separate
`jsae train` commands would pay them; evals off on both sides so only training is compared).
One-off process costs (imports, JAX's backend) are paid before either side is timed.

    python bench/sweep.py                 # N = 8, 409,600 tokens per SAE
    python bench/sweep.py --n 8 --tokens 819200 --write   # also append the result to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import machine, machine_label  # noqa: E402  (bench/bench.py, this folder is on sys.path)


def overrides(out: Path, tokens: int) -> dict:
    return {"total_training_tokens": tokens, "checkpoint_path": None, "progress_bar": False, "n_eval_batches": 0,
            "output_path": str(out), "log_every_n_steps": 50, "lr_decay_steps": min(100, tokens // 4096 // 4)}


def process_once() -> None:
    """What a process pays once, whichever side runs first: imports (TransformerLens, which
    bridge.model imports on the first model load), JAX's backend and jsae's CPU kernels.

    Paid before timing either side, so neither the sweep (timed first) nor the separate runs carry
    it; N separate `jsae train` commands would each pay it again.
    """
    import jax
    import transformer_lens  # noqa: F401

    from jsae.backends.cpu import kernels

    jax.block_until_ready(jax.numpy.zeros(1))
    kernels.available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="SAEs in the sweep (default 8)")
    parser.add_argument("--tokens", type=int, default=409_600, help="training tokens per SAE")
    parser.add_argument("--write", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    from bridge.run import run
    from bridge.run_config import DEFAULT_CONFIG, RunConfig

    process_once()
    lrs = [round(1e-3 * 1.25**i, 6) for i in range(args.n)]
    seeds = list(range(args.n))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sweep_cfg = RunConfig.from_yaml(DEFAULT_CONFIG, overrides(tmp / "sweep", args.tokens)
                                        | {"sweep": {"lr": lrs, "seed": seeds}})
        t0 = time.perf_counter()
        saes, _ = run(sweep_cfg)
        sweep_s = time.perf_counter() - t0
        print(f"sweep of {len(saes)} SAEs in one run: {sweep_s:.1f} s", flush=True)

        separate_s = 0.0
        for i, (lr, seed) in enumerate(zip(lrs, seeds, strict=True)):
            cfg = RunConfig.from_yaml(DEFAULT_CONFIG, overrides(tmp / f"alone{i}", args.tokens) | {"lr": lr, "seed": seed})
            t0 = time.perf_counter()
            run(cfg)
            separate_s += time.perf_counter() - t0
            print(f"  separate run {i + 1}/{args.n}: {separate_s:.1f} s so far", flush=True)

    ratio = separate_s / sweep_s
    info = machine()
    line = (f"| {args.n} | {args.tokens:,} | {sweep_s:.1f} | {separate_s:.1f} | {ratio:.2f}x |")
    print(f"\n{args.n} separate runs: {separate_s:.1f} s; one sweep run: {sweep_s:.1f} s; the sweep is {ratio:.2f}x "
          "faster in wall time")
    if args.write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n### {datetime.date.today()} — sweep vs separate runs ({machine_label(info)}), "
                    f"jax {info['jax']}, torch {info.get('torch', '—')}"
                    + (f"; under GLIBC_TUNABLES={info['GLIBC_TUNABLES']}" if "GLIBC_TUNABLES" in info else "")
                    + "\n\n"
                    "`bench/sweep.py`: configs/default.yaml (embedded model, TopK 128 → 1024, k = 32, 4096 tokens a "
                    "batch), lr and seed swept, evals off; wall time from config to saved folders, model load and "
                    "compilation included on both sides.\n\n"
                    "| SAEs | tokens per SAE | one sweep run (s) | separate runs (s) | speed-up |\n|---|---|---|---|---|\n"
                    f"{line}\n")


if __name__ == "__main__":
    main()
