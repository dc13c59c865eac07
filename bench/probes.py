"""Bad-input, crash and signal probes of jsae: each probe of bench/probe_table.py runs in its own subprocess
and is classified from its exit code, signal, stderr and outputs.

Classes: ok (a valid input worked, or an interrupted run resumed to the uninterrupted result), clear (a jsae
error naming the field or file; exit 2, no traceback), unclear (a traceback, another exit code, or a message
that does not name what is wrong), silent (exit 0 on a wrong input, or a non-finite / wrong result), crash
(killed by a signal the probe did not send), lost (an interrupted run whose completed steps or result could
not be recovered), untested (the probe's signal trigger never happened).

    .venv/bin/python bench/probes.py --jobs 2            # the whole table
    .venv/bin/python bench/probes.py --only 'signal:*'   # a subset (fnmatch pattern, or a substring)
Exit 1 when any probe is silent, crash or lost.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from probe_assets import make_assets, setup_probe  # noqa: E402
from probe_table import LONG, all_probes  # noqa: E402

BAD = ("silent", "crash", "lost")
CLASSES = ("ok", "clear", "unclear", "silent", "crash", "lost", "untested")
WRAPPER = """
import os, sys
from pathlib import Path
import numpy as np
import jsae
D, A = Path(sys.argv[1]), Path(sys.argv[2])
try:
    exec(compile(sys.argv[3], "<probe>", "exec"), {"jsae": jsae, "np": np, "D": D, "A": A})
except jsae.JsaeError as err:
    print(f"jsae error: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(2)
"""


def probe_env() -> dict:
    """One thread per probe process (the probes run side by side) and no hints on stderr."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JSAE_HUGEPAGES="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"  # one device
    return env


def command(probe, argv, folder: Path, assets: Path) -> list[str]:
    if probe.kind in ("python_api", "load"):
        return [sys.executable, "-c", WRAPPER, str(folder), str(assets), probe.code]
    fill = [a.replace("{dir}", str(folder)).replace("{assets}", str(assets)) for a in argv]
    return [sys.executable, "-m", "bridge.cli", *fill]


def execute(cmd, folder: Path, timeout: float, sig=()) -> dict:
    """Run `cmd`; with `sig` = (name, glob, delay), send that signal once the glob matches under `folder`."""
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=str(ROOT), env=probe_env())
        sent, start = False, time.monotonic()
        while proc.poll() is None:
            if time.monotonic() - start > timeout:
                proc.kill()
                proc.wait()
                break
            if sig and not sent and glob.glob(str(folder / sig[1])):
                time.sleep(sig[2])
                if proc.poll() is None:
                    proc.send_signal(getattr(signal, sig[0]))
                    sent = True
            time.sleep(0.01 if sig and not sent else 0.1)
    timed_out = time.monotonic() - start > timeout
    return {"rc": proc.returncode, "sent": sent, "timed_out": timed_out,
            "stdout": (folder / "stdout.txt").read_text(errors="replace"),
            "stderr": (folder / "stderr.txt").read_text(errors="replace")}


def weights(folder: Path) -> dict | None:
    from safetensors.numpy import load_file

    path = folder / "sae_weights.safetensors"
    return load_file(str(path)) if path.is_file() else None


