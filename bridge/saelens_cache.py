"""SAELens activation caches: read one as training batches, write one that sae_lens trains from.

Layout (sae_lens.cache_activations_runner.CacheActivationsRunner, read by
sae_lens.training.activations_store.ActivationsStore.load_cached_activation_dataset): a Hugging Face
`datasets` folder as `Dataset.save_to_disk` leaves it (dataset_info.json, state.json,
data-NNNNN-of-MMMMM.arrow), one row per context row of the model:
    <hook_name>   Array2D(shape=(context, d_in), dtype) - the hook's activations at the row's kept
                  positions (context = len(range(context_size)[seqpos_slice]))
    token_ids     Sequence(int32, length=context) - the row's token ids at those positions (optional)
Every position of a row is stored: special tokens are excluded when the cache is read, by
`token_ids`. sae_lens reads `store_batch_size_prompts` rows per model batch, dropping the rows of
an epoch's last, incomplete slice, and feeds them to its mixing buffer; jsae reads the same slices
into its shuffle buffer, so a cache jsae writes serves the batches of the live run with the same
seed.

jsae's own cache (bridge.cache) stays the default of `jsae cache`: one safetensors file per shard,
read without a format conversion (bench/cache_formats.py compares the two).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bridge.cache import META_FILENAME, CachedActivations
from jsae import ConfigError, FormatError, MissingFileError

if TYPE_CHECKING:
    from bridge.run_config import RunConfig

STATE_FILENAME = "state.json"  # datasets.config.DATASET_STATE_JSON_FILENAME
INFO_FILENAME = "dataset_info.json"  # datasets.config.DATASET_INFO_FILENAME
TOKEN_COLUMN = "token_ids"
CACHE_FORMATS = ("jsae", "saelens")


def cache_format(path: str | os.PathLike) -> str:
    """'jsae' (a folder with cache.json) or 'saelens' (a `datasets` folder); an error naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such activation cache folder.")
    if (path / META_FILENAME).is_file():
        return "jsae"
    if (path / STATE_FILENAME).is_file() and (path / INFO_FILENAME).is_file():
        return "saelens"
    raise FormatError(
        f"{path}: not a finished jsae activation cache (no {META_FILENAME}; a caching run that was stopped leaves "
        f"none) nor a SAELens one (a datasets folder with {STATE_FILENAME} and {INFO_FILENAME}). Run `jsae cache` again."
    )


def sliced_context(cfg: RunConfig) -> int:
    """Positions kept from each row: what one cached row holds."""
    return len(range(cfg.context_size)[slice(*cfg.seqpos_slice)])


def cached_activations(cfg: RunConfig, hook_name: str, model=None) -> CachedActivations:
    """The reader of `cfg.activations_cache` for `hook_name`, whichever layout the folder has.

    `model` gives the tokenizer's special tokens when `exclude_special_tokens: true` (a SAELens
    cache excludes them as it is read; jsae's cache holds none).
    """
    path, batch, seed = cfg.activations_cache, cfg.train.train_batch_size_tokens, cfg.train.seed
    keep = cfg.activations_mixing_fraction
    if cache_format(path) == "jsae":
        return CachedActivations(path, hook_name, batch, seed=seed, keep_fraction=keep)
    from bridge.data import excluded_token_ids

    excluded = None
    if cfg.exclude_special_tokens is True and model is None:
        raise ConfigError("exclude_special_tokens: true needs the model's tokenizer to read a SAELens cache.")
    if cfg.exclude_special_tokens:
        excluded = excluded_token_ids(cfg, model)
    rows = cfg.store_batch_size_prompts
    return SAELensCachedActivations(
        path, hook_name, batch, rows_per_chunk=rows, context=sliced_context(cfg), seed=seed,
        capacity=max(cfg.n_batches_in_buffer * rows * sliced_context(cfg), 2 * batch),
        exclude_token_ids=excluded, dtype=cfg.activations_dtype, keep_fraction=keep)


def cached_dtype(cfg: RunConfig) -> str:
    """The dtype of the batches a cache serves: what jsae's cache holds, activations_dtype for SAELens'."""
    if cache_format(cfg.activations_cache) == "jsae":
        from bridge.cache import read_cache_meta

        return read_cache_meta(cfg.activations_cache).get("dtype", "float32")
    return cfg.activations_dtype


