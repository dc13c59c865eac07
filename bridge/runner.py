"""`jsae train CONFIG.yaml`: a language model's activations in, a trained SAELens folder out.

A run config is one YAML mapping: the model / hook / dataset fields below (SAELens' runner
names), the training fields of `jsae.TrainConfig`, and an `sae:` section (architecture and its
hyperparameters). The runner only wires the pieces together: bridge.model, bridge.data,
bridge.activations, jsae.Trainer.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from jsae import ConfigError, InputError, MissingFileError, TrainConfig
from jsae._errors import close_names
from jsae.config import Metadata

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where the activations come from (SAELens' runner field names).

    Attributes:
        model_name: "embedded" (shipped), an official TransformerLens name, or a local folder.
        model_class_name: "HookedTransformer".
        model_from_pretrained_kwargs: passed to HookedTransformer.from_pretrained.
        hook_name: the hook point the SAE reads, e.g. "blocks.2.hook_resid_pre".
        hook_head_index: keep one attention head of a hook_z-style hook.
        hook_names: several hook points (same width) read in one model forward, each training its own
            SAE (or sweep); replaces hook_name. Folders: <output_path>/<hook>[/<sweep member>].
        sweep: zipped sweep axes, e.g. {"sae.k": [16, 32], "lr": [1e-3, 3e-4]}: one SAE per position,
            all trained in one compiled step on the same activations (see jsae.training.sweep).
        dataset_path: "stdlib" (the embedded corpus), a Hugging Face dataset name, a local data
            file (.txt / .jsonl / .json / .parquet / .csv / .npy of token rows) or a folder of text files.
        dataset_split: split of a Hugging Face dataset.
        streaming: stream a Hub dataset instead of downloading it.
        context_size: tokens per row.
        prepend_bos: put BOS at position 0 of every row.
        sequence_separator_token: between concatenated documents: "bos", "eos", "sep", a token id or null.
        exclude_special_tokens: drop activations of BOS/EOS/PAD/SEP tokens (true), or of the listed ids.
        seqpos_slice: [start, stop(, step)] positions of each row that are kept.
        disable_concat_sequences: one row per document; shorter documents are dropped.
        store_batch_size_prompts: rows per model forward.
        n_batches_in_buffer: shuffle-buffer size, in model forwards.
        n_eval_batches: held-out batches the evals (during training and at the end) run on; 0 turns evals off.
        eval_batch_size_prompts: rows per eval batch (None: store_batch_size_prompts).
        device: torch device of the model.
        fused_forward: the forwards that feed training run fused attention (torch's
            scaled_dot_product_attention), one LayerNorm and one product for q, k and v, and oneDNN
            products on CPU, wherever nothing reads what they skip (see bridge/fused_forward.py); the
            activations equal TransformerLens' within float error. false: TransformerLens' forward as written.
        activation_cache_path: train from a cache written by `jsae cache` instead of the model.
        train: the SAE and training settings (None for a config that only evaluates).
    """

    model_name: str = "embedded"
    model_class_name: str = "HookedTransformer"
    model_from_pretrained_kwargs: dict = dataclasses.field(default_factory=dict)
    hook_name: str = "blocks.2.hook_resid_pre"
    hook_head_index: int | None = None
    hook_names: list | None = None
    sweep: dict = dataclasses.field(default_factory=dict)
    dataset_path: str = "stdlib"
    dataset_split: str = "train"
    streaming: bool = False
    context_size: int = 128
    prepend_bos: bool = True
    sequence_separator_token: int | str | None = "bos"
    exclude_special_tokens: bool | list = False
    seqpos_slice: tuple = (None,)
    disable_concat_sequences: bool = False
    store_batch_size_prompts: int = 16
    n_batches_in_buffer: int = 32
    n_eval_batches: int = 10
    eval_batch_size_prompts: int | None = None
    device: str = "cpu"
    fused_forward: bool = True
    activation_cache_path: str | None = None
    train: TrainConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seqpos_slice", tuple(self.seqpos_slice))
        for name in ("context_size", "store_batch_size_prompts", "n_batches_in_buffer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.fused_forward, bool):
            raise ConfigError(f"fused_forward must be true or false, got {self.fused_forward!r}.")
        if isinstance(self.n_eval_batches, bool) or not isinstance(self.n_eval_batches, int) or self.n_eval_batches < 0:
            raise ConfigError(f"n_eval_batches must be an integer >= 0 (0: no evals), got {self.n_eval_batches!r}.")
        if self.eval_batch_size_prompts is not None and (
                isinstance(self.eval_batch_size_prompts, bool) or not isinstance(self.eval_batch_size_prompts, int)
                or self.eval_batch_size_prompts <= 0):
            raise ConfigError(f"eval_batch_size_prompts must be a positive integer or null, got "
                              f"{self.eval_batch_size_prompts!r}.")
        if self.hook_names is not None:
            names = self.hook_names
            if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"hook_names must be a non-empty list of hook point names, got {names!r}.")
            if len(set(names)) != len(names):
                raise ConfigError(f"hook_names lists a hook twice: {names}.")
            object.__setattr__(self, "hook_names", list(names))
        if not isinstance(self.sweep, Mapping):
            raise ConfigError(f"sweep must map fields to lists of values, got {self.sweep!r}.")
        if not 1 <= len(self.seqpos_slice) <= 3:
            raise ConfigError(f"seqpos_slice must have 1 to 3 entries, got {list(self.seqpos_slice)}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "config") -> RunConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}.")
        run_fields = {f.name for f in dataclasses.fields(cls)} - {"train"}
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        for key in data:
            if key not in run_fields | train_fields:
                raise ConfigError(
                    f"{where}: unknown key {key!r}." + close_names(str(key), run_fields | train_fields)
                )
        run = {k: v for k, v in data.items() if k in run_fields}
        train = TrainConfig.from_dict({k: v for k, v in data.items() if k in train_fields}, where=where)
        return cls(**run, train=train)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"{path}: config file not found.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err}).") from err
        data = dict(data)
        for key, value in (overrides or {}).items():
            if isinstance(value, Mapping) and isinstance(data.get(key), Mapping):
                data[key] = dict(data[key]) | dict(value)
            else:
                data[key] = value
        return cls.from_dict(data, where=str(path))

    @property
    def hooks(self) -> list[str]:
        """The hook points this run trains SAEs on."""
        return list(self.hook_names) if self.hook_names else [self.hook_name]

    def metadata(self) -> dict[str, Any]:
        """What SAELens records in an SAE's metadata about where its activations came from."""
        return {
            "model_name": self.model_name,
            "model_class_name": self.model_class_name,
            "hook_name": self.hook_name,
            "hook_head_index": self.hook_head_index,
            "dataset_path": self.dataset_path,
            "context_size": self.context_size,
            "prepend_bos": self.prepend_bos,
            "seqpos_slice": list(self.seqpos_slice),
            "exclude_special_tokens": self.exclude_special_tokens,
            "sequence_separator_token": self.sequence_separator_token,
            "disable_concat_sequences": self.disable_concat_sequences,
            "model_from_pretrained_kwargs": dict(self.model_from_pretrained_kwargs),
        }


