"""Activations from a running model, shuffled, handed to JAX without copies.

Pipeline (all torch, in a background thread so the model forward overlaps the JAX step):
token rows -> a forward that stops once the last hook has fired -> (tokens, d_in) per hook
(hook_z heads flattened, `seqpos_slice` and special-token exclusion applied) -> a shuffle
buffer -> batches, each a contiguous view of a freshly permuted tensor -> DLPack -> jax.Array.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from bridge import fused_forward
from bridge.dlpack import torch_to_jax
from bridge.model import check_hook, model_lock, stop_layer
from jsae import ConfigError, InputError

_DONE = object()


class _AllHooksFired(Exception):
    """Ends a forward early: every hook the source reads has fired, the rest is not needed."""


def store_placement(act_store_device: str, model_device: str) -> tuple[str | None, bool]:
    """(the device activations are moved to before the shuffle buffer, None: where they are; whether the
    buffer is page-locked) for SAELens' act_store_device: "with_model" keeps them on the model's device,
    "cpu" moves them to host memory, page-locked when they come from CUDA."""
    if act_store_device == "with_model":
        return None, False
    if act_store_device == "cpu":
        return "cpu", str(model_device).startswith("cuda")
    raise ConfigError(f"act_store_device must be 'with_model' or 'cpu', got {act_store_device!r}.")


class ShuffleBuffer:
    """Mixes tokens from many rows and documents; every token is served exactly once.

    The buffer fills to `capacity` tokens, is permuted, and serves all but `int(capacity *
    keep_fraction)` of them as batches (at least one batch); the kept tokens stay to be mixed with
    the next refill. This is SAELens' mixing_buffer (sae_lens/training/mixing_buffer.py) with
    keep_fraction its activations_mixing_fraction: 0 permutes nothing and serves the tokens in
    the order they came. A batch is a contiguous slice of a newly allocated permuted tensor, so handing it
    to JAX by DLPack shares memory and nothing later writes to it.

    Incoming activations are copied into one of two preallocated stores, and each refill
    gathers (`index_select`) the served tokens into a new tensor and the kept ones into the
    other store: no concatenation, and the only fresh memory is what gets served.
    """

    def __init__(self, capacity: int, batch_size: int, *, keep_fraction: float = 0.5, seed: int = 0,
                 pin_memory: bool = False):
        if capacity < 2 * batch_size:
            raise ConfigError(
                f"shuffle buffer: capacity ({capacity} tokens) must be at least twice the batch "
                f"({batch_size} tokens); raise n_batches_in_buffer."
            )
        if not 0 <= keep_fraction <= 1:
            raise ConfigError(f"activations_mixing_fraction must be in [0, 1], got {keep_fraction}.")
        self.capacity = capacity
        self.batch_size = batch_size
        self.keep = int(capacity * keep_fraction)
        self.shuffles = keep_fraction > 0
        self.generator = torch.Generator().manual_seed(seed)
        self.pin_memory = pin_memory  # host stores and served batches in page-locked memory (CUDA copies)
        self.pending_tokens = 0  # tokens in the store, waiting to be served
        self._store: torch.Tensor | None = None
        self._spare: torch.Tensor | None = None

    def _make_room(self, activations: torch.Tensor) -> None:
        needed = self.pending_tokens + activations.shape[0]
        store = self._store
        if store is not None and (store.shape[1:] != activations.shape[1:] or store.dtype != activations.dtype
                                  or store.device != activations.device):
            raise InputError(
                f"shuffle buffer: activations of shape {tuple(activations.shape[1:])}, {activations.dtype} on "
                f"{activations.device} after ones of {tuple(store.shape[1:])}, {store.dtype} on {store.device}."
            )
        if store is not None and store.shape[0] >= needed:
            return
        rows = max(needed, self.capacity + activations.shape[0])
        grown = self._empty((rows, *activations.shape[1:]), activations)
        if store is not None:
            grown[: self.pending_tokens] = store[: self.pending_tokens]
        self._store, self._spare = grown, self._empty(grown.shape, activations)

    def _empty(self, shape, like: torch.Tensor) -> torch.Tensor:
        if self.pin_memory and like.device.type == "cpu":
            return torch.empty(shape, dtype=like.dtype, pin_memory=True)
        return like.new_empty(shape)

    def add(self, activations: torch.Tensor) -> Iterator[torch.Tensor]:
        """Add (tokens, width) activations; yield the batches that became ready."""
        self._make_room(activations)
        start = self.pending_tokens
        self._store[start : start + activations.shape[0]] = activations
        self.pending_tokens = n = start + activations.shape[0]
        if n < self.capacity:
            return
        if self.shuffles:
            order = torch.randperm(n, generator=self.generator).to(self._store.device)
        else:
            order = torch.arange(n, device=self._store.device)
        n_serve = max(1, (n - self.keep) // self.batch_size) * self.batch_size
        stored = self._store[:n]
        served = torch.index_select(stored, 0, order[:n_serve], out=self._empty((n_serve, *stored.shape[1:]), stored))
        torch.index_select(stored, 0, order[n_serve:], out=self._spare[: n - n_serve])
        self._store, self._spare = self._spare, self._store
        self.pending_tokens = n - n_serve
        for start in range(0, n_serve, self.batch_size):
            yield served[start : start + self.batch_size]


class ActivationSource:
    """An endless, reproducible stream of activation batches for `jsae.train`.

    Args:
        model: a HookedTransformer, or a bridge.hf_model.HookedHFModel.
        hook_names: one or several hook points; several give dict batches (one forward for all).
        joined: several hooks' activations side by side in one (tokens, sum of widths) array per batch
            instead of a dict (a transcoder's input and target: rows of the buffer, shuffled as one).
        token_rows: an iterator of token rows, each `context_size` ids (see bridge.data).
        batch_size: tokens per yielded batch.
        context_size: tokens per row (default: the model's n_ctx); sizes the shuffle buffer.
        store_batch_size_prompts: rows per model forward.
        n_batches_in_buffer: shuffle-buffer capacity in model forwards (rows x context).
        seqpos_slice: positions kept from each row (SAELens' seqpos_slice).
        exclude_token_ids: tokens whose activations are dropped (SAELens' exclude_special_tokens).
        hook_head_index: keep one head of an attention hook.
        dtype: activation dtype handed to JAX ("float32", "bfloat16").
        seed: shuffle seed.
        prefetch: ready batches the background thread may hold.
        as_jax: yield jax.Arrays (DLPack, zero copy); False yields the torch tensors.
        device: the torch device the token rows go to (default: the model's).
        act_store_device: where the shuffle buffer lives: "with_model" (the device the activations come
            from) or "cpu" (page-locked host memory when the model is on CUDA, so the copies out of the GPU
            are DMA transfers).
        activations_mixing_fraction: the shuffle buffer's kept fraction (see `ShuffleBuffer`).
        autocast_lm: run the model's forward under torch.autocast in bfloat16.
        fused_forward: run the model's blocks, attention and MLPs as fused forwards where nothing
            reads what they skip (see bridge.fused_forward); False runs TransformerLens' forward
            as written.
    """

    def __init__(
        self,
        model,
        hook_names: str | Sequence[str],
        token_rows: Iterator[Sequence[int]],
        *,
        batch_size: int,
        context_size: int | None = None,
        store_batch_size_prompts: int = 16,
        n_batches_in_buffer: int = 32,
        seqpos_slice: Sequence[int | None] = (None,),
        exclude_token_ids: Sequence[int] | None = None,
        hook_head_index: int | None = None,
        dtype: str = "float32",
        seed: int = 0,
        prefetch: int = 4,
        as_jax: bool = True,
        device: str | None = None,
        fused_forward: bool = True,
        act_store_device: str = "with_model",
        joined: bool = False,
        activations_mixing_fraction: float = 0.5,
        autocast_lm: bool = False,
    ):
        self.single = isinstance(hook_names, str)
        self.joined = joined
        self.hook_names = [hook_names] if self.single else list(hook_names)
        for name in self.hook_names:
            check_hook(model, name)
        self.model = model
        self.token_rows = token_rows
        self.batch_size = batch_size
        self.store_batch_size_prompts = store_batch_size_prompts
        self.seqpos = slice(*seqpos_slice)
        self.exclude = None if not exclude_token_ids else torch.tensor(list(exclude_token_ids), dtype=torch.long)
        self.hook_head_index = hook_head_index
        self.fused_forward = fused_forward
        self.autocast_lm = autocast_lm
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        context = len(range(context_size or model.cfg.n_ctx)[self.seqpos])
        capacity = max(n_batches_in_buffer * store_batch_size_prompts * context, 2 * batch_size)
        self.device = device or str(model.cfg.device)
        self.store_device, pin = store_placement(act_store_device, self.device)
        self.buffer = ShuffleBuffer(capacity, batch_size, keep_fraction=activations_mixing_fraction, seed=seed,
                                    pin_memory=pin)
        self.stop_at_layer = stop_layer(model, self.hook_names)
        self.prefetch = prefetch
        self.as_jax = as_jax
        self.widths: list[int] | None = None
        self.batches_served = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ torch side
    @torch.no_grad()
    def model_activations(self, tokens: torch.Tensor) -> torch.Tensor:
        """(rows, context) token ids -> (kept tokens, sum of hook widths), hooks side by side.

        The forward ends as soon as the last hook has fired: for blocks.L.hook_resid_pre that is
        the start of block L, which `stop_at_layer` alone (L + 1) would still run in full.
        """
        captured: dict[str, torch.Tensor] = {}
        wanted = set(self.hook_names)

        def capture(acts: torch.Tensor, hook) -> None:
            captured[hook.name] = acts
            if len(captured) == len(wanted):
                raise _AllHooksFired

        # an eval may run the same model in another thread
        # autocast_lm: the forward under torch.autocast in bfloat16 (sae_lens/training/activations_store.py)
        autocast = torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16,
                                  enabled=self.autocast_lm)
        with model_lock(self.model), fused_forward.fused_forward(self.model, self.fused_forward), autocast:
            try:
                self.model.run_with_hooks(
                    tokens.to(self.device), fwd_hooks=[(name, capture) for name in sorted(wanted)],
                    stop_at_layer=self.stop_at_layer, prepend_bos=False,
                )
            except _AllHooksFired:
                pass
        missing = wanted - set(captured)
        if missing:
            raise ConfigError(f"hook_name: {sorted(missing)} did not fire in the model's forward.")
        parts = []
        for name in self.hook_names:
            acts = captured[name][:, self.seqpos]
            if self.hook_head_index is not None:
                acts = acts[:, :, self.hook_head_index]
            parts.append(acts.reshape(acts.shape[0] * acts.shape[1], -1))
        if self.widths is None:
            self.widths = [p.shape[1] for p in parts]
        acts = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.exclude is not None:
            keep = ~torch.isin(tokens[:, self.seqpos].reshape(-1).cpu(), self.exclude)
            acts = acts[keep.to(acts.device)]
        return acts.to(self.dtype)

    def _rows(self) -> Iterator[torch.Tensor]:
        while True:
            rows = []
            for row in self.token_rows:
                rows.append(row)
                if len(rows) == self.store_batch_size_prompts:
                    break
            if not rows:
                if self.batches_served == 0 and self.buffer.pending_tokens == 0:
                    raise InputError("dataset: it produced no token rows (is it empty, or shorter than context_size?).")
                raise InputError("dataset: ran out of token rows; use a larger dataset or fewer training tokens.")
            yield torch.as_tensor(np.asarray(rows), dtype=torch.long)
            if len(rows) < self.store_batch_size_prompts:
                return

    def torch_batches(self) -> Iterator[torch.Tensor]:
        """Shuffled batches as torch tensors (the hand-off to JAX happens in `__iter__`)."""
        for tokens in self._rows():
            acts = self.model_activations(tokens)
            if self.store_device is not None:
                acts = acts.to(self.store_device)
            yield from self.buffer.add(acts)

    # ------------------------------------------------------------------ the hand-off
    def _split(self, batch: torch.Tensor) -> Any:
        if self.single or self.joined:
            return batch
        out, start = {}, 0
        for name, width in zip(self.hook_names, self.widths, strict=True):
            out[name] = batch[:, start : start + width].contiguous()  # one copy per extra hook
            start += width
        return out

    def _convert(self, batch: torch.Tensor) -> Any:
        parts = self._split(batch)
        if not self.as_jax:
            return parts
        if self.single or self.joined:
            return torch_to_jax(parts)
        return {k: torch_to_jax(v) for k, v in parts.items()}

    def _produce(self) -> None:
        try:
            for batch in self.torch_batches():
                item = self._convert(batch)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer
            self._queue.put(err)
            return
        self._queue.put(_DONE)

    def __iter__(self):
        """Batches in order. With `prefetch` the producer thread starts here, before the first `next`, so
        the caller can do other work (compile its step) while the first shuffle buffer fills."""
        if self.prefetch <= 0:
            return self._serve_inline()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop.clear()
        self._thread = threading.Thread(target=self._produce, name="jsae-activations", daemon=True)
        self._thread.start()
        return self._serve_queue()

    def _serve_inline(self):
        for batch in self.torch_batches():
            self.batches_served += 1
            yield self._convert(batch)

    def _serve_queue(self):
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.batches_served += 1
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
