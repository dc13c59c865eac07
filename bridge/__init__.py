"""The PyTorch side of jsae: TransformerLens models, the DLPack hand-off and the `jsae` CLI.

`jsae` never imports this package; this package imports jsae.
"""

from bridge.dlpack import jax_to_torch, torch_to_jax

__all__ = ["HookedSAETransformer", "jax_to_torch", "torch_to_jax"]


def __getattr__(name: str):
    # HookedSAETransformer imports transformer_lens: only when asked for, so `jsae --help` stays quick.
    if name == "HookedSAETransformer":
        from bridge.hooked_sae_transformer import HookedSAETransformer

        return HookedSAETransformer
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")
