"""The `jsae` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def demo(args: argparse.Namespace) -> int:
    """Run a TransformerLens model, encode its activations with a jsae SAE, save, reload, compare."""
    import numpy as np
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    import jsae
    from bridge.dlpack import torch_to_jax

    torch.manual_seed(0)
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_vocab=500, act_fn="gelu", seed=0
        )
    )
    hook = "blocks.1.hook_resid_pre"
    tokens = torch.randint(0, 500, (8, 32))
    _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=2)
    acts = torch_to_jax(cache[hook].reshape(-1, 64))
    print(f"activations {hook}: {tuple(acts.shape)} handed to JAX via DLPack")

    cfg = jsae.TopKSAEConfig(d_in=64, d_sae=512, k=16, metadata=jsae.Metadata(hook_name=hook))
    sae = jsae.SAE.from_config(cfg, seed=0)
    feats = sae.encode(acts)
    recon = sae.decode(feats)
    l0 = float((feats > 0).sum(-1).mean())
    mse = float(((recon - acts) ** 2).sum(-1).mean())
    print(f"untrained TopK SAE 64 -> 512: L0 {l0:.1f}, MSE {mse:.3f}")

    out_dir = Path(args.output_path or tempfile.mkdtemp(prefix="jsae-demo-"))
    sae.save_model(out_dir)
    again = jsae.SAE.load_from_disk(out_dir)
    same = all(np.array_equal(np.asarray(sae.params[k]), np.asarray(again.params[k])) for k in sae.params)
    max_diff = float(abs(again(acts) - sae(acts)).max())
    print(f"saved SAELens folder {out_dir} ({', '.join(sorted(p.name for p in out_dir.iterdir()))})")
    print(f"reloaded: tensors bit-identical {same}, forward max |diff| {max_diff:.2e}")
    return 0 if same and max_diff == 0.0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jsae", description="Sparse autoencoders in JAX, SAELens-compatible.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="load, run and round-trip an SAE on a small TransformerLens model")
    p.add_argument("--output-path", default=None, help="where to write the demo SAE folder")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