# ---------------------------------------------------------------------- data
def text_documents(cfg: RunConfig, split: str | None = None) -> Iterator[Any]:
    """Documents of the dataset: strings, or token-id sequences for pretokenized data."""
    path = cfg.dataset_path
    if path in ("stdlib", "embedded"):
        from bridge.corpus import stdlib_documents

        yield from (text for _, text in stdlib_documents(split or cfg.dataset_split))
        return
    local = Path(path).expanduser()
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".py", ".rst"))
        if not files:
            raise InputError(f"dataset_path: folder {local} holds no .txt/.md/.py/.rst files.")
        for f in files:
            yield f.read_text(encoding="utf-8", errors="replace")
        return
    if local.suffix == ".npy":
        yield from (list(map(int, row)) for row in _load_npy(local))
        return
    if local.suffix == ".txt":
        yield local.read_text(encoding="utf-8", errors="replace")
        return
    import datasets

    if local.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(local.suffix)
        if kind is None:
            raise InputError(f"dataset_path: cannot read {local.suffix!r} files (use .txt .jsonl .json .parquet .csv .npy).")
        dataset = datasets.load_dataset(kind, data_files=str(local), split="train")
    else:
        dataset = datasets.load_dataset(path, split=split or cfg.dataset_split, streaming=cfg.streaming)
    column = next((c for c in ("tokens", "input_ids", "text") if c in (dataset.column_names or [])), None)
    if column is None:
        raise InputError(f"dataset_path: {path} has no 'tokens', 'input_ids' or 'text' column "
                         f"(columns: {dataset.column_names}).")
    for row in dataset:
        yield row[column]


