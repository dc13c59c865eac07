"""A jsae SAE spliced into a running model: its output replaces the hook's activation (a
transcoder's, the activation at metadata.hook_name_out).

The activation goes to JAX by DLPack, the SAE runs there (bridge/hooked_sae.py), and the
reconstruction comes back to torch by DLPack. CE-loss and KL metrics follow SAELens'
`get_recons_loss` / `get_downstream_reconstruction_metrics` exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from bridge.dlpack import torch_to_jax
from bridge.hooked_sae import HOOK_POINTS, SAEWrapper, io_hooks, splice_hooks, with_hook_name


def sae_hook(sae, *, use_error_term: bool = False, mask: torch.Tensor | None = None):
    """A TransformerLens forward hook that replaces the activation by the SAE's output.

    Args:
        sae: a jsae.SAE (hook_z SAEs take the (..., n_heads, d_head) activation as it is); a
            transcoder needs `splice_hooks` (it reads one hook and writes another).
        use_error_term: add the SAE's error, so the model computes exactly what it did without it.
        mask: (batch, pos) booleans; positions where it is False keep the original activation.
    """
    wrapper = SAEWrapper(sae, use_error_term=use_error_term)
    if mask is not None:
        wrapper.set_token_mask(~mask)
    return lambda activations, hook=None: wrapper(activations)


def run_with_saes(model, tokens, saes: Mapping[str, Any] | Sequence, *, use_error_term: bool = False, **kwargs):
    """`model(tokens)` with each SAE spliced in (`{input hook: sae}` or SAEs naming their hooks); a
    plain HookedTransformer's one-call form of `HookedSAETransformer.run_with_saes`."""
    hooks = [pair for sae in _by_hook(saes) for pair in splice_hooks(SAEWrapper(sae, use_error_term=use_error_term))]
    return model.run_with_hooks(tokens, fwd_hooks=hooks, **kwargs)


def run_with_cache_with_saes(model, tokens, saes, *, use_error_term: bool = False, **kwargs):
    """Logits and a dict of each SAE's hook_sae_* values, keyed as `HookedSAETransformer` caches them
    (`{output hook}.hook_sae_acts_post`, ...; hook_sae_error only with the error term)."""
    cache: dict[str, torch.Tensor] = {}

    def store(tensor, hook):
        cache[hook.name] = tensor.detach()

    hooks = []
    for sae in _by_hook(saes):
        wrapper = SAEWrapper(sae, use_error_term=use_error_term)
        _, write = io_hooks(sae)
        for name in HOOK_POINTS:
            point = getattr(wrapper, name)
            point.name = f"{write}.{name}"
            point.add_hook(store)
        hooks += splice_hooks(wrapper)
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks, **kwargs)
    return logits, cache


def _by_hook(saes) -> list:
    if isinstance(saes, Mapping):
        return [with_hook_name(sae, name) for name, sae in saes.items()]
    for sae in saes:
        io_hooks(sae)  # an SAE that names no hook is refused here
    return list(saes)


def with_hooks(model, names: Sequence[str]):
    """`model`, or a HookedSAETransformer sharing its weights where a name is a hook point only that
    class adds (`blocks.N.mlp.hook_in`, a transcoder's usual input)."""
    if all(name in model.hook_dict for name in names):
        return model
    from bridge.hooked_sae_transformer import HookedSAETransformer

    return HookedSAETransformer.from_model(model)


