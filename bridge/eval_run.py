"""`jsae eval`'s back end, and the evals that run during training: an SAE spliced into its model,
scored on held-out token rows with SAELens' run_evals metrics."""

from __future__ import annotations

import itertools

from bridge.data import check_token_settings, eval_data_config, excluded_token_ids, heldout_split, token_rows
from bridge.run_config import RunConfig
from jsae import ConfigError, InputError
from jsae.tensors import non_finite_params


def eval_token_batches(cfg: RunConfig, model, n_batches: int | None = None) -> list:
    """`n_eval_batches` batches of `eval_batch_size_prompts` held-out token rows (fewer if the data runs out)."""
    import torch

    n_batches = cfg.n_eval_batches if n_batches is None else n_batches
    rows_per_batch = cfg.eval_batch_size_prompts or cfg.store_batch_size_prompts
    cfg = eval_data_config(cfg)  # eval_dataset_path, when set
    rows = token_rows(cfg, model, split=heldout_split(cfg), cycle=False)
    batches = []
    for _ in range(n_batches):
        chunk = list(itertools.islice(rows, rows_per_batch))
        if len(chunk) < rows_per_batch:
            break
        batches.append(torch.tensor(chunk, device=model.cfg.device))
    if not batches:
        raise InputError(f"dataset_path: {cfg.dataset_path!r} has fewer than {rows_per_batch} held-out rows of "
                         f"context_size={cfg.context_size} for evals; lower eval_batch_size_prompts.")
    return batches


def eval_ignored_tokens(cfg: RunConfig, model) -> list[int] | bool:
    """Tokens the evals ignore: the run's exclude_special_tokens when set, else the special tokens
    (sae_lens' run_evals default)."""
    return excluded_token_ids(cfg, model) if cfg.exclude_special_tokens else True


def eval_config(cfg: RunConfig, n_batches: int):
    """What is evaluated during training and at its end: SAELens' training evals, plus KL."""
    from jsae.evals import EvalConfig

    return EvalConfig(n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches,
                      compute_kl=True, compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
                      compute_variance_metrics=True)


def make_evaluator(cfg: RunConfig, model):
    """evaluator(sae) -> flat metrics with the SAE spliced into `model`, on fixed held-out rows (None: evals off)."""
    if cfg.n_eval_batches == 0:
        return None
    from bridge.evals import run_evals
    from bridge.model import model_lock
    from jsae.evals import flatten_metrics

    batches = eval_token_batches(cfg, model)
    config = eval_config(cfg, len(batches))
    exclude = eval_ignored_tokens(cfg, model)

    def evaluator(sae) -> dict[str, float]:
        with model_lock(model):  # the activation producer thread runs the same model
            metrics, _ = run_evals(sae, model, batches, config, exclude_special_tokens=exclude,
                                   hook_name=sae.cfg.metadata.hook_name or cfg.hook_name)
        return flatten_metrics(metrics)

    return evaluator


def eval_run_config(sae, *, model_name: str | None = None, dataset_path: str | None = None,
                    hook_name: str | None = None, n_eval_batches: int = 10, eval_batch_size_prompts: int = 16,
                    context_size: int | None = None, device: str = "auto") -> RunConfig:
    """Where to evaluate `sae`: the model, hook and data its metadata names, unless given (else the embedded default)."""
    if isinstance(n_eval_batches, bool) or not isinstance(n_eval_batches, int) or n_eval_batches < 1:
        raise ConfigError(f"batches to evaluate (--batches) must be >= 1, got {n_eval_batches!r}.")
    if isinstance(eval_batch_size_prompts, bool) or not isinstance(eval_batch_size_prompts, int) \
            or eval_batch_size_prompts < 1:
        raise ConfigError(f"rows per batch (--batch-size) must be >= 1, got {eval_batch_size_prompts!r}.")
    if context_size is not None and (isinstance(context_size, bool) or not isinstance(context_size, int)
                                     or context_size < 1):
        raise ConfigError(f"tokens per row (--context-size) must be >= 1, got {context_size!r}.")
    meta = sae.cfg.metadata
    hook_name = hook_name or meta.hook_name
    if hook_name is None:
        raise ConfigError("the SAE's cfg.json names no metadata.hook_name; give the hook point (--hook NAME).")
    settings = {
        "model_name": model_name or meta.model_name or "embedded",
        "model_class_name": meta.model_class_name or "HookedTransformer",
        "model_from_pretrained_kwargs": dict(meta.model_from_pretrained_kwargs or {}),
        "hook_name": hook_name,
        "hook_head_index": meta.hook_head_index,
        "dataset_path": dataset_path or meta.dataset_path or "stdlib",
        "context_size": context_size or meta.context_size or 128,
        "n_eval_batches": n_eval_batches,
        "eval_batch_size_prompts": eval_batch_size_prompts,
        "device": device,
    }
    for key in ("prepend_bos", "sequence_separator_token", "disable_concat_sequences", "exclude_special_tokens"):
        if meta.get(key) is not None:
            settings[key] = meta.get(key)
    return RunConfig(**settings)