def _load_npy(path: Path):
    import numpy as np

    rows = np.load(path, mmap_mode="r")
    if rows.ndim != 2:
        raise InputError(f"dataset_path: {path} must hold a 2-D array of token rows, found shape {rows.shape}.")
    return rows


def token_rows(cfg: RunConfig, model, *, split: str | None = None, cycle: bool = True) -> Iterator[list[int]]:
    """Rows of `context_size` token ids, packed as SAELens packs them; epochs repeat with a warning."""
    from bridge.data import pack_token_sequences, resolve_special_token

    tokenizer = model.tokenizer
    if cfg.prepend_bos and (tokenizer is None or tokenizer.bos_token_id is None):
        raise ConfigError("prepend_bos is true, but the model's tokenizer has no BOS token; set prepend_bos: false.")
    separator = resolve_special_token(cfg.sequence_separator_token, tokenizer) if tokenizer is not None else None
    bos = tokenizer.bos_token_id if cfg.prepend_bos else None

    def one_epoch() -> Iterator[list[int]]:
        documents = text_documents(cfg, split)
        first = next(documents, None)
        if first is None:
            raise InputError(f"dataset_path: {cfg.dataset_path!r} is empty.")
        documents = itertools.chain([first], documents)
        if not isinstance(first, str):  # pretokenized rows are used as they are
            for row in documents:
                row = list(row)[: cfg.context_size]
                if len(row) < cfg.context_size:
                    raise InputError(f"dataset_path: pretokenized rows have {len(row)} tokens, fewer than "
                                     f"context_size={cfg.context_size}.")
                yield row
            return
        tokens = (model.to_tokens(text, prepend_bos=False, truncate=False, move_to_device=False)[0].tolist()
                  for text in documents)
        yield from pack_token_sequences(tokens, cfg.context_size, bos_token_id=bos, separator_token_id=separator,
                                        disable_concat_sequences=cfg.disable_concat_sequences)

    epoch = 0
    while True:
        produced = False
        for row in one_epoch():
            produced = True
            yield row
        if not produced:
            raise InputError(f"dataset_path: {cfg.dataset_path!r} gave no row of context_size={cfg.context_size} tokens.")
        if not cycle:
            return
        epoch += 1
        warnings.warn(f"dataset exhausted: starting epoch {epoch + 1} (tokens will be seen again).", stacklevel=2)


def excluded_token_ids(cfg: RunConfig, model) -> list[int] | None:
    from bridge.data import special_token_ids

    if cfg.exclude_special_tokens is True:
        return special_token_ids(model.tokenizer)
    if cfg.exclude_special_tokens:
        return [int(t) for t in cfg.exclude_special_tokens]
    return None


# ---------------------------------------------------------------------- the run
def prepare(cfg: RunConfig):
    """Load and check the model; return (model, cfg with the SAE's metadata filled in)."""
    from bridge.model import hook_width, load_model

    model = load_model(cfg.model_name, model_class_name=cfg.model_class_name,
                       from_pretrained_kwargs=cfg.model_from_pretrained_kwargs, device=cfg.device)
    if cfg.context_size > model.cfg.n_ctx:
        raise ConfigError(f"context_size={cfg.context_size} is larger than the model's n_ctx={model.cfg.n_ctx}.")
    sae = cfg.train.sae
    for hook in cfg.hooks:
        width = hook_width(model, hook, cfg.hook_head_index)
        if sae.d_in != width:
            field = "hook_names" if cfg.hook_names else "hook_name"
            raise ConfigError(
                f"sae.d_in={sae.d_in} contradicts the width of {hook!r} ({field}) in {cfg.model_name!r}, which is "
                f"{width}" + ("; every hook of hook_names needs the same width." if cfg.hook_names else ".")
            )
    metadata = Metadata(dict(sae.metadata) | cfg.metadata() | {"hook_name": cfg.hooks[0]})
    return model, dataclasses.replace(cfg, train=cfg.train.replace(sae=sae.replace(metadata=metadata)))


