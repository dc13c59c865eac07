"""One jsae SAE spliced into a TransformerLens model, with SAELens' hook points inside it.

`SAEWrapper` is what `HookedSAETransformer` puts in place of a hook point (SAELens'
`_SAEWrapper` in sae_lens/analysis/hooked_sae_transformer.py): its forward takes the activation
at the SAE's output hook and returns what flows on. The SAE math runs in JAX, stage by stage;
between stages the values cross to torch by DLPack only where a hook point has hooks, so a hook
reads and may change (in place or by returning a tensor) each of:

    hook_sae_input      the input cast to the SAE dtype, hook_z heads flattened   (..., d_in)
    hook_sae_acts_pre   the pre-activations                                        (..., d_sae)
    hook_sae_acts_post  the latents                                                (..., d_sae)
    hook_sae_recons     latents @ W_dec + b_dec, before de-normalisation           (..., d_out)
    hook_sae_error      with use_error_term: the activation minus the clean output
    hook_sae_output     what replaces the activation (the model's layout)

With use_error_term the error is computed from a forward without hooks (SAELens 6.34.2+), so an
edit of the latents changes the model's activation by exactly the edit's decoded contribution.
Gradients do not pass through the SAE: values cross to JAX detached, and the output carries no
gradient back to the model's earlier activations.
"""

from __future__ import annotations

from typing import Any

import jax
import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from bridge.dlpack import device_context, jax_to_torch, torch_to_jax
from jsae import ConfigError, InputError
from jsae.saes import get_architecture
from jsae.saes._base import training_module_cfg
from jsae.saes._hook_split import encoder_split

HOOK_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
               "hook_sae_error", "hook_sae_output")
_INNER = HOOK_POINTS[:4]  # the points whose edits change the SAE's own output


def _module(cfg):
    # The hook_z flatten happens on the torch side, before hook_sae_input (as in SAELens).
    return get_architecture(cfg.architecture).module_cls(training_module_cfg(cfg))


def flattens_hook_z(cfg) -> bool:
    return cfg.reshape_activations == "hook_z" and get_architecture(cfg.architecture).module_cls.flattens_hook_z


def _cast(sae, x):
    return x.astype(sae.cfg.jnp_dtype)


def _encode_pre(sae, x):
    """(pre-activations, prepared input, InputState, latents or None where the split is known)."""
    module = _module(sae.cfg)
    sae_in, state = module.apply({"params": sae.params}, x, method="prepare_input")
    split = encoder_split(sae.cfg.architecture)
    if split is None:
        feature_acts, hidden_pre = module.apply({"params": sae.params}, sae_in, method="encode_prepared")
        return hidden_pre, sae_in, state, feature_acts
    return split.pre_activations(sae.params, sae.cfg, sae_in), sae_in, state, None


def _activate(sae, hidden_pre, sae_in):
    return encoder_split(sae.cfg.architecture).activate(sae.params, sae.cfg, hidden_pre, sae_in)


def _decode(sae, feature_acts):
    return _module(sae.cfg).apply({"params": sae.params}, feature_acts, method="decode_linear")


def _finish(sae, recons, state, x):
    """De-normalise (autoencoders) and add a skip transcoder's x W_skip^T."""
    module = _module(sae.cfg)
    out = module.apply({"params": sae.params}, recons, state, method="finish_output")
    if hasattr(module, "skip"):
        skip = module.apply({"params": sae.params}, x, method="skip")
        if skip is not None:
            out = out + skip
    return out


@jax.jit
def _whole(sae, x):
    """The stages in one compiled function, for a forward whose inner hook points have no hooks."""
    a = _cast(sae, x)
    hidden_pre, sae_in, state, feature_acts = _encode_pre(sae, a)
    if feature_acts is None:
        feature_acts = _activate(sae, hidden_pre, sae_in)
    return _finish(sae, _decode(sae, feature_acts), state, a)


_cast, _encode_pre, _activate, _decode, _finish = (
    jax.jit(f) for f in (_cast, _encode_pre, _activate, _decode, _finish))


