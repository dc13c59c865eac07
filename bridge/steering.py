"""Latent edits as TransformerLens hooks: ablate, clamp or scale latents, steer along a decoder row.

Each function returns a `(hook name, hook function)` pair for `HookedSAETransformer`'s
`run_with_hooks_with_saes(..., fwd_hooks=[...])` (or `model.hooks(...)` while the SAE is
attached). The hook names are those of the attached SAE's hook points: `sae_or_hook` is the jsae
SAE (whose hook points sit under its output hook, metadata.hook_name_out for a transcoder) or that
output hook's name. `positions` limits an edit to some positions: None for all, else booleans of
shape (batch, pos) or (pos,). Hooks return new tensors and leave their input as it was.

With `use_error_term=True`, an edit of the latents changes the model's activation by exactly the
edit's decoded contribution (the error term comes from the unedited SAE).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from bridge.hooked_sae import io_hooks

Hook = tuple[str, Callable[..., torch.Tensor]]


def _prefix(sae_or_hook: Any) -> str:
    return sae_or_hook if isinstance(sae_or_hook, str) else io_hooks(sae_or_hook)[1]


def _at(positions: Any, acts: torch.Tensor) -> torch.Tensor | None:
    """`positions` as booleans broadcast over acts' trailing (feature) axes; None for all positions."""
    if positions is None:
        return None
    mask = torch.as_tensor(positions, dtype=torch.bool, device=acts.device)
    return mask[(...,) + (None,) * (acts.ndim - 2)]


def _edit_latents(sae_or_hook: Any, latents: Sequence[int] | int, positions: Any,
                  new_values: Callable[[torch.Tensor], torch.Tensor]) -> Hook:
    index = torch.as_tensor(np.atleast_1d(latents), dtype=torch.long)

    def hook(acts: torch.Tensor, hook: Any = None) -> torch.Tensor:
        idx = index.to(acts.device)
        old = acts.index_select(-1, idx)
        new = new_values(old).to(acts.dtype)
        mask = _at(positions, acts)
        if mask is not None:
            new = torch.where(mask, new, old)
        return acts.index_copy(-1, idx, new)

    return f"{_prefix(sae_or_hook)}.hook_sae_acts_post", hook


def ablate_latents(sae_or_hook: Any, latents: Sequence[int] | int, *, positions: Any = None) -> Hook:
    """Zero `latents` at hook_sae_acts_post."""
    return _edit_latents(sae_or_hook, latents, positions, torch.zeros_like)


def clamp_latent(sae_or_hook: Any, latent: int, value: float, *, positions: Any = None) -> Hook:
    """Set `latent` to `value` at hook_sae_acts_post."""
    return _edit_latents(sae_or_hook, latent, positions, lambda old: torch.full_like(old, value))


def scale_latent(sae_or_hook: Any, latent: int, factor: float, *, positions: Any = None) -> Hook:
    """Multiply `latent` by `factor` at hook_sae_acts_post."""
    return _edit_latents(sae_or_hook, latent, positions, lambda old: old * factor)


def add_decoder_direction(sae, latent: int, coefficient: float, *, positions: Any = None) -> Hook:
    """Add `coefficient * W_dec[latent]` to the SAE's output (hook_sae_output), in the model's
    layout: a hook_z SAE's row is split into (n_heads, d_head)."""
    row = torch.from_numpy(np.asarray(sae.W_dec[latent], dtype=np.float32))

    def hook(out: torch.Tensor, hook: Any = None) -> torch.Tensor:
        step = (coefficient * row).to(device=out.device, dtype=out.dtype).reshape(out.shape[2:])
        mask = _at(positions, out)
        return out + (step if mask is None else torch.where(mask, step, torch.zeros_like(step)))

    return f"{_prefix(sae)}.hook_sae_output", hook