def activation_source(cfg: RunConfig, model, *, split: str | None = None, seed: int | None = None,
                      batch_size: int | None = None, cycle: bool = True):
    from bridge.activations import ActivationSource

    return ActivationSource(
        model, cfg.hook_names or cfg.hook_name, token_rows(cfg, model, split=split, cycle=cycle),
        batch_size=batch_size or cfg.train.train_batch_size_tokens, context_size=cfg.context_size,
        store_batch_size_prompts=cfg.store_batch_size_prompts, n_batches_in_buffer=cfg.n_batches_in_buffer,
        seqpos_slice=cfg.seqpos_slice, exclude_token_ids=excluded_token_ids(cfg, model),
        hook_head_index=cfg.hook_head_index, dtype="float32", seed=cfg.train.seed if seed is None else seed,
        fused_forward=cfg.fused_forward,
    )


def run(cfg: RunConfig):
    """Train the configured SAE(s), evaluating on held-out rows along the way.

    Returns (sae, summary dict) for one SAE; (list of SAEs, summary with one row per SAE) for a
    sweep or several hook points.
    """
    import jsae

    if cfg.train is None:
        raise ConfigError("the run config has no training settings (an 'sae' section and total_training_tokens).")
    model, cfg = prepare(cfg)
    if cfg.hook_names or cfg.sweep:
        return run_many(cfg, model)
    if cfg.activation_cache_path is not None:
        from bridge.cache import CachedActivations

        source = CachedActivations(cfg.activation_cache_path, cfg.hook_name, cfg.train.train_batch_size_tokens,
                                   seed=cfg.train.seed)
    else:
        source = activation_source(cfg, model)
    sae = jsae.Trainer(cfg.train).fit(source, evaluator=make_evaluator(cfg, model), batch_dtype="float32")
    summary = sae_summary(sae)
    if cfg.train.output_path is not None:
        from jsae.plots import write_run_plots

        summary["plots"] = [str(p) for p in write_run_plots(cfg.train.output_path, sae, cfg.train.log_path)]
    return sae, summary


def sae_summary(sae) -> dict[str, Any]:
    summary = dict(sae.cfg.metadata.eval_metrics or {})
    summary["dead_features"] = int(sae.cfg.metadata.num_dead_features or 0)
    summary["dead_fraction"] = summary["dead_features"] / sae.cfg.d_sae
    return summary


def stacked_hooks(source, hooks: list[str]):
    """Dict batches {hook: (tokens, d_in)} from one forward -> one (n_hooks, tokens, d_in) array each."""
    import jax.numpy as jnp

    batches = iter(source)  # starts the source's producer thread now, not at the first batch
    return (jnp.stack([jnp.asarray(batch[h]) for h in hooks]) for batch in batches)


