"""Loading the language model: the one place that knows TransformerLens' model classes.

Everything else in bridge/ talks to the model through `run_with_cache`, `to_tokens`, `cfg`,
`tokenizer` and `hook_dict`, so another model class (TransformerLens 4's TransformerBridge)
only needs a branch here, and bridge/fused_forward.py (fused forwards for TransformerLens'
blocks, attention and MLPs) a check of which of its modules it covers.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsae import ConfigError, MissingFileError
from jsae._errors import close_names

EMBEDDED_ALIASES = ("embedded", "jsae-embedded-stdlib")


def load_model(
    model: Any = "embedded",
    *,
    model_class_name: str = "HookedTransformer",
    from_pretrained_kwargs: dict | None = None,
    device: str = "auto",
):
    """A `HookedTransformer` on `device` ("auto": see `model_device`) from any of the following, or with
    model_class_name "AutoModelForCausalLM" any transformers causal LM (bridge.hf_model.load_hf_model):

    - "embedded": the model shipped with jsae (offline);
    - a local folder: the embedded format (config.json + model.safetensors), or a Hugging Face
      GPT-2-style checkpoint (config.json with model_type gpt2 + weights), converted offline;
    - a `HookedTransformerConfig` or a dict of its fields: a randomly initialised model;
    - a `HookedTransformer`: returned as it is;
    - an official TransformerLens name ("gpt2-small", ...): `HookedTransformer.from_pretrained`
      (needs the Hub, or a populated Hugging Face cache).
    """
    if model_class_name == "AutoModelForCausalLM":  # any transformers causal LM, hooked by module path
        from bridge.hf_model import HookedHFModel, load_hf_model

        if isinstance(model, HookedHFModel):
            return model
        if device != "auto":
            check_device(device)
        return load_hf_model(str(model), device=model_device(device), from_pretrained_kwargs=from_pretrained_kwargs)
    if model_class_name != "HookedTransformer":
        raise ConfigError(f"model_class_name: expected 'HookedTransformer' or 'AutoModelForCausalLM' (SAELens' "
                          f"names), got {model_class_name!r}.")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    kwargs = dict(from_pretrained_kwargs or {})
    if isinstance(model, HookedTransformer):
        return model
    if device != "auto":
        check_device(device)  # a device this machine lacks is refused before any warning about it
    device = model_device(device)
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
    _check_official_name(name)
    return HookedTransformer.from_pretrained(name, device=device, **kwargs)


def _check_official_name(name: str) -> None:
    """TransformerLens loads only its official names (and their aliases); say so by field, not by its ValueError."""
    from transformer_lens import loading_from_pretrained as loading

    try:
        loading.get_official_model_name(name)
    except ValueError:
        known = list(loading.OFFICIAL_MODEL_NAMES) + [a for names in loading.MODEL_ALIASES.values() for a in names]
        raise ConfigError(f"model_name: {name!r} is not an official TransformerLens model name, a local folder or "
                          "'embedded' (with model_class_name: AutoModelForCausalLM, any Hugging Face causal LM loads)."
                          + close_names(name, known)) from None


GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def resolve_device(requested: str, torch_has_cuda: bool, jax_platform: str) -> tuple[str, str | None]:
    """The torch device of the language model, and a warning when it and JAX sit on different sides of the host.

    "auto" puts the model on CUDA when torch sees CUDA and JAX's default backend is a GPU, else on the
    CPU; any other value is kept as written. The warning names the cost of a model on one side and JAX
    on the other: every batch of activations (and, in evals, every spliced activation) is copied
    between host and device.
    """
    device = str(requested)
    if device == "auto":
        device = "cuda" if torch_has_cuda and jax_platform in GPU_PLATFORMS else "cpu"
    kind = device.split(":")[0]
    jax_on_gpu = jax_platform in GPU_PLATFORMS
    if kind == "cuda" and not jax_on_gpu:
        return device, (f"the language model runs on {device} but JAX runs on {jax_platform}: every batch of "
                        "activations is copied from the GPU to host memory before the SAE sees it. Install JAX's "
                        "CUDA build (pip install -e '.[cuda12]') or set device: auto.")
    if kind == "cpu" and jax_on_gpu:
        return device, (f"JAX runs on {jax_platform} but the language model runs on the CPU"
                        f"{' (torch finds no CUDA device)' if not torch_has_cuda else ''}: every batch of activations "
                        "is copied from host memory to the GPU, and the model's forwards run on the CPU. Install a "
                        "CUDA build of torch and set device: auto (or cuda).")
    return device, None


_WARNED: set[str] = set()


def model_device(requested: str = "auto") -> str:
    """`resolve_device` on this machine (torch's CUDA, JAX's default backend); its warning goes to stderr once.

    Asking JAX's platform starts JAX's backend: `jax_memory_env`'s variables must be set before this runs.
    """
    import torch

    from jsae.backends import default_platform

    device, warning = resolve_device(requested, torch.cuda.is_available(), default_platform())
    if warning is not None and warning not in _WARNED:
        _WARNED.add(warning)
        print(f"jsae: warning: {warning}", file=sys.stderr, flush=True)
    return device


def jax_would_use_gpu(environ: Mapping[str, str], cuda_plugin_installed: bool) -> bool:
    """Whether JAX's default backend will be a GPU, decided without starting it.

    The rule: JAX_PLATFORMS (or the older JAX_PLATFORM_NAME), when set, names the platforms in priority
    order, so the first one decides; unset, JAX picks a GPU exactly when its CUDA plugin is installed
    (a GPU-less machine with the plugin is then counted as a GPU: the memory variables are harmless there).
    """
    platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    first = platforms.split(",")[0].strip().lower()
    if first:
        return first in GPU_PLATFORMS
    return cuda_plugin_installed


def jax_cuda_plugin_installed() -> bool:
    """Whether a CUDA build of JAX is installed (the jax-cuda12/13 plugin), looked up without importing it."""
    for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def lm_shares_gpu_with_jax(requested: str, torch_has_cuda: bool, jax_on_gpu: bool) -> bool:
    """Whether the language model will be on a CUDA device while JAX runs on a GPU (as `resolve_device`
    decides, with JAX's platform guessed by `jax_would_use_gpu` instead of asked)."""
    device, _ = resolve_device(requested, torch_has_cuda, "gpu" if jax_on_gpu else "cpu")
    return torch_has_cuda and jax_on_gpu and device.split(":")[0] == "cuda"


MEMORY_VARIABLES = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")


def jax_memory_env(environ: Mapping[str, str], will_share_gpu: bool, fraction: float | None) -> dict[str, str]:
    """JAX's memory variables to set so that JAX and a torch model share a GPU (empty: change nothing).

    JAX preallocates most of a GPU when its backend starts, which leaves a torch model on the same GPU too
    little. When they share one: `fraction` set preallocates that fraction (XLA_PYTHON_CLIENT_MEM_FRACTION),
    None allocates on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false). A user who set any of JAX's memory
    variables keeps exactly what they set.
    """
    if not will_share_gpu or any(name in environ for name in MEMORY_VARIABLES):
        return {}
    if fraction is not None:
        return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{float(fraction):g}"}
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def apply_jax_memory_policy(requested_device: str, fraction: float | None, environ=None) -> dict[str, str]:
    """Set `jax_memory_env`'s variables in `environ` (default os.environ) and say so on stderr in one line.

    Must run before JAX's backend starts (its first computation, or any look at its devices): the variables
    are read once, then. Deciding does not start it: torch's CUDA check and `jax_would_use_gpu` only.
    """
    import os

    import torch

    environ = os.environ if environ is None else environ
    shares = lm_shares_gpu_with_jax(requested_device, torch.cuda.is_available(),
                                    jax_would_use_gpu(environ, jax_cuda_plugin_installed()))
    changes = jax_memory_env(environ, shares, fraction)
    if changes:
        environ.update(changes)
        what = ("preallocates " + changes["XLA_PYTHON_CLIENT_MEM_FRACTION"] + " of the GPU"
                if "XLA_PYTHON_CLIENT_MEM_FRACTION" in changes else "allocates GPU memory on demand")
        print(f"jsae: the model shares the GPU with JAX: set {' '.join(f'{k}={v}' for k, v in changes.items())} "
              f"(JAX {what}; set it yourself to override)", file=sys.stderr, flush=True)
    return changes


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
    if hasattr(model, "check_hook"):  # a model that names its own hook points (bridge.hf_model)
        return model.check_hook(hook_name)
    if hook_name not in model.hook_dict:
        from jsae._errors import close_names

        raise ConfigError(
            f"hook_name: {hook_name!r} is not a hook point of this model." + close_names(hook_name, model.hook_dict, n=5)
            + f" (The model has {len(model.hook_dict)} hook points, e.g. 'blocks.0.hook_resid_pre'.)"
        )


def stop_layer(model, hook_names: list[str]) -> int | None:
    """The layer to stop the forward at: one past the deepest block any hook lives in."""
    import re

    if hasattr(model, "stop_layer"):  # a model that knows its own module order (bridge.hf_model)
        return model.stop_layer(hook_names)
    layers = []
    for name in hook_names:
        match = re.match(r"blocks\.(\d+)\.", name)
        if match is None:
            return None  # e.g. ln_final or unembed hooks need the whole model
        layers.append(int(match.group(1)))
    return max(layers) + 1 if layers else None
