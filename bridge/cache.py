"""An on-disk activation cache: `jsae cache` writes a run's activations once, training reads them.

Layout of a cache folder:
    cache.json              what was cached (model, hooks, widths, dataset settings, shard list);
                            written last, so a folder without it is an unfinished cache
    shard_00000.safetensors one tensor per hook (tokens, width), "token_ids" (tokens,) and
                            "chunk_lengths": the tokens of each model forward in the shard

The cache holds the stream in model order; the reader feeds it through the same shuffle buffer
as live training, forward by forward, so a run from the cache sees exactly the batches the live
run sees with the same seed. The whole folder is built under a temporary name and renamed into
place at the end: a killed caching run leaves nothing that loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jsae import FormatError, MissingFileError

CACHE_FORMAT = "jsae-activation-cache-v1"
META_FILENAME = "cache.json"


def write_cache(cfg, model, path: str | os.PathLike, *, n_tokens: int, shard_tokens: int = 1 << 20) -> dict:
    """Run the model over the configured dataset and store `n_tokens` activations (at least)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from bridge.sources import activation_source

    path = Path(path)
    if path.exists():
        raise FormatError(f"{path}: already exists; remove it or choose another cache path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    source = activation_source(cfg, model, cycle=False)
    shards: list[dict[str, Any]] = []
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending_tokens = total = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        if not pending:
            return
        acts = torch.cat([a for a, _ in pending])
        tensors = {"token_ids": torch.cat([t for _, t in pending]).to(torch.int32),
                   "chunk_lengths": torch.tensor([a.shape[0] for a, _ in pending], dtype=torch.int64)}
        start = 0
        for name, width in zip(source.hook_names, source.widths, strict=True):
            tensors[name] = acts[:, start : start + width].contiguous()
            start += width
        name = f"shard_{len(shards):05d}.safetensors"
        save_file(tensors, str(tmp / name))
        shards.append({"file": name, "tokens": int(acts.shape[0]), "chunks": len(pending)})
        pending, pending_tokens = [], 0

    try:
        with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="Caching activations") as bar:
            for tokens in source._rows():
                acts = source.model_activations(tokens)
                ids = tokens[:, source.seqpos].reshape(-1)
                if source.exclude is not None:
                    ids = ids[~torch.isin(ids, source.exclude)]
                pending.append((acts.cpu(), ids.cpu()))
                pending_tokens += acts.shape[0]
                total += acts.shape[0]
                bar.update(acts.shape[0])
                if pending_tokens >= shard_tokens:
                    flush()
                if total >= n_tokens:
                    break
            flush()
        meta = {
            "format": CACHE_FORMAT,
            "hook_names": source.hook_names,
            "widths": source.widths,
            "dtype": str(source.dtype).replace("torch.", ""),
            "n_tokens": total,
            "n_shards": len(shards),
            "shards": shards,
            "run": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "train"} | {
                "store_batch_size_prompts": cfg.store_batch_size_prompts},
            "sae_metadata": dict(cfg.train.sae.metadata),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / META_FILENAME).write_text(json.dumps(meta, indent=2, default=str))
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_cache_meta(path: str | os.PathLike) -> dict:
    """The cache's metadata, after checking every shard it lists is there with the right size."""
    path = Path(path)
    meta_path = path / META_FILENAME
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such activation cache folder.")
    if not meta_path.is_file():
        raise FormatError(
            f"{path}: no {META_FILENAME}; this is not a finished jsae activation cache (a caching run that was "
            "stopped leaves none). Run `jsae cache` again."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise FormatError(f"{meta_path}: not valid JSON ({err}).") from err
    if meta.get("format") != CACHE_FORMAT:
        raise FormatError(f"{meta_path}: format {meta.get('format')!r}, expected {CACHE_FORMAT!r}.")
    for shard in meta["shards"]:
        if not (path / shard["file"]).is_file():
            raise FormatError(f"{path / shard['file']}: listed in {META_FILENAME} but missing; the cache is damaged.")
    return meta


TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
                "I32": torch.int32}


def mapped_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as read-only views of the memory-mapped file: no copy (the shuffle
    buffer copies what it keeps). Layout: an 8-byte little-endian header length, the JSON header
    (dtype, shape, data_offsets per tensor), then the data."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
        end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
        if data.shape[0] != end:
            raise ValueError(f"{data.shape[0]} bytes of data, the header describes {end}")
        out = {}
        with warnings.catch_warnings():  # read-only views: nothing writes to them
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            for name in names:
                entry = header[name]
                start, stop = entry["data_offsets"]
                raw = torch.from_numpy(data[start:stop])
                out[name] = raw.view(TORCH_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        return out
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as err:
        raise FormatError(f"{path}: not a readable cache shard, truncated or corrupt ({type(err).__name__}: {err}).") \
            from err


class CachedActivations:
    """Training batches from a cache, through the same shuffle buffer as live activations.

    Args:
        path: the cache folder.
        hook_name: which cached hook to serve.
        batch_size: tokens per batch.
        seed: shuffle seed (the live run's `seed` gives the live run's batches).
        capacity: shuffle-buffer size in tokens (default: as the live run computes it from the
            cached run's store_batch_size_prompts and n_batches_in_buffer).
        as_jax: yield jax.Arrays (zero copy from the buffer).
        keep_fraction: the shuffle buffer's kept fraction (the run's activations_mixing_fraction).
    """

    def __init__(self, path, hook_name: str, batch_size: int, *, seed: int = 0, capacity: int | None = None,
                 as_jax: bool = True, keep_fraction: float = 0.5):
        self.path = Path(path)
        self.meta = read_cache_meta(self.path)
        if hook_name not in self.meta["hook_names"]:
            raise FormatError(f"{self.path}: has no activations for {hook_name!r} (it holds {self.meta['hook_names']}).")
        self.hook_name = hook_name
        self.batch_size = batch_size
        self.seed = seed
        run = self.meta["run"]
        seqpos = slice(*run.get("seqpos_slice", (None,)))
        context = len(range(run["context_size"])[seqpos])
        self.capacity = capacity or max(run["n_batches_in_buffer"] * run["store_batch_size_prompts"] * context,
                                        2 * batch_size)
        self.as_jax = as_jax
        self.keep_fraction = keep_fraction

    @property
    def d_in(self) -> int:
        return self.meta["widths"][self.meta["hook_names"].index(self.hook_name)]

    def chunks(self) -> Iterator[torch.Tensor]:
        """The cached stream, one model forward at a time, forever (epochs repeat)."""
        while True:
            for shard in self.meta["shards"]:
                tensors = mapped_tensors(self.path / shard["file"], [self.hook_name, "chunk_lengths"])
                acts = tensors[self.hook_name]
                if acts.shape[0] != shard["tokens"]:
                    raise FormatError(f"{self.path / shard['file']}: {acts.shape[0]} tokens, expected {shard['tokens']}.")
                start = 0
                for length in tensors["chunk_lengths"].tolist():
                    yield acts[start : start + length]
                    start += length

    def __iter__(self):
        from bridge.activations import ShuffleBuffer
        from bridge.dlpack import torch_to_jax

        buffer = ShuffleBuffer(self.capacity, self.batch_size, seed=self.seed, keep_fraction=self.keep_fraction)
        for chunk in self.chunks():
            for batch in buffer.add(chunk):
                yield torch_to_jax(batch) if self.as_jax else batch
