"""End-to-end training benchmark: `jsae train`'s code path against sae_lens' training runner.

Both train the same SAE on the same model, hook and text, with the same batch sizes and the
same shuffle-buffer size in tokens:

- jsae: bridge.run's `prepare` and bridge.sources' `activation_source`, then
  `jsae.Trainer(cfg.train).fit` — what `jsae train` runs, minus its held-out evaluations.
- sae_lens: `LanguageModelSAETrainingRunner(cfg, override_model=..., override_dataset=...).run()`
  with wandb (and so its in-training evals), checkpoints and the output folder off. The model is
  the same HookedTransformer; the dataset streams the same documents, which sae_lens tokenizes
  and packs itself (bridge.data packs exactly as sae_lens does, so the rows are the same).

jsae's runs get the environment `jsae train`'s hint asks for (GLIBC_TUNABLES=glibc.malloc.hugetlb=1
where glibc and the kernel support it, see jsae/backends/hugepages.py); sae_lens' runs the plain one,
unless `--env GLIBC_TUNABLES=glibc.malloc.hugetlb=1` gives it to both.

`jsae train` keeps its compiled programs on disk (jsae.enable_compilation_cache), so how long its
first batch takes depends on whether the same shapes ran before. `--compilation-cache` picks:
cold (the default: each jsae run starts from an empty cache, as the first `jsae train` of a run
config on a machine), warm (one untimed jsae run fills the cache first, as every later one) or
off (no cache).

The script orchestrates: every training run is its own subprocess (so its peak RSS is its own),
the libraries alternate (the order flips every repeat) and medians are reported. A last
subprocess times the pipeline's pieces one at a time (tokenize + pack, model forward, shuffle
buffer, DLPack hand-off, train step) for both libraries.

Rates (tokens/s):
    steady: tokens of the steps after the first `skip` ones, over the time from the arrival of
        step `skip`'s batch to the end of training. Excludes the first shuffle-buffer fill and
        the jit compile (both in step 0).
    train: all training tokens over the wall time of the training call (fit / run): includes
        the first buffer fill and jsae's jit compile; excludes imports and model load ("setup").

    python bench/end_to_end.py                          # 204,800 tokens a run, 2 repeats
    python bench/end_to_end.py --tokens 409600 --repeats 3 --write
    python bench/end_to_end.py --set sae.d_sae=8192 --libs jsae,sae_lens
    python bench/end_to_end.py --compilation-cache warm     # jsae's programs loaded from its cache
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EMBEDDED_NAMES = ("embedded", "jsae-embedded-stdlib")
STDLIB_NAMES = ("stdlib", "embedded")
RESULT_PREFIX = "RESULT "


# ---------------------------------------------------------------------- the run config
def resolved_config(config: Path, tokens: int, sets: list[str]) -> dict:
    """The run config as one plain mapping with every field filled in, for both workers.

    Built and validated by bridge.run_config.RunConfig; benchmark overrides: `tokens` (rounded down
    to whole batches), no checkpoints, no output folder, no logs, no progress bar, and lr
    warm-up / decay clamped to a fifth of the shorter run each.
    """
    import yaml

    from bridge.run_config import RunConfig
    from jsae import TrainConfig

    data = dict(yaml.safe_load(config.read_text()) or {})
    for item in sets:
        key, _, value = item.partition("=")
        value = yaml.safe_load(value)
        if key.startswith("sae."):
            data["sae"] = dict(data.get("sae") or {}) | {key[4:]: value}
        else:
            data[key] = value
    batch = int(data.get("train_batch_size_tokens", 4096))
    steps = max(tokens // batch, 1)
    data |= {"total_training_tokens": steps * batch, "checkpoint_path": None, "output_path": None,
             "log_path": None, "progress_bar": False, "resume": False, "log_to_wandb": False,
             "activation_cache_path": None}
    for key in ("lr_warm_up_steps", "lr_decay_steps"):
        data[key] = min(int(data.get(key, 0)), steps // 5)
    # no evals in either library (sae_lens runs them only when logging to wandb)
    if "eval_every_n_steps" in {f.name for f in dataclasses.fields(TrainConfig)}:
        data["eval_every_n_steps"] = 0
    if "n_eval_batches" in {f.name for f in dataclasses.fields(RunConfig)}:
        data["n_eval_batches"] = 0
    cfg = RunConfig.from_dict(data, where=str(config))
    if cfg.model_name not in EMBEDDED_NAMES or cfg.dataset_path not in STDLIB_NAMES:
        print(f"note: model {cfg.model_name!r} / dataset {cfg.dataset_path!r}: the sae_lens worker loads them "
              "through bridge, which imports jax into its process too.", file=sys.stderr)
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "train"}
    out |= {f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(cfg.train) if f.name != "sae"}
    out["sae"] = {k: v for k, v in cfg.train.sae.to_dict().items() if k != "metadata"}
    out["seqpos_slice"] = list(cfg.seqpos_slice)
    return json.loads(json.dumps(out))


def saelens_config(flat: dict):
    """The same run as sae_lens' LanguageModelSAERunnerConfig.

    sae_lens 6 sizes its mixing buffer as n_batches_in_buffer * context tokens, jsae as
    n_batches_in_buffer * store_batch_size_prompts * context; sae_lens gets
    n_batches_in_buffer * store_batch_size_prompts so both buffers hold the same tokens.
    prefetch_llm_batches stays off here: saelens_worker wraps the store itself when asked to.
    """
    from sae_lens import LanguageModelSAERunnerConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.registry import get_sae_training_class

    sae = dict(flat["sae"])
    _, sae_cfg_cls = get_sae_training_class(sae.pop("architecture"))
    known = {f.name for f in dataclasses.fields(sae_cfg_cls)}
    sae = {k: v for k, v in sae.items() if k in known}  # jsae_only_sae_fields() lists the rest
    sae["device"] = flat["device"]
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg_cls(**sae),
        model_name=flat["model_name"], model_class_name=flat["model_class_name"], hook_name=flat["hook_name"],
        hook_head_index=flat["hook_head_index"], dataset_path=flat["dataset_path"], streaming=True,
        is_dataset_tokenized=False, context_size=flat["context_size"],
        n_batches_in_buffer=flat["n_batches_in_buffer"] * flat["store_batch_size_prompts"],
        training_tokens=flat["total_training_tokens"], store_batch_size_prompts=flat["store_batch_size_prompts"],
        seqpos_slice=tuple(flat["seqpos_slice"]), disable_concat_sequences=flat["disable_concat_sequences"],
        sequence_separator_token=flat["sequence_separator_token"], prepend_bos=flat["prepend_bos"],
        exclude_special_tokens=flat["exclude_special_tokens"], device=flat["device"], seed=flat["seed"],
        dtype=sae.get("dtype", "float32"), train_batch_size_tokens=flat["train_batch_size_tokens"],
        adam_beta1=flat["adam_beta1"], adam_beta2=flat["adam_beta2"], lr=flat["lr"],
        lr_scheduler_name=flat["lr_scheduler_name"], lr_warm_up_steps=flat["lr_warm_up_steps"],
        lr_end=flat["lr_end"], lr_decay_steps=flat["lr_decay_steps"], n_restart_cycles=flat["n_restart_cycles"],
        dead_feature_window=flat["dead_feature_window"], feature_sampling_window=flat["feature_sampling_window"],
        n_batches_for_norm_estimate=flat["n_batches_for_norm_estimate"],
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None, output_path=None,
        verbose=False, prefetch_llm_batches=0,
        model_from_pretrained_kwargs=flat["model_from_pretrained_kwargs"] or None,
    )


def jsae_only_sae_fields(flat: dict) -> list[str]:
    """SAE settings sae_lens has no field for (jsae implementation choices); they are left out there."""
    from sae_lens.registry import get_sae_training_class

    _, sae_cfg_cls = get_sae_training_class(flat["sae"]["architecture"])
    return sorted(set(flat["sae"]) - {"architecture"} - {f.name for f in dataclasses.fields(sae_cfg_cls)})


# ---------------------------------------------------------------------- what the sae_lens side reads
def _standalone(relative: str):
    """A bridge module loaded from its file alone: `import bridge...` would import jax (bridge.dlpack)."""
    spec = importlib.util.spec_from_file_location("_bench_" + Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_model_for_saelens(flat: dict):
    if flat["model_name"] in EMBEDDED_NAMES:
        return _standalone("bridge/embedded/__init__.py").load_embedded_model(device=flat["device"])
    from bridge.model import load_model

    return load_model(flat["model_name"], model_class_name=flat["model_class_name"],
                      from_pretrained_kwargs=flat["model_from_pretrained_kwargs"], device=flat["device"])


def saelens_dataset(flat: dict):
    """The documents bridge.data.text_documents gives jsae, as a streaming `datasets` text dataset."""
    import datasets

    if flat["dataset_path"] in STDLIB_NAMES:
        corpus = _standalone("bridge/corpus.py")
        split = flat["dataset_split"]

        def rows():
            for _, text in corpus.stdlib_documents(split, seed=flat["seed"]):  # jsae's order (the run's seed)
                yield {"text": text}
    else:
        from bridge.data import text_documents
        from bridge.run_config import RunConfig

        cfg = RunConfig.from_dict(flat)

        def rows():
            for doc in text_documents(cfg):
                yield {"text": doc} if isinstance(doc, str) else {"tokens": list(doc)}

    return datasets.IterableDataset.from_generator(rows)


# ---------------------------------------------------------------------- workers
class TimedBatches:
    """Wraps the iterator a trainer pulls batches from; records when each was asked for and arrived."""

    def __init__(self, inner):
        self.inner = inner
        self.iterator = None
        self.asked: list[float] = []
        self.arrived: list[float] = []
        self.rss_after_step0 = None

    def __iter__(self):
        self.iterator = iter(self.inner)  # a background producer starts here, as without the wrapper
        return self

    def __next__(self):
        t = time.perf_counter()
        if len(self.asked) == 1:
            self.rss_after_step0 = rss_mb()
        if self.iterator is None:
            self.iterator = iter(self.inner)
        batch = next(self.iterator)
        self.asked.append(t)
        self.arrived.append(time.perf_counter())
        return batch


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timing_result(lib: str, flat: dict, timed: TimedBatches, t_start: float, t_fit: float, t_end: float,
                  rss_before: float, skip: int) -> dict:
    tokens, batch = flat["total_training_tokens"], flat["train_batch_size_tokens"]
    steps = len(timed.arrived)
    skip = min(skip, steps - 1)
    steady_s = t_end - timed.arrived[skip]
    waits = [g - a for a, g in zip(timed.asked, timed.arrived, strict=True)]
    return {
        "lib": lib, "tokens": tokens, "steps": steps, "batch": batch, "skip": skip,
        "setup_s": t_fit - t_start, "train_s": t_end - t_fit, "first_batch_s": timed.arrived[0] - t_fit,
        "step0_s": (timed.asked[1] - timed.arrived[0]) if steps > 1 else None,
        "steady_s": steady_s, "steady_tok_s": (steps - skip) * batch / steady_s,
        "train_tok_s": tokens / (t_end - t_fit), "steady_data_wait_s": sum(waits[skip:]),
        "rss_before_train_mb": rss_before, "rss_after_step0_mb": timed.rss_after_step0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "jax_in_process": "jax" in sys.modules, "load_avg_1m": os.getloadavg()[0],
    }


def jsae_worker(flat: dict, skip: int, compilation_cache: Path | None) -> dict:
    t_start = time.perf_counter()
    import jsae

    if compilation_cache is not None:
        jsae.enable_compilation_cache(compilation_cache)
    from bridge.run import prepare
    from bridge.run_config import RunConfig
    from bridge.sources import activation_source

    model, cfg = prepare(RunConfig.from_dict(flat))
    source = activation_source(cfg, model)
    trainer = jsae.Trainer(cfg.train)
    timed = TimedBatches(source)
    rss_before = rss_mb()
    t_fit = time.perf_counter()
    trainer.fit(timed, batch_dtype="float32")  # as bridge.run.run: compiles while the first buffer fills
    t_end = time.perf_counter()
    source.close()
    result = timing_result("jsae", flat, timed, t_start, t_fit, t_end, rss_before, skip)
    if trainer.plan.topk is not None:
        result["topk_path"] = trainer.plan.topk
    return result


def torch_device(flat: dict) -> dict:
    """`flat` with the torch device that `device: auto` resolves to for jsae on this machine (sae_lens takes
    a torch device)."""
    import torch

    from bridge.model import resolve_device
    from jsae.backends import default_platform

    return flat | {"device": resolve_device(flat["device"], torch.cuda.is_available(), default_platform())[0]}


def saelens_worker(flat: dict, skip: int, prefetch: int) -> dict:
    t_start = time.perf_counter()
    import torch
    from sae_lens import LanguageModelSAETrainingRunner
    from sae_lens.training.prefetch import PrefetchingIterator

    torch.manual_seed(flat["seed"])
    flat = torch_device(flat)
    model = load_model_for_saelens(flat)
    runner = LanguageModelSAETrainingRunner(saelens_config(flat), override_dataset=saelens_dataset(flat),
                                            override_model=model)
    # run() pulls batches from runner.activations_store (wrapped in a PrefetchingIterator when
    # prefetch_llm_batches is set); the wrapper goes where the trainer pulls.
    store = runner.activations_store
    inner = PrefetchingIterator(iter(store), prefetch=prefetch) if prefetch else store
    timed = TimedBatches(inner)
    runner.activations_store = timed
    rss_before = rss_mb()
    t_fit = time.perf_counter()
    runner.run()
    t_end = time.perf_counter()
    if prefetch:
        inner.close()
    result = timing_result("sae_lens", flat, timed, t_start, t_fit, t_end, rss_before, skip)
    result["prefetch"] = prefetch
    return result


def _alternated_ms(fns: dict, items: list, warmup: int = 1, average=statistics.median, block: int = 1
                   ) -> dict[str, float]:
    """Median (or `average`) ms per call of each function over `items`, the functions alternated
    every `block` items; with block > 1 the first call of each block is not counted (the other
    library's threads may still be winding down)."""
    for x in items[:warmup]:
        for fn in fns.values():
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for start in range(0, len(items), block):
        for name, fn in fns.items():
            for i, x in enumerate(items[start : start + block]):
                t = time.perf_counter()
                fn(x)
                if block == 1 or i > 0:
                    times[name].append(time.perf_counter() - t)
    return {name: 1000 * average(ts) for name, ts in times.items()}


def profile_worker(flat: dict, n_forwards: int, libs: list[str]) -> dict:
    """Each piece of the pipeline timed alone, serially, in ms per training batch, on one model.

    The two libraries' versions of a piece alternate call by call (train steps: in blocks of 8,
    the first of each block not counted); the shuffle buffers each run once over the same
    activations."""
    import jax
    import numpy as np
    import torch

    import jsae
    from bridge.activations import ShuffleBuffer
    from bridge.data import token_rows
    from bridge.dlpack import torch_to_jax
    from bridge.run import prepare
    from bridge.run_config import RunConfig
    from bridge.sources import activation_source

    both = "sae_lens" in libs
    model, cfg = prepare(RunConfig.from_dict(flat))
    source = activation_source(cfg, model)
    batch, rows_per_forward = cfg.train.train_batch_size_tokens, cfg.store_batch_size_prompts
    per_forward = rows_per_forward * len(range(cfg.context_size)[slice(*cfg.seqpos_slice)])
    per_batch = batch / per_forward  # forwards per training batch
    n_forwards = max(n_forwards, 2 * -(-source.buffer.capacity // per_forward))  # two buffer fills at least
    out: dict = {"batch": batch, "tokens_per_forward": per_forward, "forwards": n_forwards}

    rows = token_rows(cfg, model)
    chunks = []

    def jsae_rows(_):
        chunks.append(torch.as_tensor(np.asarray(list(itertools.islice(rows, rows_per_forward))), dtype=torch.long))

    fns = {"jsae": jsae_rows}
    if both:
        from sae_lens.registry import get_sae_training_class
        from sae_lens.training.activations_store import ActivationsStore
        from sae_lens.training.mixing_buffer import mixing_buffer
        from sae_lens.training.sae_trainer import SAETrainer

        sl_cfg = saelens_config(torch_device(flat))
        store = ActivationsStore.from_config(model, sl_cfg, override_dataset=saelens_dataset(flat))
        fns["sae_lens"] = lambda _: store.get_batch_tokens()
    # the mean: a call that starts a new document tokenizes all of it, the others only slice rows
    for name, ms in _alternated_ms(fns, range(n_forwards + 1), average=statistics.fmean).items():
        out[f"{name}_tokenize_ms"] = ms * per_batch
    chunks = chunks[2:]  # the warm-up's

    acts = []
    fns = {"jsae": lambda x: acts.append(source.model_activations(x))}
    if both:
        fns["sae_lens"] = store.get_activations
    for name, ms in _alternated_ms(fns, chunks).items():
        out[f"{name}_forward_ms"] = ms * per_batch
    acts = acts[1:]

    buffer = ShuffleBuffer(source.buffer.capacity, batch, seed=0)
    t = time.perf_counter()
    batches = [b for a in acts for b in buffer.add(a)]
    out["jsae_shuffle_ms"] = 1000 * (time.perf_counter() - t) / max(len(batches), 1)
    if both:
        t = time.perf_counter()
        served = list(mixing_buffer(sl_cfg.n_batches_in_buffer * store.training_context_size, batch, iter(acts),
                                    sl_cfg.activations_mixing_fraction))
        out["sae_lens_shuffle_ms"] = 1000 * (time.perf_counter() - t) / max(len(served), 1)

    trainer = jsae.Trainer(cfg.train)
    handoff = _alternated_ms({"dlpack": torch_to_jax, "source": lambda b: trainer._to_global(source._convert(b))},
                             batches)
    out["dlpack_ms"], out["jsae_handoff_ms"] = handoff["dlpack"], handoff["source"]

    ready = {id(b): trainer._to_global(source._convert(b)) for b in batches}
    holder = {"state": trainer.init_state()}

    def jsae_step(b):
        holder["state"], metrics = trainer.step_fn(holder["state"], ready[id(b)])
        jax.block_until_ready(metrics)

    fns = {"jsae": jsae_step}
    if both:
        sae_cls, _ = get_sae_training_class(flat["sae"]["architecture"])
        sl_trainer = SAETrainer(cfg=sl_cfg.to_sae_trainer_config(), sae=sae_cls(sl_cfg.sae), data_provider=iter(()))
        fns["sae_lens"] = sl_trainer.step
    for name, ms in _alternated_ms(fns, batches * 2, warmup=2, block=8).items():
        out[f"{name}_step_ms"] = ms
    out["handoff_share_of_step"] = out["jsae_handoff_ms"] / out["jsae_step_ms"]
    return out


# ---------------------------------------------------------------------- the orchestrator
def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def wait_for_idle(fraction: float, timeout: float) -> float:
    """Wait (up to `timeout` s) until the machine has been at least `fraction` idle for 2 s; returns the wait."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        busy0, total0 = cpu_ticks()
        time.sleep(2)
        busy1, total1 = cpu_ticks()
        if 1 - (busy1 - busy0) / max(total1 - total0, 1) >= fraction:
            break
    return time.perf_counter() - start


def jsae_environment(env: dict) -> dict:
    from jsae.backends.hugepages import jsae_environment as hugepage_environment

    return hugepage_environment(env) or env


def run_worker(args, kind: str, spec: Path, compilation_cache: Path | None = None) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec),
               "--skip-steps", str(args.skip_steps), "--profile-forwards", str(args.profile_forwards),
               "--sae-lens-prefetch", str(args.sae_lens_prefetch), "--libs", args.libs]
    if compilation_cache is not None:
        command += ["--compilation-cache-dir", str(compilation_cache)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    env |= dict(item.partition("=")[::2] for item in args.env)
    if kind == "jsae":  # the environment `jsae train`'s hint asks for (jsae.backends.hugepages)
        env = jsae_environment(env)
    waited = wait_for_idle(args.wait_idle, args.wait_timeout) if args.wait_idle else 0.0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = cpu_ticks()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    busy1, total1 = cpu_ticks()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"worker {kind} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    # CPU the rest of the machine used while this run ran, as a share of all CPUs: the noise.
    own = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    tick = os.sysconf("SC_CLK_TCK")
    result["others_cpu_share"] = max((busy1 - busy0) / tick - own, 0.0) / max((total1 - total0) / tick, 1e-9)
    result["waited_for_idle_s"] = waited
    return result


def summarize(runs: list[dict]) -> dict:
    keys = ("steady_tok_s", "train_tok_s", "setup_s", "train_s", "first_batch_s", "step0_s", "steady_data_wait_s",
            "steady_s", "peak_rss_mb", "rss_before_train_mb", "rss_after_step0_mb", "load_avg_1m", "others_cpu_share")
    out = {}
    for lib in dict.fromkeys(r["lib"] for r in runs):
        mine = [r for r in runs if r["lib"] == lib]
        out[lib] = {k: statistics.median(r[k] for r in mine) for k in keys if all(r.get(k) is not None for r in mine)}
        out[lib] |= {"n": len(mine), "jax_in_process": mine[0]["jax_in_process"],
                     **({"topk_path": mine[0]["topk_path"]} if "topk_path" in mine[0] else {}),
                     "steady_tok_s_all": [(round(r["steady_tok_s"]), round(100 * r["others_cpu_share"])) for r in mine]}
    if "jsae" in out and "sae_lens" in out:
        out["ratio_steady"] = out["jsae"]["steady_tok_s"] / out["sae_lens"]["steady_tok_s"]
        out["ratio_train"] = out["jsae"]["train_tok_s"] / out["sae_lens"]["train_tok_s"]
        # repeat i's two runs ran back to back (the order flips each repeat): their ratio is blind to the
        # machine's speed drifting between repeats
        pairs = zip((r for r in runs if r["lib"] == "jsae"), (r for r in runs if r["lib"] == "sae_lens"), strict=False)
        out["ratio_steady_paired"] = statistics.median(a["steady_tok_s"] / b["steady_tok_s"] for a, b in pairs)
    return out


def command_line(args, flat: dict) -> str:
    parts = ["bench/end_to_end.py", f"--tokens {flat['total_training_tokens']}", f"--repeats {args.repeats}"]
    if args.config.resolve() != (ROOT / "configs" / "default.yaml").resolve():
        parts.append(f"--config {args.config}")
    parts += [f"--set {item}" for item in args.set] + [f"--env {item}" for item in args.env]
    if args.sae_lens_prefetch:
        parts.append(f"--sae-lens-prefetch {args.sae_lens_prefetch}")
    if args.compilation_cache != "cold":
        parts.append(f"--compilation-cache {args.compilation_cache}")
    return " ".join(parts)


def format_report(flat: dict, summary: dict, profile: dict | None, info: dict, args) -> str:
    from bench import machine_label  # bench/bench.py

    date = datetime.date.today().isoformat()
    sae = flat["sae"]
    size = sae.get("k", "")
    lines = [
        f"### {date} — end-to-end training, {info['backend']} ({machine_label(info)}), "
        f"jax {info['jax']}" + (f", torch {info['torch']}" if "torch" in info else "")
        + (f", sae_lens {info['sae_lens']}" if "sae_lens" in info else ""),
        "",
        f"`{command_line(args, flat)}`: "
        f"{flat['model_name']} model, {flat['hook_name']}, {sae['architecture']} {sae['d_in']} → {sae['d_sae']}"
        + (f" (k={size})" if size else "")
        + f", batch {flat['train_batch_size_tokens']} tokens, context {flat['context_size']}, "
        f"{flat['store_batch_size_prompts']} rows per forward, shuffle buffer "
        f"{flat['n_batches_in_buffer'] * flat['store_batch_size_prompts'] * flat['context_size']:,} tokens, "
        f"{flat['dataset_path']} text. Each run in its own process, libraries alternated, medians. Steady: "
        f"tokens/s after the first {args.skip_steps} steps (no buffer fill, no jit compile); train: all tokens "
        "over the training call's wall time; setup (imports, model load) is not in either. sae_lens: "
        + ("its default synchronous runner." if not args.sae_lens_prefetch
           else f"prefetch_llm_batches={args.sae_lens_prefetch}.")
        + (f" Environment of every run: {' '.join(args.env)}." if args.env else "")
        + {"cold": " jsae's compilation cache: empty at the start of each run (as a first `jsae train`).",
           "warm": " jsae's compilation cache: filled by an untimed run first (as a later `jsae train` of the "
                   "same shapes).",
           "off": " jsae's compilation cache: off."}[args.compilation_cache]
        + (f" jsae runs under GLIBC_TUNABLES={jsae_environment({})['GLIBC_TUNABLES']} (`jsae train`'s hint)"
           + ("" if any(e.startswith("GLIBC_TUNABLES=") for e in args.env) else "; sae_lens in the plain environment")
           + "." if jsae_environment({}) else ""),
    ]
    if info.get("jsae_only_sae_fields"):
        lines[-1] += (" jsae-only SAE settings (sae_lens has no such field): "
                      + ", ".join(f"{k}={v}" for k, v in info["jsae_only_sae_fields"].items())
                      + (f" (took the {summary['jsae']['topk_path']} path)" if "topk_path" in summary.get("jsae", {})
                         else "") + ".")
    lines += [
        "",
        "| library | steady tok/s | train tok/s | setup s | first batch s | step 0 s | data wait s | RSS MB: "
        "before training → after step 0 → peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lib in ("jsae", "sae_lens"):
        if lib not in summary:
            continue
        s = summary[lib]
        lines.append(f"| {lib} | {s['steady_tok_s']:,.0f} | {s['train_tok_s']:,.0f} | {s['setup_s']:.1f} | "
                     f"{s['first_batch_s']:.2f} | {s.get('step0_s', float('nan')):.2f} | "
                     f"{s['steady_data_wait_s']:.1f} of {s['steady_s']:.1f} | {s['rss_before_train_mb']:,.0f} → "
                     f"{s.get('rss_after_step0_mb', float('nan')):,.0f} → {s['peak_rss_mb']:,.0f} |")
    if "ratio_steady" in summary:
        lines += ["", f"jsae / sae_lens: {summary['ratio_steady']:.2f}x steady, {summary['ratio_train']:.2f}x train "
                      f"(medians); the median of each repeat's back-to-back steady ratio: "
                      f"{summary['ratio_steady_paired']:.2f}x."]
    libs = [lib for lib in ("jsae", "sae_lens") if lib in summary]
    if libs:
        lines += ["", "Steady tok/s of each run (in brackets: the share of the machine's CPU other jobs took "
                      "meanwhile): " + "; ".join(
                          f"{lib} " + ", ".join(f"{v:,} ({share}%)" for v, share in summary[lib]["steady_tok_s_all"])
                          for lib in libs) + "."]
    if profile:
        b = profile["batch"]
        lines += ["", f"Pieces timed alone, serially, ms per training batch of {b} tokens (median over "
                      f"{profile['forwards']} forwards; tokenize: mean; other jobs took "
                      f"{100 * profile['others_cpu_share']:.0f}% of the CPU meanwhile):", "",
                  "| piece | jsae | sae_lens |", "|---|---|---|"]
        for name, key in (("tokenize + pack", "tokenize"), ("model forward", "forward"),
                          ("shuffle buffer", "shuffle"), ("train step", "step")):
            sl = profile.get(f"sae_lens_{key}_ms")
            lines.append(f"| {name} | {profile[f'jsae_{key}_ms']:.1f} | " + (f"{sl:.1f} |" if sl is not None else "— |"))
        lines.append(f"| DLPack hand-off | {profile['jsae_handoff_ms']:.3f} | — |")
        lines += ["", f"DLPack hand-off (torch_to_jax {profile['dlpack_ms']:.3f} ms, with the trainer's device_put "
                      f"{profile['jsae_handoff_ms']:.3f} ms) is {100 * profile['handoff_share_of_step']:.2f}% of one "
                      f"jsae train step ({profile['jsae_step_ms']:.1f} ms)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (sae.* for the SAE), e.g. --set sae.d_sae=4096")
    parser.add_argument("--tokens", type=int, default=204_800, help="training tokens per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each library")
    parser.add_argument("--libs", default="jsae,sae_lens")
    parser.add_argument("--skip-steps", type=int, default=8, help="steps left out of the steady rate")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for every run of both libraries, e.g. OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="FRACTION",
                        help="before each run, wait until the machine is at least this idle (e.g. 0.9)")
    parser.add_argument("--wait-timeout", type=float, default=180.0, help="longest wait for --wait-idle, s")
    parser.add_argument("--sae-lens-prefetch", type=int, default=0,
                        help="sae_lens' prefetch_llm_batches (0: its default, synchronous)")
    parser.add_argument("--profile-forwards", type=int, default=0,
                        help="model forwards in the per-piece profile (at least two shuffle-buffer fills)")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-piece profile")
    parser.add_argument("--compilation-cache", choices=("cold", "warm", "off"), default="cold",
                        help="jsae's compilation cache: empty at each run (cold, as a first `jsae train`), filled "
                             "by an untimed run first (warm, as a later one), or none (off)")
    parser.add_argument("--write", action="store_true", help="append the tables to bench/RESULTS.md")
    parser.add_argument("--json", type=Path, default=None, help="also write every run as JSON")
    parser.add_argument("--worker", choices=("jsae", "sae_lens", "profile"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compilation-cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    libs = args.libs.split(",")

    if args.worker:
        flat = json.loads(args.spec.read_text())
        if args.worker == "jsae":
            result = jsae_worker(flat, args.skip_steps, args.compilation_cache_dir)
        elif args.worker == "sae_lens":
            result = saelens_worker(flat, args.skip_steps, args.sae_lens_prefetch)
        else:
            result = profile_worker(flat, args.profile_forwards, libs)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench import machine  # bench/bench.py

    flat = resolved_config(args.config, args.tokens, args.set)
    info = machine()
    if "sae_lens" in libs and jsae_only_sae_fields(flat):
        info["jsae_only_sae_fields"] = {k: flat["sae"][k] for k in jsae_only_sae_fields(flat)}
    print(json.dumps(info), flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "run.json"
        spec.write_text(json.dumps(flat))
        caches = Path(tmp) / "xla"
        if "jsae" in libs and args.compilation_cache == "warm":
            run_worker(args, "jsae", spec, caches / "warm")  # untimed: fills the cache
        for repeat in range(args.repeats):
            for lib in (libs if repeat % 2 == 0 else libs[::-1]):
                cache = {"off": None, "warm": caches / "warm", "cold": caches / f"cold-{repeat}"}[args.compilation_cache]
                result = run_worker(args, lib, spec, cache if lib == "jsae" else None)
                runs.append(result)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}),
                      flush=True)
        profile = None if args.no_profile else run_worker(args, "profile", spec)
    if profile:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in profile.items()}), flush=True)
    summary = summarize(runs)
    report = format_report(flat, summary, profile, info, args)
    print(report)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "config": flat, "runs": runs, "summary": summary,
                                         "profile": profile}, indent=2))
    if args.write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