def run_many(cfg: RunConfig, model):
    """Several hook points and/or a sweep: one model forward feeds every SAE; one folder per SAE."""
    import jsae
    from jsae.training.sweep import Sweep, member_name, sweep_configs

    axes = dict(cfg.sweep)
    members, names, streams = [], [], []
    for stream, hook in enumerate(cfg.hooks):
        sae_cfg = cfg.train.sae.replace(metadata=cfg.train.sae.metadata.replace(hook_name=hook))
        for i, member in enumerate(sweep_configs(cfg.train.replace(sae=sae_cfg), axes)):
            members.append(member)
            streams.append(stream)
            names.append("/".join(([hook] if cfg.hook_names else []) + ([member_name(axes, i)] if axes else [])))
    if cfg.activation_cache_path is not None:
        from bridge.cache import CachedActivations

        per_hook = {hook: CachedActivations(cfg.activation_cache_path, hook, cfg.train.train_batch_size_tokens,
                                            seed=cfg.train.seed) for hook in cfg.hooks}
        if cfg.hook_names:  # same seed, same shuffle: the hooks' batches stay aligned token by token
            source = (dict(zip(per_hook, parts, strict=True)) for parts in zip(*per_hook.values(), strict=False))
        else:
            source = per_hook[cfg.hook_name]
    else:
        source = activation_source(cfg, model)
    batches = stacked_hooks(source, cfg.hooks) if cfg.hook_names else source
    sweep = Sweep(members=tuple(members), names=tuple(names), streams=tuple(streams) if cfg.hook_names else ())
    saes = jsae.Trainer(cfg.train, sweep=sweep).fit(batches, evaluator=make_evaluator(cfg, model),
                                                    batch_dtype="float32")
    rows = []
    for name, member, sae in zip(names, members, saes, strict=True):
        row = {"name": name, "hook_name": sae.cfg.metadata.hook_name}
        row |= {field: _field_value(member, field) for field in axes}
        row |= sae_summary(sae)
        rows.append(row)
    summary = {"saes": rows}
    if cfg.train.output_path is not None:
        summary["table"] = str(write_summary_table(cfg.train.output_path, rows, list(axes)))
    return saes, summary


def _field_value(cfg, field: str):
    return getattr(cfg.sae, field[4:]) if field.startswith("sae.") else getattr(cfg, field)


SUMMARY_COLUMNS = (("l0", "L0", ".1f"), ("explained_variance", "explained variance", ".3f"),
                   ("dead_features", "dead", "d"), ("ce_loss_score", "CE loss score", ".3f"))