def load_eval_model(sae, cfg: RunConfig):
    """`cfg`'s model, checked against `sae`: the hook exists with the SAE's width, and rows of
    `context_size` tokens fit the model.

    Raises ConfigError when the hook is not in the model, its width is not the SAE's d_in, or
    context_size exceeds the model's n_ctx.
    """
    import contextlib
    import sys

    from bridge.model import hook_width, load_model

    with contextlib.redirect_stdout(sys.stderr):  # loaders that print must not mix with --json output
        model = load_model(cfg.model_name, model_class_name=cfg.model_class_name,
                           from_pretrained_kwargs=cfg.model_from_pretrained_kwargs, device=cfg.device)
    width = hook_width(model, cfg.hook_name, cfg.hook_head_index)
    if width != sae.cfg.d_in:
        raise ConfigError(f"the SAE's d_in={sae.cfg.d_in} does not match {cfg.hook_name!r} of {cfg.model_name!r}, "
                          f"whose activations have width {width}; evaluate it on the model it was trained on (--model).")
    if cfg.context_size > model.cfg.n_ctx:
        raise ConfigError(f"context_size={cfg.context_size} is larger than the model's n_ctx={model.cfg.n_ctx}.")
    check_token_settings(cfg, model)
    return model


def check_finite_weights(sae, where: str) -> None:
    """Refuses an SAE whose parameters hold NaN or infinity: every metric of it would be NaN, which
    says nothing about the SAE and reads as a result."""
    bad = non_finite_params(sae.params)
    if bad:
        raise InputError(f"{where}: the SAE's weights are not finite (NaN or infinite values in {'; '.join(bad)}); "
                         "there is nothing to evaluate. Retrain it (a lower lr often helps), or evaluate an earlier "
                         "checkpoint.")


def evaluate_sae(sae, cfg: RunConfig, *, verbose: bool = False):
    """Every SAELens eval of `sae` on `cfg`'s model and held-out data: (grouped metrics, per-latent metrics).

    Raises ConfigError as `load_eval_model` does.
    """
    import numpy as np

    from bridge.evals import run_evals
    from jsae.evals import EvalConfig

    check_finite_weights(sae, "the SAE")
    model = load_eval_model(sae, cfg)
    batches = eval_token_batches(cfg, model)
    n = len(batches)
    metrics, features = run_evals(sae, model, batches, EvalConfig.everything(
        n_eval_reconstruction_batches=n, n_eval_sparsity_variance_batches=n),
        exclude_special_tokens=eval_ignored_tokens(cfg, model),
        hook_name=cfg.hook_name, verbose=verbose)
    density = np.asarray(features["feature_density"])
    metrics["features"] = {
        "dead_features": int(np.sum(density == 0)),
        "dead_fraction": float(np.mean(density == 0)),
        "mean_log10_feature_density": float(np.mean(np.log10(density + 1e-10))),
        "mean_encoder_decoder_cosine_sim": float(np.mean(features["encoder_decoder_cosine_sim"])),
    }
    return metrics, features
