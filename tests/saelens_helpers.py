"""Build real sae_lens SAEs with random, non-trivial parameters for cross-checks."""

from __future__ import annotations

import numpy as np
import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder")
# (sae_lens architecture, extra cfg kwargs) for every variant jsae must match.
VARIANTS = {
    "standard": ("standard", {}),
    "gated": ("gated", {}),
    "jumprelu": ("jumprelu", {}),
    "topk": ("topk", {"k": 6}),
    "topk_rescaled": ("topk", {"k": 6, "rescale_acts_by_decoder_norm": True}),
    "transcoder": ("transcoder", {"d_out": 10}),
    "skip_transcoder": ("skip_transcoder", {"d_out": 10}),
    "jumprelu_transcoder": ("jumprelu_transcoder", {"d_out": 10}),
}


def make_saelens_sae(
    variant,
    *,
    d_in=16,
    d_sae=48,
    dtype="float32",
    apply_b_dec_to_input=True,
    normalize_activations="none",
    reshape_activations="none",
    metadata=None,
    seed=0,
):
    """A sae_lens inference SAE of `variant` whose every parameter is random (thresholds > 0)."""
    from sae_lens.registry import get_sae_class
    from sae_lens.saes.sae import SAEMetadata

    arch, extra = VARIANTS[variant]
    sae_cls, cfg_cls = get_sae_class(arch)
    kwargs = dict(
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype,
        normalize_activations=normalize_activations,
        reshape_activations=reshape_activations,
        **extra,
    )
    kwargs["apply_b_dec_to_input"] = False if arch in TRANSCODERS else apply_b_dec_to_input
    cfg = cfg_cls(**kwargs)
    cfg.metadata = SAEMetadata(**(metadata or {"hook_name": "blocks.1.hook_resid_pre", "model_name": "toy"}))
    sae = sae_cls(cfg)
    randomize_parameters(sae, seed)
    return sae


def randomize_parameters(sae, seed, *, threshold_scale=0.3, w_dec_floor=0.5):
    """Fill every parameter of a sae_lens SAE with random values (thresholds > 0, uneven decoder norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            values = torch.randn(p.shape, generator=gen)
            if name == "threshold":
                values = values.abs() * threshold_scale
            elif name == "r_mag":
                values = values * 0.2
            elif name == "W_dec":
                values = values * (w_dec_floor + torch.rand(p.shape[0], 1, generator=gen))
            elif name.startswith("b_"):
                values = values * 0.3
            p.copy_(values.to(p.dtype))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Exact numpy copy of a tensor (bf16 via ml_dtypes)."""
    import ml_dtypes

    if t.dtype == torch.bfloat16:
        return t.detach().float().numpy().astype(ml_dtypes.bfloat16)
    return t.detach().numpy()


def rel_err(a, b) -> float:
    """max |a - b| relative to the scale of b."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(np.abs(b).max(), 1e-12)
    return float(np.abs(a - b).max() / scale)
