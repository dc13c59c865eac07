"""Loading the language model: the one place that knows TransformerLens' model classes.

Everything else in bridge/ talks to the model through `run_with_cache`, `to_tokens`, `cfg`,
`tokenizer` and `hook_dict`, so another model class (TransformerLens 4's TransformerBridge)
only needs a branch here, and bridge/fused_forward.py (fused forwards for TransformerLens'
blocks, attention and MLPs) a check of which of its modules it covers.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from jsae import ConfigError, MissingFileError

EMBEDDED_ALIASES = ("embedded", "jsae-embedded-stdlib")


def load_model(
    model: Any = "embedded",
    *,
    model_class_name: str = "HookedTransformer",
    from_pretrained_kwargs: dict | None = None,
    device: str = "cpu",
):
    """A `HookedTransformer` from any of:

    - "embedded": the model shipped with jsae (offline);
    - a local folder: the embedded format (config.json + model.safetensors), or a Hugging Face
      GPT-2-style checkpoint (config.json with model_type gpt2 + weights), converted offline;
    - a `HookedTransformerConfig` or a dict of its fields: a randomly initialised model;
    - a `HookedTransformer`: returned as it is;
    - an official TransformerLens name ("gpt2-small", ...): `HookedTransformer.from_pretrained`
      (needs the Hub, or a populated Hugging Face cache).
    """
    if model_class_name != "HookedTransformer":
        raise ConfigError(
            f"model_class_name: only 'HookedTransformer' is supported so far, got {model_class_name!r}."
        )
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    kwargs = dict(from_pretrained_kwargs or {})
    if isinstance(model, HookedTransformer):
        return model
    check_device(device)
    if isinstance(model, HookedTransformerConfig):
        return HookedTransformer(model).to(device)
    if isinstance(model, dict):
        return HookedTransformer(HookedTransformerConfig(**model, device=device))
    name = str(model)
    if name in EMBEDDED_ALIASES:
        from bridge.embedded import load_embedded_model

        return load_embedded_model(device=device)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_local(path, device)
    if name.startswith((".", "/", "~")) or name.endswith((".json", ".safetensors")):
        raise MissingFileError(f"model_name: {name!r} looks like a path, but no such folder exists.")
    return HookedTransformer.from_pretrained(name, device=device, **kwargs)


def check_device(device: str) -> None:
    """Refuses a torch device this machine lacks before any model is built on it (torch's own error
    is an AssertionError from deep inside the first tensor moved there)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device: {device!r} is not a torch device ({err}); use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {device!r}, but this torch ({torch.__version__}) finds no CUDA device "
                "(torch.cuda.is_available() is False); use device: cpu (jsae eval: --device cpu), or run on a "
                "machine with a GPU and a CUDA build of torch."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device!r}, but torch finds {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); choose one of them.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {device!r}, but torch finds no MPS device; use device: cpu.")


def _load_local(path: Path, device: str):
    config_path = path / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{config_path}: a local model folder needs a config.json.")
    config = json.loads(config_path.read_text())
    if "model_type" not in config and (path / "model.safetensors").is_file():
        from bridge.embedded import load_embedded_model

        return load_embedded_model(path, device=device)
    if config.get("model_type") != "gpt2":
        raise ConfigError(
            f"{config_path}: model_type {config.get('model_type')!r}; local Hugging Face folders are converted "
            "offline for GPT-2-style models only (use an official TransformerLens name for others)."
        )
    return _load_local_gpt2(path, config, device)


def _load_local_gpt2(path: Path, config: dict, device: str):
    """Convert a local Hugging Face GPT-2 checkpoint to a HookedTransformer without the Hub."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(path)
    n_embd, n_head = config["n_embd"], config["n_head"]
    cfg = HookedTransformerConfig(
        d_model=n_embd, n_layers=config["n_layer"], n_heads=n_head, d_head=n_embd // n_head,
        d_mlp=config.get("n_inner") or 4 * n_embd, n_ctx=config.get("n_ctx", config.get("n_positions", 1024)),
        d_vocab=config["vocab_size"], act_fn="gelu_new", normalization_type="LN", eps=config.get("layer_norm_epsilon",
        1e-5), positional_embedding_type="standard", model_name=path.name, device=device,
    )
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() or (
        path / "vocab.json").exists() else None
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(convert_gpt2_weights(hf_model, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model.eval()
    return model


def model_lock(model) -> threading.RLock:
    """The lock that serialises forwards of `model` across threads.

    TransformerLens' `run_with_hooks` / `run_with_cache` remove every temporary hook when they
    finish, including hooks another thread's forward has just added, so two threads must never
    run the same model at once (e.g. the activation producer and an eval during training).
    """
    lock = getattr(model, "_jsae_forward_lock", None)
    if lock is None:
        with _LOCK_GUARD:
            lock = getattr(model, "_jsae_forward_lock", None)
            if lock is None:
                lock = threading.RLock()
                model._jsae_forward_lock = lock
    return lock


_LOCK_GUARD = threading.Lock()


def hook_width(model, hook_name: str, hook_head_index: int | None = None) -> int:
    """The flattened width of a hook's activations (hook_z: n_heads * d_head; one head with hook_head_index)."""
    import torch

    check_hook(model, hook_name)
    tokens = torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device)
    _, cache = model.run_with_cache(tokens, names_filter=[hook_name], stop_at_layer=stop_layer(model, [hook_name]))
    shape = cache[hook_name].shape[2:]
    if hook_head_index is not None:
        # activations[:, :, hook_head_index] is what the run reads: a hook without a head axis would give
        # one feature per position, and a head past the last one an IndexError inside the forward
        if len(shape) < 2:
            raise ConfigError(f"hook_head_index: {hook_head_index} is set, but {hook_name!r} has no head axis (its "
                              f"activations are (batch, position, {', '.join(map(str, shape))})); set "
                              "hook_head_index: null, or read a per-head hook such as 'blocks.0.attn.hook_z'.")
        n_heads = int(shape[0])
        if not 0 <= hook_head_index < n_heads:
            raise ConfigError(f"hook_head_index: {hook_head_index} is out of range for {hook_name!r}, which has "
                              f"{n_heads} heads; choose 0 to {n_heads - 1}.")
        return int(shape[-1])
    width = 1
    for s in shape:
        width *= int(s)
    return width


def check_hook(model, hook_name: str) -> None:
    if hook_name not in model.hook_dict:
        from jsae._errors import close_names

        raise ConfigError(
            f"hook_name: {hook_name!r} is not a hook point of this model." + close_names(hook_name, model.hook_dict, n=5)
            + f" (The model has {len(model.hook_dict)} hook points, e.g. 'blocks.0.hook_resid_pre'.)"
        )


def stop_layer(model, hook_names: list[str]) -> int | None:
    """The layer to stop the forward at: one past the deepest block any hook lives in."""
    import re

    layers = []
    for name in hook_names:
        match = re.match(r"blocks\.(\d+)\.", name)
        if match is None:
            return None  # e.g. ln_final or unembed hooks need the whole model
        layers.append(int(match.group(1)))
    return max(layers) + 1 if layers else None