def summary_table(rows: list[dict], axes: list[str]) -> str:
    """A markdown table of the run's SAEs: name, hook, swept fields, L0, explained variance, dead, CE loss score."""
    header = ["SAE", "hook", *axes, *(title for _, title, _ in SUMMARY_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"], row["hook_name"], *(str(row[a]) for a in axes)]
        cells += [format(row[key], fmt) if row.get(key) is not None else "—" for key, _, fmt in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary_table(output_path: str, rows: list[dict], axes: list[str]) -> Path:
    """<output_path>/summary.md (the table) and summary.json (every metric of every SAE)."""
    import json

    folder = Path(output_path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(rows, indent=1))
    (folder / "summary.md").write_text(summary_table(rows, axes))
    return folder / "summary.md"


def heldout_split(cfg: RunConfig) -> str:
    return "heldout" if cfg.dataset_path in ("stdlib", "embedded") else cfg.dataset_split


def eval_token_batches(cfg: RunConfig, model, n_batches: int | None = None) -> list:
    """`n_eval_batches` batches of `eval_batch_size_prompts` held-out token rows (fewer if the data runs out)."""
    import torch

    n_batches = cfg.n_eval_batches if n_batches is None else n_batches
    rows_per_batch = cfg.eval_batch_size_prompts or cfg.store_batch_size_prompts
    rows = token_rows(cfg, model, split=heldout_split(cfg), cycle=False)
    batches = []
    for _ in range(n_batches):
        chunk = list(itertools.islice(rows, rows_per_batch))
        if len(chunk) < rows_per_batch:
            break
        batches.append(torch.tensor(chunk, device=cfg.device))
    if not batches:
        raise InputError(f"dataset_path: {cfg.dataset_path!r} has fewer than {rows_per_batch} held-out rows of "
                         f"context_size={cfg.context_size} for evals; lower eval_batch_size_prompts.")
    return batches


def eval_ignored_tokens(cfg: RunConfig, model) -> list[int] | bool:
    """Tokens the evals ignore: the run's exclude_special_tokens when set, else the special tokens
    (sae_lens' run_evals default)."""
    return excluded_token_ids(cfg, model) if cfg.exclude_special_tokens else True


def eval_config(cfg: RunConfig, n_batches: int):
    """What is evaluated during training and at its end: SAELens' training evals, plus KL."""
    from jsae.evals import EvalConfig

    return EvalConfig(n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches,
                      compute_kl=True, compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
                      compute_variance_metrics=True)


def make_evaluator(cfg: RunConfig, model):
    """evaluator(sae) -> flat metrics with the SAE spliced into `model`, on fixed held-out rows (None: evals off)."""
    if cfg.n_eval_batches == 0:
        return None
    from bridge.evals import run_evals
    from bridge.model import model_lock
    from jsae.evals import flatten_metrics

    batches = eval_token_batches(cfg, model)
    config = eval_config(cfg, len(batches))
    exclude = eval_ignored_tokens(cfg, model)

    def evaluator(sae) -> dict[str, float]:
        with model_lock(model):  # the activation producer thread runs the same model
            metrics, _ = run_evals(sae, model, batches, config, exclude_special_tokens=exclude,
                                   hook_name=sae.cfg.metadata.hook_name or cfg.hook_name)
        return flatten_metrics(metrics)

    return evaluator


def eval_run_config(sae, *, model_name: str | None = None, dataset_path: str | None = None,
                    hook_name: str | None = None, n_eval_batches: int = 10, eval_batch_size_prompts: int = 16,
                    context_size: int | None = None, device: str = "cpu") -> RunConfig:
    """Where to evaluate `sae`: the model, hook and data its metadata names, unless given (else the embedded default)."""
    meta = sae.cfg.metadata
    hook_name = hook_name or meta.hook_name
    if hook_name is None:
        raise ConfigError("the SAE's cfg.json names no metadata.hook_name; give the hook point (--hook NAME).")
    settings = {
        "model_name": model_name or meta.model_name or "embedded",
        "model_class_name": meta.model_class_name or "HookedTransformer",
        "model_from_pretrained_kwargs": dict(meta.model_from_pretrained_kwargs or {}),
        "hook_name": hook_name,
        "hook_head_index": meta.hook_head_index,
        "dataset_path": dataset_path or meta.dataset_path or "stdlib",
        "context_size": context_size or meta.context_size or 128,
        "n_eval_batches": n_eval_batches,
        "eval_batch_size_prompts": eval_batch_size_prompts,
        "device": device,
    }
    for key in ("prepend_bos", "sequence_separator_token", "disable_concat_sequences", "exclude_special_tokens"):
        if meta.get(key) is not None:
            settings[key] = meta.get(key)
    return RunConfig(**settings)


def evaluate_sae(sae, cfg: RunConfig, *, verbose: bool = False):
    """Every SAELens eval of `sae` on `cfg`'s model and held-out data: (grouped metrics, per-latent metrics).

    Raises ConfigError when the hook is not in the model or its width is not the SAE's d_in.
    """
    import contextlib
    import sys

    import numpy as np

    from bridge.evals import run_evals
    from bridge.model import hook_width, load_model
    from jsae.evals import EvalConfig

    with contextlib.redirect_stdout(sys.stderr):  # loaders that print must not mix with --json output
        model = load_model(cfg.model_name, model_class_name=cfg.model_class_name,
                           from_pretrained_kwargs=cfg.model_from_pretrained_kwargs, device=cfg.device)
    width = hook_width(model, cfg.hook_name, cfg.hook_head_index)
    if width != sae.cfg.d_in:
        raise ConfigError(f"the SAE's d_in={sae.cfg.d_in} does not match {cfg.hook_name!r} of {cfg.model_name!r}, "
                          f"whose activations have width {width}; evaluate it on the model it was trained on (--model).")
    if cfg.context_size > model.cfg.n_ctx:
        raise ConfigError(f"context_size={cfg.context_size} is larger than the model's n_ctx={model.cfg.n_ctx}.")
    batches = eval_token_batches(cfg, model)
    n = len(batches)
    metrics, features = run_evals(sae, model, batches, EvalConfig.everything(
        n_eval_reconstruction_batches=n, n_eval_sparsity_variance_batches=n),
        exclude_special_tokens=eval_ignored_tokens(cfg, model),
        hook_name=cfg.hook_name, verbose=verbose)
    density = np.asarray(features["feature_density"])
    metrics["features"] = {
        "dead_features": int(np.sum(density == 0)),
        "dead_fraction": float(np.mean(density == 0)),
        "mean_log10_feature_density": float(np.mean(np.log10(density + 1e-10))),
        "mean_encoder_decoder_cosine_sim": float(np.mean(features["encoder_decoder_cosine_sim"])),
    }
    return metrics, features