def _kl(original_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(original || new) per position, as SAELens computes it."""
    log_probs_new = torch.nn.functional.log_softmax(new_logits, dim=-1)
    probs_orig = torch.nn.functional.softmax(original_logits, dim=-1)
    return torch.nn.functional.kl_div(log_probs_new, probs_orig, reduction="none").sum(dim=-1)


@torch.no_grad()
def recons_loss(model, sae, tokens: torch.Tensor, *, hook_name: str | None = None,
                ignore_tokens: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Per-position CE losses and KL divergences with the SAE, without it and with the hook zeroed.

    A transcoder reads `hook_name` (default metadata.hook_name) and replaces metadata.hook_name_out,
    the hook that is zeroed for the ablation.
    """
    if hook_name is not None:
        sae = with_hook_name(sae, hook_name)
    read, write = io_hooks(sae)
    model = with_hooks(model, [read, write])
    original_logits, original_ce = model(tokens, return_type="both", loss_per_token=True)
    if ignore_tokens:
        mask = ~torch.isin(tokens, torch.as_tensor(list(ignore_tokens), device=tokens.device))
    else:
        mask = torch.ones_like(tokens, dtype=torch.bool)
    wrapper = SAEWrapper(sae)
    wrapper.set_token_mask(~mask)
    recons_logits, recons_ce = model.run_with_hooks(
        tokens, return_type="both", loss_per_token=True, fwd_hooks=splice_hooks(wrapper))
    zero_logits, zero_ce = model.run_with_hooks(
        tokens, return_type="both", loss_per_token=True, fwd_hooks=[(write, lambda a, hook=None: torch.zeros_like(a))])
    return {
        "kl_div_with_sae": _kl(original_logits, recons_logits),
        "kl_div_with_ablation": _kl(original_logits, zero_logits),
        "ce_loss_with_sae": recons_ce,
        "ce_loss_without_sae": original_ce,
        "ce_loss_with_ablation": zero_ce,
    }


def downstream_reconstruction_metrics(model, sae, token_batches: Iterable[torch.Tensor], *,
                                      hook_name: str | None = None,
                                      ignore_tokens: Sequence[int] | None = None) -> dict[str, float]:
    """SAELens' CE and KL metrics over batches of token rows, with ce_loss_score and kl_div_score."""
    collected: dict[str, list[torch.Tensor]] = {}
    for tokens in token_batches:
        for name, value in recons_loss(model, sae, tokens, hook_name=hook_name, ignore_tokens=ignore_tokens).items():
            if ignore_tokens:
                mask = ~torch.isin(tokens, torch.as_tensor(list(ignore_tokens), device=tokens.device))
                if value.shape[1] != mask.shape[1]:
                    mask = mask[:, :-1]  # CE has no value for the last position
                value = value[mask]
            collected.setdefault(name, []).append(value.reshape(-1))
    metrics = {name: torch.cat(values).mean().item() for name, values in collected.items()}
    metrics["kl_div_score"] = (metrics["kl_div_with_ablation"] - metrics["kl_div_with_sae"]) / metrics[
        "kl_div_with_ablation"]
    metrics["ce_loss_score"] = (metrics["ce_loss_with_ablation"] - metrics["ce_loss_with_sae"]) / (
        metrics["ce_loss_with_ablation"] - metrics["ce_loss_without_sae"])
    return metrics


@torch.no_grad()
def sparsity_and_variance_metrics(model, sae, token_batches: Iterable[torch.Tensor], *,
                                  hook_name: str | None = None, hook_head_index: int | None = None,
                                  ignore_tokens: Sequence[int] | None = None):
    """SAELens' L0 / L1 / explained variance / MSE / cossim / l2 metrics and feature density, on token rows.

    Returns (metrics, feature_metrics) like sae_lens.evals.get_sparsity_and_variance_metrics. A
    transcoder's reconstruction (its forward, skip term included) is compared with the activation at
    metadata.hook_name_out.
    """
    import numpy as np

    from bridge.model import stop_layer
    from jsae.evals import SparsityVarianceMetrics

    if hook_name is not None:
        sae = with_hook_name(sae, hook_name)
    hook_name, write = io_hooks(sae)
    names = [hook_name] if write == hook_name else [hook_name, write]
    model = with_hooks(model, names)
    if hook_head_index is None:
        hook_head_index = sae.cfg.metadata.hook_head_index
    acc = SparsityVarianceMetrics(sae.cfg.d_sae)
    for tokens in token_batches:
        mask = torch.ones_like(tokens, dtype=torch.bool)
        if ignore_tokens:
            mask = ~torch.isin(tokens, torch.as_tensor(list(ignore_tokens), device=tokens.device))
        _, cache = model.run_with_cache(tokens, prepend_bos=False, names_filter=names,
                                        stop_at_layer=stop_layer(model, names))
        act = cache[hook_name]
        if hook_head_index is not None:
            act = act[:, :, hook_head_index]
        elif any(s in hook_name for s in ("hook_q", "hook_k", "hook_v", "hook_z")):
            act = act.flatten(-2, -1)
        feature_acts = sae.encode(torch_to_jax(act.contiguous()))
        if write != hook_name:
            x_hat, act = sae(torch_to_jax(act.contiguous())), cache[write]
        else:
            x_hat = sae.decode(feature_acts)
        # the latents stay on their device; only x and the reconstruction (rows, ctx, d_in) come to the host
        acc.update(act.cpu().numpy(), np.asarray(x_hat), feature_acts, mask.cpu().numpy())
    return acc.result(), acc.feature_metrics()


def run_evals(sae, model, token_batches: Sequence[torch.Tensor], eval_config=None, *,
              exclude_special_tokens: Iterable[int] | bool = True, hook_name: str | None = None,
              verbose: bool = False) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """SAELens' `run_evals` for a jsae SAE: grouped metrics and per-latent metrics.

    Args:
        sae: a jsae.SAE whose metadata names its hook (or pass `hook_name`).
        model: the HookedTransformer the SAE reads.
        token_batches: batches of token rows (rows, context); the reconstruction metrics use the
            first `n_eval_reconstruction_batches`, the sparsity/variance metrics the first
            `n_eval_sparsity_variance_batches` (SAELens rewinds its data between the two as well).
        eval_config: a jsae.evals.EvalConfig (default: every metric).
        exclude_special_tokens: True ignores the tokenizer's special tokens, or a list of ids, or False.

    Returns:
        (metrics, feature_metrics): metrics grouped as SAELens groups them (model_behavior_preservation,
        model_performance_preservation, reconstruction_quality, shrinkage, sparsity, token_stats);
        feature_metrics maps names to per-latent numpy arrays.
    """
    from bridge.data import special_token_ids
    from jsae import InputError
    from jsae.evals import EvalConfig, featurewise_weight_metrics, group_metrics

    cfg = eval_config or EvalConfig.everything()
    hook_name = hook_name or sae.cfg.metadata.hook_name
    if exclude_special_tokens is True:
        ignore = special_token_ids(model.tokenizer) if model.tokenizer is not None else None
    elif exclude_special_tokens:
        ignore = [int(t) for t in exclude_special_tokens]
    else:
        ignore = None
    batches = list(token_batches)
    needed = max(cfg.n_eval_reconstruction_batches if cfg.compute_kl or cfg.compute_ce_loss else 0,
                 cfg.n_eval_sparsity_variance_batches if cfg.sparsity_variance else 0)
    if len(batches) < needed:
        raise InputError(f"run_evals: the eval config needs {needed} batches of token rows, got {len(batches)}.")
    reconstruction: dict[str, float] = {}
    if cfg.compute_kl or cfg.compute_ce_loss:
        reconstruction = downstream_reconstruction_metrics(
            model, sae, _progress(batches[: cfg.n_eval_reconstruction_batches], verbose, "CE/KL batches"),
            hook_name=hook_name, ignore_tokens=ignore)
    sparsity_variance: dict[str, float] = {}
    feature_metrics: dict[str, Any] = {}
    if cfg.sparsity_variance:
        sparsity_variance, density = sparsity_and_variance_metrics(
            model, sae, _progress(batches[: cfg.n_eval_sparsity_variance_batches], verbose, "sparsity batches"),
            hook_name=hook_name, ignore_tokens=ignore)
        if cfg.compute_featurewise_density_statistics:
            feature_metrics |= density
    if cfg.compute_featurewise_weight_based_metrics:
        feature_metrics |= featurewise_weight_metrics(sae.params)
    metrics = group_metrics(cfg, reconstruction, sparsity_variance)
    rows = len(batches[0]) if batches else 0
    context = batches[0].shape[1] if batches else 0
    metrics["token_stats"] = {
        "total_tokens_eval_reconstruction": context * cfg.n_eval_reconstruction_batches * rows,
        "total_tokens_eval_sparsity_variance": context * cfg.n_eval_sparsity_variance_batches * rows,
    }
    return metrics, feature_metrics


def _progress(batches: list, verbose: bool, desc: str):
    if not verbose:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, leave=False)
