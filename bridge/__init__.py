"""The PyTorch side of jsae: TransformerLens models, the DLPack hand-off and the `jsae` CLI.

`jsae` never imports this package; this package imports jsae.
"""

from bridge.dlpack import jax_to_torch, torch_to_jax

__all__ = ["jax_to_torch", "torch_to_jax"]
