"""`HookedSAETransformer` for jsae SAEs: SAELens' class of that name (its methods, arguments and
semantics, sae_lens/analysis/hooked_sae_transformer.py), with the SAE math in JAX.

An attached SAE replaces the hook point at its output hook by an `SAEWrapper` (bridge/hooked_sae.py)
whose hook points (`{hook}.hook_sae_acts_post`, ...) appear in `hook_dict`, `run_with_cache` and
`run_with_hooks`. A transcoder reads `metadata.hook_name` and writes `metadata.hook_name_out`.
Each MLP gets a `mlp.hook_in` hook point (the MLP's input), as SAELens adds for transcoders.

Where jsae differs from sae_lens 6.54: a hook the model lacks, or an SAE without
metadata.hook_name, is an error rather than a warning and a skipped SAE; resetting puts back the
model's own hook point object (its permanent hooks included) and removes only the transcoder's own
input hook; a skip transcoder's output includes its skip term x W_skip^T (sae_lens' wrapper calls
encode and decode alone). Gradients do not flow through an SAE: the SAE runs in JAX on detached
values, and a backward hook on an SAE hook point is refused.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from bridge.hooked_sae import SAEWrapper, io_hooks
from jsae import ConfigError, InputError
from jsae._errors import close_names


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _set(obj: Any, path: str, value: Any) -> None:
    head, _, last = path.rpartition(".")
    setattr(_get(obj, head) if head else obj, last, value)


def _add_hook_in(mlp: torch.nn.Module) -> None:
    """A `hook_in` point on the MLP's input (SAELens' add_hook_in_to_mlp).

    Any forward set on the instance is dropped first: in a copy made by `from_model` it would still
    call the original module.
    """
    vars(mlp).pop("forward", None)
    if not isinstance(getattr(mlp, "hook_in", None), HookPoint):
        mlp.hook_in = HookPoint()
    forward = mlp.forward
    mlp.forward = lambda x, *args, **kwargs: forward(mlp.hook_in(x), *args, **kwargs)


def _remove_hook(point: HookPoint, fn: Callable) -> None:
    """Remove the forward hook `fn` (and only it) from `point`."""
    for handle in [h for h in point.fwd_hooks if h.user_hook is fn]:
        handle.hook.remove()
        point.fwd_hooks.remove(handle)


class HookedSAETransformer(HookedTransformer):
    """A HookedTransformer to which jsae SAEs attach at their hooks (SAELens' HookedSAETransformer).

    Build one with `HookedSAETransformer.from_pretrained(name)` (TransformerLens'), its constructor,
    or `HookedSAETransformer.from_model(model)` around a HookedTransformer you already have.
    """

    def __init__(self, *model_args: Any, **model_kwargs: Any):
        super().__init__(*model_args, **model_kwargs)
        self._init_saes()

    def _init_saes(self) -> None:
        for block in self.blocks:
            if hasattr(block, "mlp"):
                _add_hook_in(block.mlp)
        self._acts_to_saes: dict[str, SAEWrapper] = {}
        self._replaced: dict[str, Any] = {}  # output hook -> the module the wrapper stands in for
        self._input_hooks: dict[str, tuple[Any, Callable]] = {}  # transcoder input hook -> (point, hook fn)
        self.setup()

    @classmethod
    def from_model(cls, model: HookedTransformer) -> HookedSAETransformer:
        """Wrap an existing HookedTransformer; its parameters, buffers, config and tokenizer are shared,
        not copied (the module objects around them are, so attaching SAEs leaves `model` untouched)."""
        if not isinstance(model, HookedTransformer):
            raise InputError(f"from_model: expected a transformer_lens HookedTransformer, got {type(model).__name__}.")
        memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
        memo[id(model.cfg)] = model.cfg
        if getattr(model, "tokenizer", None) is not None:
            memo[id(model.tokenizer)] = model.tokenizer
        new = copy.deepcopy(model, memo)
        new.__class__ = cls
        new._init_saes()
        return new

    # ------------------------------------------------------------------ attaching
    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """Input hook name -> the attached jsae SAE."""
        return {name: wrapper.sae for name, wrapper in self._acts_to_saes.items()}

    def add_sae(self, sae, use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False):
        """Attach `sae` at metadata.hook_name (a transcoder: read there, write at hook_name_out) until
        `reset_saes`; an SAE already at that hook is replaced.

        Args:
            use_error_term: add the SAE's clean error so the model computes what it did without the SAE,
                unless hooks edit the SAE (None: False; jsae SAEs carry no use_error_term of their own).
            exclude_special_tokens: bypass the SAE at the tokenizer's special tokens (True) or at the given ids.
        """
        read, write = io_hooks(sae)
        writes = self._writes()
        own = writes.pop(read, None)  # the output hook of the SAE this one replaces
        taken = set(writes.values())
        for role, name in (("metadata.hook_name", read), ("metadata.hook_name_out", write)):
            if name not in self.hook_dict and name not in taken and name != own:
                raise ConfigError(f"{role}: the model has no hook {name!r}." + close_names(name, self.hook_dict))
        if write in taken:
            raise ConfigError(f"metadata.hook_name_out: {write!r} is already written by another attached SAE.")
        if own is not None:
            self._reset_sae(read)
        wrapper = SAEWrapper(sae, use_error_term=bool(use_error_term), exclude_special_tokens=exclude_special_tokens)
        if read != write:
            def capture(tensor, hook=None):
                wrapper.capture_input(tensor)

            self._input_hooks[read] = (None, capture)
            self._place_capture(read)
        replaced = _get(self, write)
        self._replaced[write] = replaced
        self._acts_to_saes[read] = wrapper
        _set(self, write, wrapper)
        self._move_captures(replaced, wrapper.hook_sae_output)
        self.setup()

    def _place_capture(self, read: str) -> None:
        """Hook a transcoder's input capture on what flows at `read`: the hook point, or the output
        of the SAE that stands in for it."""
        _, fn = self._input_hooks[read]
        point = _get(self, read)
        if isinstance(point, SAEWrapper):
            point = point.hook_sae_output
        point.add_hook(fn, dir="fwd", is_permanent=True)
        self._input_hooks[read] = (point, fn)

    def _move_captures(self, old: Any, new: Any) -> None:
        """Captures on `old` (a hook point leaving the forward) move to `new`, which takes its place."""
        for read, (point, fn) in list(self._input_hooks.items()):
            if point is old:
                _remove_hook(point, fn)
                new.add_hook(fn, dir="fwd", is_permanent=True)
                self._input_hooks[read] = (new, fn)

    def _writes(self) -> dict[str, str]:
        return {read: io_hooks(w.sae)[1] for read, w in self._acts_to_saes.items()}

    def _reset_sae(self, act_name: str, prev_wrapper: SAEWrapper | None = None) -> None:
        if act_name not in self._acts_to_saes:
            raise ConfigError(f"reset_saes: no SAE is attached at {act_name!r} (attached: {sorted(self._acts_to_saes)}).")
        write = self._writes()[act_name]
        if act_name in self._input_hooks:
            point, fn = self._input_hooks.pop(act_name)
            _remove_hook(point, fn)
        wrapper, original = self._acts_to_saes[act_name], self._replaced.pop(write)
        _set(self, write, original)
        self._move_captures(wrapper.hook_sae_output, original)
        del self._acts_to_saes[act_name]
        self.setup()
        if prev_wrapper is not None:
            self.add_sae(prev_wrapper.sae, use_error_term=prev_wrapper.use_error_term,
                         exclude_special_tokens=prev_wrapper.exclude_special_tokens)

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        """Detach the SAEs at `act_names` (input hook names; all when None)."""
        if isinstance(act_names, str):
            act_names = [act_names]
        elif act_names is None:
            act_names = list(self._acts_to_saes)
        for act_name in act_names:
            self._reset_sae(act_name)
        self.setup()

    # ------------------------------------------------------------------ forward
    def _exclusion_mask(self, tokens: torch.Tensor, exclude: bool | list[int]) -> torch.Tensor:
        from bridge.data import special_token_ids

        if isinstance(exclude, list | tuple):
            ids = list(exclude)
        elif self.tokenizer is None:
            raise ConfigError("exclude_special_tokens=True needs the model's tokenizer; pass a list of token ids.")
        else:
            ids = special_token_ids(self.tokenizer)
        return torch.isin(tokens, torch.as_tensor(ids, dtype=tokens.dtype, device=tokens.device))

    @contextlib.contextmanager
    def _token_masks(self, input: Any, kwargs: dict[str, Any]):
        wrappers = [w for w in self._acts_to_saes.values() if w.exclude_special_tokens is not False]
        if wrappers:
            tokens = input if isinstance(input, torch.Tensor) else self.to_tokens(
                input, prepend_bos=kwargs.get("prepend_bos"), padding_side=kwargs.get("padding_side"),
                move_to_device=True, truncate=True)
            for wrapper in wrappers:
                wrapper.set_token_mask(self._exclusion_mask(tokens, wrapper.exclude_special_tokens))
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.set_token_mask(None)

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        with self._token_masks(input, kwargs):
            return super().forward(input, *args, **kwargs)

    @contextlib.contextmanager
    def saes(self, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None,
             exclude_special_tokens: bool | list[int] = False):
        """Attach `saes` (one SAE or a list) for the block; on exit restore what was attached before."""
        saes = [saes] if not isinstance(saes, list | tuple) else list(saes)
        restore: list[tuple[str, SAEWrapper | None]] = []
        try:
            for sae in saes:
                read, _ = io_hooks(sae)
                restore.append((read, self._acts_to_saes.get(read)))
                self.add_sae(sae, use_error_term=use_error_term, exclude_special_tokens=exclude_special_tokens)
            yield self
        finally:
            if reset_saes_end:
                for read, prev in reversed(restore):
                    if read in self._acts_to_saes:
                        self._reset_sae(read, prev)
                self.setup()

    def run_with_saes(self, *model_args: Any, saes=(), reset_saes_end: bool = True,
                      use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                      **model_kwargs: Any):
        """The model's forward with `saes` attached for it."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term,
                       exclude_special_tokens=exclude_special_tokens):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args: Any, saes=(), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                                 return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any):
        """`run_with_cache` with `saes` attached: the cache holds each SAE's hook_sae_* values."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term,
                       exclude_special_tokens=exclude_special_tokens):
            return self.run_with_cache(*model_args, return_cache_object=return_cache_object,
                                       remove_batch_dim=remove_batch_dim, **kwargs)

    def run_with_hooks_with_saes(self, *model_args: Any, saes=(), reset_saes_end: bool = True,
                                 exclude_special_tokens: bool | list[int] = False, fwd_hooks=(), bwd_hooks=(),
                                 reset_hooks_end: bool = True, clear_contexts: bool = False, **model_kwargs: Any):
        """`run_with_hooks` with `saes` attached (hooks may name their hook_sae_* points)."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, exclude_special_tokens=exclude_special_tokens):
            self._refuse_sae_backward_hooks(bwd_hooks)
            return self.run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks),
                                       reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, **model_kwargs)

    def _refuse_sae_backward_hooks(self, bwd_hooks) -> None:
        inside = [n for n in self.hook_dict if any(n.startswith(f"{w}.hook_sae_") for w in self._writes().values())]
        for name, _ in bwd_hooks:
            hit = [n for n in inside if (name(n) if callable(name) else n == name)]
            if hit:
                raise InputError(f"backward hook on {hit[0]!r}: gradients do not pass through a jsae SAE "
                                 "(it runs in JAX on detached activations).")
