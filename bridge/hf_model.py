"""Any Hugging Face causal LM behind the small interface the bridge uses for a TransformerLens model.

SAELens reads such models through `model_class_name: AutoModelForCausalLM` and its `HookedProxyLM`
(sae_lens/load_model.py): a hook name is a module path of the model (`model.layers.8`,
`transformer.h.3.mlp`), and its activation is the module's output, or the output's first element
when the module returns a tuple. `HookedHFModel` keeps those names and that meaning, and gives the
bridge what it asks of a `HookedTransformer`: `cfg` (device, n_ctx, d_vocab), `tokenizer`,
`hook_dict`, `to_tokens`, `run_with_hooks`, `run_with_cache`, a call returning logits and per-token
losses, and `modules()`. Unlike `HookedProxyLM`, which hooks every module once and for all, a
forward here registers torch forward hooks only on the modules it reads and removes them when it
ends, so the model runs unhooked between forwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from jsae import ConfigError, MissingFileError

MODEL_CLASS_NAME = "AutoModelForCausalLM"


@dataclasses.dataclass(frozen=True)
class HFModelConfig:
    """What the bridge reads from a model's `cfg` (the names of HookedTransformerConfig's fields)."""

    model_name: str
    device: str
    n_ctx: int
    d_vocab: int
    d_model: int
    n_layers: int


@dataclasses.dataclass(frozen=True)
class HookInfo:
    """The second argument a hook function gets (TransformerLens passes its HookPoint): its `name`."""

    name: str


class _StopForward(Exception):
    """Ends a forward once every hook it reads has fired (as sae_lens' StopForward)."""


HookFn = Callable[..., torch.Tensor | None]


class HookedHFModel:
    """A transformers causal LM whose modules are read and replaced by module path.

    Args:
        model: a transformers `PreTrainedModel` for causal LM (its forward returns `.logits`).
        tokenizer: its tokenizer (None: only token ids can be given).
        model_name: recorded in `cfg.model_name`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, model_name: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        # every submodule can be read, as HookedProxyLM's default; "" (the model itself) cannot
        self.hook_dict: dict[str, torch.nn.Module] = {n: m for n, m in model.named_modules() if n}
        self._order = {name: i for i, name in enumerate(self.hook_dict)}
        config = model.config
        embeddings = model.get_input_embeddings()
        self.cfg = HFModelConfig(
            model_name=model_name or getattr(config, "_name_or_path", "") or type(model).__name__,
            device=str(next(model.parameters()).device),
            n_ctx=int(_first_attr(config, ("max_position_embeddings", "n_positions", "n_ctx"), 2**31 - 1)),
            d_vocab=int(embeddings.weight.shape[0]),
            d_model=int(embeddings.weight.shape[1]),
            n_layers=int(_first_attr(config, ("num_hidden_layers", "n_layer", "num_layers"), 0)),
        )

    # ------------------------------------------------------------------ tokens
    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = False, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """Token ids of `input` (batch, pos) as sae_lens' HookedProxyLM.to_tokens gives them: the tokenizer's ids
        without truncation, with the BOS a tokenizer adds by itself (add_bos_token) removed unless
        `prepend_bos`, which puts BOS first."""
        from transformer_lens.utils import get_tokens_with_bos_removed

        if self.tokenizer is None:
            raise ConfigError(f"{self.cfg.model_name}: the model has no tokenizer to turn text into tokens.")
        if padding_side is not None:
            raise ConfigError("HookedHFModel.to_tokens: padding_side is not supported (rows are packed, not padded).")
        del truncate  # as HookedProxyLM: never truncated (rows are cut to context_size when packed)
        tokens = self.tokenizer(input, return_tensors="pt", truncation=False, max_length=None)["input_ids"]
        if getattr(self.tokenizer, "add_bos_token", False):
            tokens = get_tokens_with_bos_removed(self.tokenizer, tokens)
        if prepend_bos:
            bos = torch.full((tokens.shape[0], 1), self.tokenizer.bos_token_id, dtype=tokens.dtype)
            tokens = torch.cat([bos, tokens], dim=1)
        return tokens.to(self.cfg.device) if move_to_device else tokens

    # ------------------------------------------------------------------ forwards
    def stop_layer(self, hook_names: Sequence[str]) -> int | None:
        """Where a forward that reads `hook_names` may end: one past the deepest of those modules, in the
        order of `named_modules` (the forwards end once every hook named has fired; see `run_with_hooks`)."""
        positions = [self._order[name] for name in hook_names if name in self._order]
        return max(positions) + 1 if positions else None

    def run_with_hooks(self, tokens: torch.Tensor, fwd_hooks: Iterable[tuple[str, HookFn]] = (), *,
                       return_type: str | None = "logits", loss_per_token: bool = False,
                       stop_at_layer: int | None = None, prepend_bos: bool | None = None, **kwargs: Any):
        """The model's forward on `tokens` (batch, pos) with `fwd_hooks` at module paths.

        A hook function gets (activation, hook=HookInfo(name)): the module's output, or its first element when
        the output is a tuple; what it returns (not None) replaces that activation in the forward. An exception a
        hook raises ends the forward and reaches the caller; the hooks are removed either way.

        Args:
            return_type: "logits", "both" ((logits, per-position CE loss), as HookedTransformer) or None.
            loss_per_token: with "both", the loss per position (batch, pos - 1) instead of its mean.
            stop_at_layer: not None ends the forward once every hooked module has run and returns None (as
                sae_lens' HookedProxyLM does with a names_filter).
            prepend_bos: accepted for the HookedTransformer signature; token ids are used as given.
        """
        del prepend_bos  # rows arrive packed, BOS included where the data wants it
        if kwargs:
            raise ConfigError(f"HookedHFModel forward: unsupported arguments {sorted(kwargs)}.")
        hooks = list(fwd_hooks)
        for name, _ in hooks:
            self.check_hook(name)
        handles = []
        fired: set[str] = set()
        wanted = {name for name, _ in hooks}
        try:
            for name, fn in hooks:
                handles.append(self.hook_dict[name].register_forward_hook(
                    _module_hook(name, fn, fired, wanted if stop_at_layer is not None else None)))
            try:
                output = self.model(input_ids=tokens.to(self.cfg.device), use_cache=False)
            except _StopForward:
                return None
        finally:
            for handle in handles:
                handle.remove()
        if stop_at_layer is not None:
            return None
        logits = output.logits
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if return_type != "both":
            raise ConfigError(f"HookedHFModel forward: return_type must be 'logits', 'both' or None, got {return_type!r}.")
        from transformer_lens.utils import lm_cross_entropy_loss

        return logits, lm_cross_entropy_loss(logits, tokens.to(logits.device), per_token=loss_per_token)

    def __call__(self, tokens: torch.Tensor, return_type: str | None = "logits", loss_per_token: bool = False,
                 **kwargs: Any):
        return self.run_with_hooks(tokens, (), return_type=return_type, loss_per_token=loss_per_token, **kwargs)

    def run_with_cache(self, tokens: torch.Tensor, names_filter: Sequence[str] | str | None = None, *,
                       stop_at_layer: int | None = None, **kwargs: Any):
        """(logits, {name: activation}) for the modules of `names_filter` (detached); with `stop_at_layer` the
        forward ends once they have all run and the logits are None."""
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter or [])
        if not names:
            raise ConfigError("HookedHFModel.run_with_cache: name the modules to read (names_filter).")
        cache: dict[str, torch.Tensor] = {}

        def keep(activation: torch.Tensor, hook: HookInfo) -> None:
            cache[hook.name] = activation.detach()

        logits = self.run_with_hooks(tokens, [(name, keep) for name in names], stop_at_layer=stop_at_layer, **kwargs)
        return logits, cache

    def check_hook(self, name: str) -> None:
        if name not in self.hook_dict:
            from jsae._errors import close_names

            example = next((n for n in self.hook_dict if n.endswith(".0")), next(iter(self.hook_dict), ""))
            raise ConfigError(f"hook_name: {name!r} is not a module of {self.cfg.model_name!r}; with model_class_name: "
                              f"{MODEL_CLASS_NAME} a hook name is a module path, e.g. {example!r}."
                              + close_names(name, self.hook_dict, n=5))

    def modules(self):
        return self.model.modules()

    def parameters(self):
        return self.model.parameters()

    def to(self, device: str) -> HookedHFModel:
        self.model.to(device)
        self.cfg = dataclasses.replace(self.cfg, device=str(device))
        return self


def _module_hook(name: str, fn: HookFn, fired: set[str], stop_after: set[str] | None):
    """A torch forward hook that hands `fn` the module's activation and puts back what `fn` returns."""

    def hook(module, args, output):
        is_tuple = isinstance(output, tuple)
        activation = output[0] if is_tuple else output
        if not isinstance(activation, torch.Tensor):
            raise ConfigError(f"hook_name: {name!r} returns {type(activation).__name__}, not a tensor; read a module "
                              "whose output (or its first element) is the activation, e.g. a decoder layer.")
        new = fn(activation, hook=HookInfo(name))
        fired.add(name)
        if stop_after is not None and fired >= stop_after:
            raise _StopForward
        if new is None:
            return None
        return (new, *output[1:]) if is_tuple else new

    return hook


def _first_attr(config: Any, names: Sequence[str], default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def load_hf_model(name: str, *, device: str, from_pretrained_kwargs: dict | None = None) -> HookedHFModel:
    """`AutoModelForCausalLM.from_pretrained(name)` and its tokenizer, on `device`, in eval mode.

    `name` is a local folder or a Hub name (read from the local Hugging Face cache when offline).
    from_pretrained_kwargs go to both loaders where they apply: dtype (or torch_dtype), revision,
    trust_remote_code (off unless set), and any other keyword for the model's from_pretrained.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(from_pretrained_kwargs or {})
    kwargs["trust_remote_code"] = bool(kwargs.get("trust_remote_code", False))
    if "torch_dtype" in kwargs:  # transformers' former name
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = _torch_dtype(kwargs["dtype"])
    path = Path(name).expanduser()
    if not path.is_dir() and name.startswith((".", "/", "~")):
        raise MissingFileError(f"model_name: {name!r} looks like a path, but no such folder exists.")
    source = str(path) if path.is_dir() else name
    tokenizer_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    except OSError as err:
        raise MissingFileError(f"model_name: {name!r} cannot be loaded with {MODEL_CLASS_NAME} (not a local folder, "
                               f"nor in the Hugging Face cache or on the Hub: {err}).") from None
    except ValueError as err:  # e.g. a model type transformers does not know, or a class with no causal-LM head
        raise ConfigError(f"model_name: {name!r} is not a causal LM {MODEL_CLASS_NAME} can load ({err}).") from None
    if kwargs.get("device_map") is None:  # with a device_map, accelerate has placed the weights (as SAELens)
        model = model.to(device)
    return HookedHFModel(model, tokenizer, model_name=name)


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"model_from_pretrained_kwargs: dtype {name!r} is not a torch dtype (e.g. float32, bfloat16).")
    return dtype