def check_output(probe, res: dict, folder: Path, assets: Path) -> str | None:
    """Why a finished run's result is wrong, or None."""
    import numpy as np

    if "WRONG" in res["stdout"]:
        return next(line for line in res["stdout"].splitlines() if "WRONG" in line)
    if probe.check in ("finite_sae", "equal_ref"):
        got = weights(folder / "sae")
        if got is None:
            return "no SAE folder written"
        if not all(np.isfinite(v).all() for v in got.values()):
            return "non-finite SAE weights"
        if probe.check == "equal_ref":
            return compare(got, weights(assets / "reference" / "sae"))
    if probe.check == "json_finite":
        try:
            data = json.loads(res["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            return "no JSON line"
        bad = [k for k, v in data.items() if isinstance(v, float | int | type(None)) and
               (v is None or not np.isfinite(v))]
        if bad:
            return f"non-finite metrics {bad}"
    return None


def compare(got, want) -> str | None:
    import numpy as np

    if want is None or got is None or set(got) != set(want):
        return "no SAE, or other tensors than the reference's"
    worst = max(float(np.max(np.abs(got[k] - want[k]), initial=0)) for k in want)
    return None if worst <= 1e-5 else f"differs from the uninterrupted run (max |diff| {worst:.3g})"


def error_class(probe, res: dict) -> tuple[str, str]:
    """How a run that should refuse its input did: clear, unclear, silent or crash."""
    rc, err = res["rc"], res["stderr"]
    last = err.strip().splitlines()[-1][:200] if err.strip() else ""
    if res["timed_out"]:
        return "unclear", "timed out"
    if rc < 0:
        return "crash", f"killed by {signal.Signals(-rc).name}"
    if rc == 0:
        return "silent", "accepted (exit 0)"
    if "Traceback" in err:
        return "unclear", f"traceback: {last}"
    if rc != 2:
        return "unclear", f"exit {rc}: {last}"
    missing = [n for n in probe.names if n.lower() not in err.lower()]
    return ("unclear", f"does not name {missing}: {last}") if missing else ("clear", last)


def judge(probe, res: dict, folder: Path, assets: Path) -> tuple[str, str]:
    if probe.expect == "error" or (probe.expect == "any" and res["rc"] != 0):
        return error_class(probe, res)
    if res["rc"] != 0:  # a valid input that did not go through
        cls, note = error_class(probe, res)
        return ("unclear" if cls == "clear" else cls), "refused a valid input: " + note
    wrong = check_output(probe, res, folder, assets)
    return ("silent", wrong) if wrong else ("ok", "")


def run_probe(probe, assets: Path, work: Path, timeout: float) -> dict:
    folder = work / probe.name.replace(":", "_").replace("/", "_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    setup_probe(probe, folder, assets)
    res = execute(command(probe, probe.argv, folder, assets), folder, timeout, probe.signal)
    if probe.signal:
        cls, note = after_signal(probe, res, folder, assets, timeout)
    else:
        cls, note = judge(probe, res, folder, assets)
    return {"name": probe.name, "kind": probe.kind, "class": cls, "note": note, "rc": res["rc"]}


def after_signal(probe, first: dict, folder: Path, assets: Path, timeout: float) -> tuple[str, str]:
    """An interrupted run: rerun it (or `resume_argv`) and judge the rerun."""
    name = probe.signal[0]
    if not first["sent"]:
        return "untested", f"the trigger {probe.signal[1]} never appeared (exit {first['rc']})"
    rc = first["rc"]
    if rc < 0 and -rc != getattr(signal, name):
        return "crash", f"killed by {signal.Signals(-rc).name} after {name}"
    ckpts = [p for p in (folder / "ckpt").glob("*") if p.name.isdigit()] if (folder / "ckpt").is_dir() else []
    traceback = name != "SIGKILL" and "Traceback" in first["stderr"]
    for stream in ("stdout", "stderr"):
        (folder / f"{stream}.txt").rename(folder / f"{stream}.interrupted.txt")
    second = execute(command(probe, probe.resume_argv or probe.argv, folder, assets), folder, timeout)
    if probe.expect == "error":
        return error_class(probe, second)
    if second["rc"] != 0:
        return "lost", f"the rerun failed (exit {second['rc']}): {second['stderr'].strip()[-200:]}"
    if name != "SIGKILL" and probe.signal[1].startswith("ckpt/") and not ckpts and rc != 0:
        return "lost", f"no checkpoint survived {name}"
    wrong = compare(weights(folder / "sae"), weights(assets / "reference" / "sae"))
    if wrong:
        return "lost", wrong
    if traceback:
        return "unclear", f"{name} printed a traceback: {first['stderr'].strip().splitlines()[-1][:200]}"
    return "ok", f"interrupted (exit {rc}), resumed to the reference"


def reference(assets: Path, timeout: float) -> None:
    """The uninterrupted run of LONG, which the signal probes must resume to."""
    folder = assets / "reference"
    if weights(folder / "sae") is not None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    argv = [a.replace("{dir}", str(folder)).replace("{assets}", str(assets)) for a in LONG]
    res = execute([sys.executable, "-m", "bridge.cli", *argv], folder, timeout)
    if res["rc"] != 0:
        raise SystemExit(f"the reference run failed:\n{res['stderr'][-3000:]}")


def select(probes, patterns):
    if not patterns:
        return probes
    return [p for p in probes if any(fnmatch.fnmatch(p.name, pat) or pat in p.name for pat in patterns)]


def run_all(probes, jobs: int = 2, timeout: float = 600, work: Path | None = None, verbose=True) -> list[dict]:
    work = Path(work or tempfile.mkdtemp(prefix="jsae-probes-"))
    assets = work / "assets"
    make_assets(assets)
    if any(p.signal for p in probes):
        reference(assets, timeout)
    results = []

    def one(probe):
        result = run_probe(probe, assets, work, timeout)
        if verbose:
            print(f"{result['class']:9s} {probe.name}  {result['note'][:160]}", flush=True)
        return result

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        results = list(pool.map(one, probes))
    return results


def summary(results: list[dict]) -> str:
    counts = {c: sum(r["class"] == c for r in results) for c in CLASSES}
    lines = [f"{len(results)} probes: " + ", ".join(f"{c} {n}" for c, n in counts.items())]
    kinds = sorted({r["kind"] for r in results})
    for kind in kinds:
        rows = [r for r in results if r["kind"] == kind]
        lines.append(f"  {kind:10s} " + ", ".join(f"{c} {sum(r['class'] == c for r in rows)}" for c in CLASSES))
    flagged = [r for r in results if r["class"] not in ("ok", "clear")]
    if flagged:
        lines.append("not clear:")
        lines += [f"  {r['class']:9s} {r['name']}: {r['note'][:200]}" for r in flagged]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="probes run side by side (default 2)")
    parser.add_argument("--only", action="append", default=[], metavar="PATTERN",
                        help="probes whose name matches (fnmatch) or contains PATTERN; repeatable")
    parser.add_argument("--list", action="store_true", help="list the probes and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per probe run (default 600)")
    parser.add_argument("--work", default=None, help="folder for the probes' files (default: a new temp folder)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    probes = select(all_probes(), args.only)
    if args.list:
        print("\n".join(f"{p.kind:10s} {p.name}" for p in probes))
        return 0
    start = time.monotonic()
    results = run_all(probes, args.jobs, args.timeout, args.work)
    print(f"\n{summary(results)}\n({time.monotonic() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["class"] in BAD for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