class SAELensCachedActivations(CachedActivations):
    """Training batches from a SAELens cache, through jsae's shuffle buffer (see the module docstring).

    Args:
        path: the cache folder.
        hook_name: the column to serve.
        batch_size: tokens per batch.
        rows_per_chunk: rows per slice (SAELens' store_batch_size_prompts).
        context: tokens per row the run expects (context_size after seqpos_slice); checked against the cache.
        seed: shuffle seed.
        capacity: shuffle-buffer size in tokens.
        exclude_token_ids: activations of these tokens are dropped (needs the token_ids column).
        dtype: "float32" or "bfloat16": the dtype of the batches.
        as_jax: yield jax.Arrays (zero copy from the buffer).
        keep_fraction: the shuffle buffer's kept fraction (the run's activations_mixing_fraction).
    """

    def __init__(self, path, hook_name: str, batch_size: int, *, rows_per_chunk: int, context: int,
                 seed: int = 0, capacity: int, exclude_token_ids=None, dtype: str = "float32", as_jax: bool = True,
                 keep_fraction: float = 0.5):
        import datasets

        self.path = Path(path)
        if cache_format(self.path) != "saelens":
            raise FormatError(f"{self.path}: not a SAELens activation cache.")
        try:
            self.dataset = datasets.load_from_disk(str(self.path))
        except Exception as err:  # datasets' many errors: name the folder
            raise FormatError(f"{self.path}: cannot be read as a datasets folder ({type(err).__name__}: {err}).") from err
        features = self.dataset.features
        if hook_name not in features:
            raise FormatError(f"{self.path}: has no column {hook_name!r} (it holds {sorted(features)}); the cache was "
                              "written for another hook_name.")
        shape = tuple(getattr(features[hook_name], "shape", ()))
        if len(shape) != 2 or shape[0] != context:
            raise FormatError(f"{self.path}: column {hook_name!r} holds rows of shape {shape}, expected ({context}, "
                              "d_in): context_size / seqpos_slice differ from the run that wrote the cache.")
        if exclude_token_ids is not None and TOKEN_COLUMN not in features:
            raise ConfigError(f"exclude_special_tokens: {self.path} has no {TOKEN_COLUMN!r} column, so special tokens "
                              "cannot be excluded; set exclude_special_tokens: false or cache with token ids.")
        if len(self.dataset) < rows_per_chunk:
            raise FormatError(f"{self.path}: {len(self.dataset)} rows, fewer than store_batch_size_prompts="
                              f"{rows_per_chunk} (one model batch).")
        self.hook_name, self.batch_size, self.seed, self.capacity = hook_name, batch_size, seed, capacity
        self.rows_per_chunk, self.context, self._d_in = rows_per_chunk, context, shape[1]
        self.exclude = None if exclude_token_ids is None else torch.tensor(list(exclude_token_ids), dtype=torch.long)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.as_jax, self.keep_fraction = as_jax, keep_fraction

    @property
    def d_in(self) -> int:
        return self._d_in

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(activations (rows, context, d_in), token ids (rows, context) or None) of rows [start, stop)."""
        if self.dataset._indices is not None:  # a shuffled view: let datasets gather the rows
            part = self.dataset.with_format("numpy")[start:stop]
            return part[self.hook_name], part.get(TOKEN_COLUMN)
        table = self.dataset.data.table.slice(start, stop - start)
        acts = _flat_values(table.column(self.hook_name), storage=True).reshape(stop - start, self.context, self._d_in)
        ids = None
        if TOKEN_COLUMN in table.column_names:
            ids = _flat_values(table.column(TOKEN_COLUMN), storage=False).reshape(stop - start, self.context)
        return acts, ids

    def chunks(self) -> Iterator[torch.Tensor]:
        """The cache's rows, `rows_per_chunk` at a time and flattened to (tokens, d_in), forever."""
        n, step = len(self.dataset), self.rows_per_chunk
        while True:
            for start in range(0, n - step + 1, step):
                acts, ids = self.rows(start, start + step)
                with warnings.catch_warnings():  # read-only memory map; the shuffle buffer copies out of it
                    warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                    acts = torch.from_numpy(np.ascontiguousarray(acts)).reshape(-1, self._d_in)
                if self.exclude is not None:
                    acts = acts[~torch.isin(torch.from_numpy(np.asarray(ids, np.int64)).reshape(-1), self.exclude)]
                yield acts.to(self.dtype)


