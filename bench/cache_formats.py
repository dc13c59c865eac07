"""Reading speed of the two activation-cache layouts on the same activations: jsae's (safetensors
shards, bridge/cache.py) and SAELens' (a datasets folder, bridge/saelens_cache.py).

Both caches are written from the same token rows of configs/default.yaml's dataset; the model's
forward is replaced by seeded random activations of the hook's width, so writing is quick and both
folders hold identical arrays (the read cost does not depend on the values). Each cache is then read
twice over, alternating the layouts, best of `--repeats`:
- **chunks**: the stream as the reader produces it (file -> torch tensor per model batch, copied out once
  as the shuffle buffer copies it): the layout's own cost;
- **batches**: the training batches (shuffle buffer included, torch tensors): what training waits on.
Both read from the page cache (the files were just written): the cost of the format, not of the disk.

    python bench/cache_formats.py                       # 262,144 tokens of width 128
    python bench/cache_formats.py --tokens 1048576 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_both(folder: Path, tokens: int, rows: int):
    """(run config, model) after writing <folder>/jsae and <folder>/saelens from the same activations."""
    import torch

    from bridge import activations
    from bridge.cache import write_cache
    from bridge.run import prepare
    from bridge.run_config import DEFAULT_CONFIG, RunConfig
    from bridge.saelens_cache import write_saelens_cache

    cfg = RunConfig.from_yaml(DEFAULT_CONFIG, {"store_batch_size_prompts": rows, "checkpoint_path": None,
                                               "output_path": None, "progress_bar": False})
    model, cfg = prepare(cfg)

    def fake_forward(width: int):
        generator = torch.Generator().manual_seed(0)

        def model_activations(self, tokens):
            self.widths = [width]
            n = tokens[:, self.seqpos].numel()
            return torch.randn((n, width), generator=generator)
        return model_activations

    original = activations.ActivationSource.model_activations
    try:
        for name, writer in (("jsae", write_cache), ("saelens", write_saelens_cache)):
            activations.ActivationSource.model_activations = fake_forward(cfg.train.sae.d_in)
            writer(cfg, model, folder / name, n_tokens=tokens)
    finally:
        activations.ActivationSource.model_activations = original
    return cfg, model


def read_rate(reader, tokens: int, batches: bool) -> float:
    """Tokens per second of `tokens` read from `reader` (its chunk stream, or its training batches)."""
    import torch

    stream = iter(reader) if batches else reader.chunks()
    start, seen, landing = time.perf_counter(), 0, None
    for item in stream:
        if not batches:  # a chunk may be a view of a memory map: copy it out, as the shuffle buffer does
            if landing is None or landing.shape != item.shape:
                landing = torch.empty_like(item)
            landing.copy_(item)
        seen += item.shape[0]
        if seen >= tokens:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=262_144, help="tokens per cache (default 262,144)")
    parser.add_argument("--rows", type=int, default=32, help="rows per model batch (store_batch_size_prompts)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from bridge.saelens_cache import cached_activations

    with tempfile.TemporaryDirectory(prefix="jsae-cache-bench-") as tmp:
        folder = Path(tmp)
        cfg, model = write_both(folder, args.tokens, args.rows)
        readers = {}
        for name in ("jsae", "saelens"):
            reader = cached_activations(dataclasses.replace(cfg, activation_cache_path=str(folder / name)),
                                        cfg.hook_name, model)
            reader.as_jax = False
            readers[name] = reader
        first = [next(r.chunks()) for r in readers.values()]
        assert all(bool((first[0] == f).all()) for f in first), "the two caches differ"
        results = {}
        for kind, batches in (("chunks", False), ("batches", True)):
            rates = {name: [] for name in readers}
            for _, name in itertools.product(range(args.repeats), readers):
                rates[name].append(read_rate(readers[name], args.tokens, batches))
            results[kind] = {name: max(r) for name, r in rates.items()}
        width = cfg.train.sae.d_in
        print(f"{args.tokens:,} tokens x {width} float32, {args.rows} rows x {cfg.context_size} per model batch, "
              f"best of {args.repeats}")
        for kind, rates in results.items():
            print(f"  {kind:<8} jsae {rates['jsae'] / 1e6:8.2f} M tok/s   saelens {rates['saelens'] / 1e6:8.2f} M tok/s"
                  f"   jsae / saelens = {rates['jsae'] / rates['saelens']:.2f}x")


if __name__ == "__main__":
    main()