class SAEWrapper(nn.Module):
    """A jsae SAE (or transcoder) at its output hook, with SAELens' hook points.

    The SAE is kept out of torch's module registry (it is a JAX pytree), so the hook points sit
    directly under the hook's name: `blocks.1.hook_resid_post.hook_sae_acts_post`.

    Args:
        sae: a jsae.SAE.
        use_error_term: add the clean error, so the model's activation is unchanged unless a hook edits the SAE.
        exclude_special_tokens: True (the tokenizer's special tokens), a list of token ids, or False;
            the SAE is bypassed at those positions (HookedSAETransformer computes the mask per forward).
    """

    def __init__(self, sae, use_error_term: bool = False, exclude_special_tokens: bool | list[int] = False):
        super().__init__()
        self.__dict__["_sae"] = sae
        for name in HOOK_POINTS:
            setattr(self, name, HookPoint())
        self.use_error_term = bool(use_error_term)
        self.exclude_special_tokens = exclude_special_tokens
        self._captured_input: torch.Tensor | None = None
        self._token_mask: torch.Tensor | None = None
        self._flatten = flattens_hook_z(sae.cfg)
        meta = sae.cfg.metadata
        self._reads_elsewhere = meta.hook_name_out not in (None, meta.hook_name)

    @property
    def sae(self):
        return self.__dict__["_sae"]

    def capture_input(self, x: torch.Tensor) -> None:
        """Record a transcoder's input at its input hook (read once, by the next forward)."""
        self._captured_input = x

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """(batch, pos) booleans, True where the SAE is bypassed; None to apply it everywhere."""
        self._token_mask = mask

    def forward(self, original_output: torch.Tensor) -> torch.Tensor:
        x = self._captured_input if self._captured_input is not None else original_output
        if self._reads_elsewhere and self._captured_input is None:
            meta = self.sae.cfg.metadata
            raise InputError(f"the transcoder writing {meta.hook_name_out!r} saw no input at {meta.hook_name!r} "
                             "in this forward (a forward that starts after that hook, or a hook that replaced it).")
        self._captured_input = None
        with device_context(x):
            return self._forward(x, original_output)

    # ------------------------------------------------------------------ internals
    def _through(self, hook_point: HookPoint, value: jax.Array) -> jax.Array:
        """`value` through `hook_point`: a round trip to torch only where the point has hooks."""
        if not hook_point.has_hooks(dir="fwd"):
            return value
        given = jax_to_torch(value)
        out = hook_point(given)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(given.shape):
            raise InputError(f"a hook on {hook_point.name or 'an SAE hook point'} returned "
                             f"{getattr(out, 'shape', type(out).__name__)}; expected a tensor of shape {tuple(given.shape)}.")
        return torch_to_jax(out.to(device=given.device, dtype=given.dtype))

    def _sae_output(self, x: torch.Tensor, hooks: bool, fused: bool = False) -> torch.Tensor:
        """The SAE's output for activation x in x's layout (before the error term), hooks run or not;
        `fused` (without hooks): in one compiled function rather than stage by stage."""
        sae = self.sae
        if not hooks and fused:
            out = jax_to_torch(_whole(sae, torch_to_jax(x.flatten(-2) if self._flatten else x)))
            return out.unflatten(-1, x.shape[-2:]) if self._flatten else out
        through = self._through if hooks else (lambda _point, value: value)
        a = through(self.hook_sae_input, _cast(sae, torch_to_jax(x.flatten(-2) if self._flatten else x)))
        hidden_pre, sae_in, state, whole = _encode_pre(sae, a)
        if whole is None:
            feature_acts = _activate(sae, through(self.hook_sae_acts_pre, hidden_pre), sae_in)
        else:
            feature_acts = whole
            if hooks and self.hook_sae_acts_pre.has_hooks(dir="fwd"):
                before = jax_to_torch(hidden_pre).clone()
                after = jax_to_torch(through(self.hook_sae_acts_pre, hidden_pre))
                if not torch.equal(before, after):
                    raise InputError(f"architecture {sae.cfg.architecture!r}: a hook changed hook_sae_acts_pre, "
                                     "but jsae cannot apply this architecture's activation to edited pre-activations; "
                                     "edit hook_sae_acts_post instead.")
        feature_acts = through(self.hook_sae_acts_post, feature_acts)
        recons = through(self.hook_sae_recons, _decode(sae, feature_acts))
        out = jax_to_torch(_finish(sae, recons, state, a))
        if self._flatten:
            out = out.unflatten(-1, x.shape[-2:])
        return out

    def _forward(self, x: torch.Tensor, original_output: torch.Tensor) -> torch.Tensor:
        hooked = any(getattr(self, name).has_hooks(dir="fwd") for name in _INNER)
        like = {"device": original_output.device, "dtype": original_output.dtype}
        sae_out = self._sae_output(x, hooks=hooked, fused=not hooked).to(**like)
        if tuple(sae_out.shape) != tuple(original_output.shape):
            raise ConfigError(f"the SAE's output has shape {tuple(sae_out.shape)} but the activation it replaces "
                              f"has {tuple(original_output.shape)}: check the SAE's d_out and metadata.hook_name_out.")
        mask = self._token_mask
        if mask is not None:
            mask = mask.to(original_output.device)[(...,) + (None,) * (original_output.ndim - mask.ndim)]
        if self.use_error_term:
            clean = self._sae_output(x, hooks=False).to(**like) if hooked else sae_out
            error = original_output.detach() - clean
            if mask is not None:
                error = torch.where(mask, torch.zeros_like(error), error)
            sae_out = sae_out + self.hook_sae_error(error)
        if mask is not None:
            sae_out = torch.where(mask, original_output, sae_out)
        return self.hook_sae_output(sae_out)


def io_hooks(sae) -> tuple[str, str]:
    """(input hook, output hook) of an SAE: metadata.hook_name and hook_name_out (the input's by default)."""
    meta = sae.cfg.metadata
    if not meta.hook_name:
        raise ConfigError("the SAE's metadata.hook_name is not set: it names the hook the SAE reads. "
                          "Set it with sae.replace(cfg=sae.cfg.replace(metadata=sae.cfg.metadata.replace(hook_name=...))).")
    out = meta.hook_name_out or meta.hook_name
    d_out = getattr(sae.cfg, "d_out", sae.cfg.d_in)
    if out == meta.hook_name and d_out != sae.cfg.d_in:
        raise ConfigError(f"a transcoder with d_out={d_out} != d_in={sae.cfg.d_in} needs metadata.hook_name_out "
                          "(the hook it writes); found none.")
    return meta.hook_name, out


def with_hook_name(sae, hook_name: str):
    """The SAE with metadata.hook_name set to `hook_name` (hook_name_out kept)."""
    if sae.cfg.metadata.hook_name == hook_name:
        return sae
    return sae.replace(cfg=sae.cfg.replace(metadata=sae.cfg.metadata.replace(hook_name=hook_name)))


def splice_hooks(wrapper: SAEWrapper) -> list[tuple[str, Any]]:
    """TransformerLens (name, hook) pairs that splice `wrapper`'s SAE into one `run_with_hooks` of a
    plain model: a transcoder's pair records the input at metadata.hook_name and writes at hook_name_out."""
    read, write = io_hooks(wrapper.sae)
    hooks = []
    if read != write:
        hooks.append((read, lambda act, hook=None: wrapper.capture_input(act)))
    hooks.append((write, lambda act, hook=None: wrapper(act)))
    return hooks