def _flat_values(column, *, storage: bool) -> np.ndarray:
    """The values of a (chunked) list column as one flat numpy array: zero copy from the memory-mapped
    file where the rows lie in one record batch. `storage`: the column is an Array2D extension column."""
    parts = []
    for chunk in column.chunks:
        values = chunk.storage if storage else chunk
        while hasattr(values, "flatten"):  # list<list<x>> (Array2D) or fixed_size_list<x> (Sequence)
            values = values.flatten()
        parts.append(values.to_numpy(zero_copy_only=False))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# ------------------------------------------------------------------------------- writing
def _features(hook_names: list[str], widths: list[int], context: int, dtype: str):
    from datasets import Array2D, Features, Sequence, Value

    columns = {name: Array2D(shape=(context, width), dtype=dtype) for name, width in zip(hook_names, widths,
                                                                                           strict=True)}
    columns[TOKEN_COLUMN] = Sequence(Value("int32"), length=context)
    return Features(columns)


def _table(features, acts: torch.Tensor, ids: torch.Tensor, hook_names: list[str], widths: list[int], context: int):
    """One forward's rows as an arrow table of `features` (built from the arrays' buffers, no per-row encoding)."""
    import pyarrow as pa

    n_rows = ids.shape[0]
    acts = acts.reshape(n_rows, context, -1).numpy()
    columns, start = {}, 0
    for name, width in zip(hook_names, widths, strict=True):
        values = pa.array(np.ascontiguousarray(acts[:, :, start : start + width]).reshape(-1))
        inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n_rows * context * width + 1, width, dtype=np.int32)),
                                         values)
        outer = pa.ListArray.from_arrays(pa.array(np.arange(0, n_rows * context + 1, context, dtype=np.int32)), inner)
        columns[name] = pa.ExtensionArray.from_storage(features.arrow_schema.field(name).type, outer)
        start += width
    columns[TOKEN_COLUMN] = pa.FixedSizeListArray.from_arrays(pa.array(ids.numpy().astype(np.int32).reshape(-1)),
                                                             context)
    return pa.table(columns, schema=features.arrow_schema)


def write_saelens_cache(cfg: RunConfig, model, path: str | os.PathLike, *, n_tokens: int,
                        shard_tokens: int = 1 << 20) -> dict:
    """Run the model over the configured dataset and store at least `n_tokens` activations (whole
    rows of every hook of the run) as a SAELens cache; built under a temporary name, renamed at the end."""
    from datasets import DatasetInfo, load_from_disk
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    from bridge.sources import activation_source

    path = Path(path)
    if cfg.activations_dtype not in ("float32",):
        raise ConfigError(f"activations_dtype: a SAELens cache holds float32 activations here (arrow has no "
                          f"{cfg.activations_dtype}); cache with activations_dtype: float32 or with --format jsae.")
    if path.exists():
        raise FormatError(f"{path}: already exists; remove it or choose another cache path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    # every position is stored; exclude_special_tokens applies when the cache is read
    source = activation_source(dataclasses.replace(cfg, exclude_special_tokens=False), model, cycle=False)
    context = sliced_context(cfg)
    features = writer = None
    files: list[str] = []
    total = in_file = rows = 0
    try:
        with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="Caching activations") as bar:
            for tokens in source._rows():
                acts = source.model_activations(tokens).cpu()
                ids = tokens[:, source.seqpos].cpu()
                if features is None:
                    features = _features(source.hook_names, source.widths, context, "float32")
                if writer is None:
                    files.append(f"part-{len(files):05d}.arrow")
                    writer = ArrowWriter(features=features, path=str(tmp / files[-1]))
                writer.write_table(_table(features, acts, ids, source.hook_names, source.widths, context))
                total += acts.shape[0]
                in_file += acts.shape[0]
                rows += ids.shape[0]
                bar.update(acts.shape[0])
                if in_file >= shard_tokens or total >= n_tokens:
                    writer.finalize()
                    writer.close()
                    writer, in_file = None, 0
                if total >= n_tokens:
                    break
        if writer is not None:
            writer.finalize()
            writer.close()
        if not files:
            raise FormatError(f"{path}: the dataset gave no rows to cache.")
        names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
        for old, new in zip(files, names, strict=True):
            os.rename(tmp / old, tmp / new)
        DatasetInfo(features=features).write_to_directory(str(tmp))
        state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": uuid.uuid4().hex[:16],
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": None}
        (tmp / STATE_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True))
        if len(load_from_disk(str(tmp))) != rows:  # what sae_lens will open
            raise FormatError(f"{tmp}: the written cache does not hold the {rows} rows written.")
        os.rename(tmp, path)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": "saelens", "hook_names": source.hook_names, "widths": source.widths, "n_tokens": total,
            "n_rows": rows, "n_shards": len(files)}
