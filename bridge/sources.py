"""Where a run's training batches come from: the model running live, or an activation cache.

`training_batches` is the one place that chooses: every kind of run (one hook point or several,
one SAE or a sweep, live or cached) gets its batches from it, so a run from the cache sees the
batches the live run sees with the same seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bridge.data import excluded_token_ids, token_rows

if TYPE_CHECKING:
    from bridge.run_config import RunConfig


def activation_source(cfg: RunConfig, model, *, split: str | None = None, seed: int | None = None,
                      batch_size: int | None = None, cycle: bool = True, shard: tuple[int, int] | None = None):
    """The live source: `model` run over the dataset's token rows, its hook activations shuffled.

    One forward serves every hook of `cfg.hooks`; with several hooks each batch is a dict {hook: array}.
    `shard` = (index, shards): one data shard's rows (`bridge.distributed`), batches of batch_size / shards
    tokens shuffled with seed + index.
    """
    from bridge.activations import ActivationSource
    from bridge.distributed import deal

    rows = token_rows(cfg, model, split=split, cycle=cycle)
    batch_size = batch_size or cfg.train.train_batch_size_tokens
    seed = cfg.train.seed if seed is None else seed
    if shard is not None:
        rows, batch_size, seed = deal(rows, *shard), batch_size // shard[1], seed + shard[0]
    return ActivationSource(
        model, source_hooks(cfg), rows,
        batch_size=batch_size, context_size=cfg.context_size,
        store_batch_size_prompts=cfg.store_batch_size_prompts, n_batches_in_buffer=cfg.n_batches_in_buffer,
        seqpos_slice=cfg.seqpos_slice, exclude_token_ids=excluded_token_ids(cfg, model),
        hook_head_index=cfg.hook_head_index, dtype=cfg.activations_dtype, seed=seed,
        fused_forward=cfg.fused_forward, act_store_device=cfg.act_store_device, joined=cfg.hook_name_out is not None,
        activations_mixing_fraction=cfg.activations_mixing_fraction, autocast_lm=cfg.autocast_lm,
    )


def source_hooks(cfg: RunConfig) -> str | list[str]:
    """What the model's forward is read at: hook_name (plain batches), hook_names (dict batches), or a
    transcoder's [hook_name, hook_name_out] (joined: input and target side by side in each row)."""
    return cfg.read_hooks if cfg.hook_name_out is not None else cfg.hook_names or cfg.hook_name


def cached_source(cfg: RunConfig, model=None):
    """Batches read from `cfg.activations_cache` (jsae's layout or SAELens'), shaped as `activation_source`'s;
    `model` names the special tokens a SAELens cache excludes as it is read."""
    from bridge.saelens_cache import cached_activations

    per_hook = {hook: cached_activations(cfg, hook, model) for hook in cfg.read_hooks}
    if cfg.hook_name_out is not None:  # same seed, same shuffle: each input row meets its target
        import jax.numpy as jnp

        return (jnp.concatenate([jnp.asarray(x), jnp.asarray(y)], axis=-1)
                for x, y in zip(*per_hook.values(), strict=False))
    if not cfg.hook_names:
        return per_hook[cfg.hook_name]
    # same seed, same shuffle: the hooks' batches stay aligned token by token
    return (dict(zip(per_hook, parts, strict=True)) for parts in zip(*per_hook.values(), strict=False))


def stacked_hooks(source, hooks: list[str]):
    """Dict batches {hook: (tokens, d_in)} from one forward -> one (n_hooks, tokens, d_in) array each."""
    import jax.numpy as jnp

    batches = iter(source)  # starts the source's producer thread now, not at the first batch
    return (jnp.stack([jnp.asarray(batch[h]) for h in hooks]) for batch in batches)


def training_batches(cfg: RunConfig, model):
    """The batches `jsae.Trainer.fit` trains on for `cfg`: (tokens, d_in) arrays for one hook point,
    (n_hooks, tokens, d_in) for `hook_names` (the stream axis of a sweep over hooks).

    From `cfg.activations_cache` when set (the model is not run), else from `model`.
    With several processes (or `data_shards`), this process's part of every batch (`bridge.distributed`):
    its data shards' batches side by side, or its slice of each cached batch.
    """
    import jax

    from bridge.distributed import joined, local_shards, process_slice

    if cfg.activations_cache is not None:
        source = cached_source(cfg, model)
        if jax.process_count() > 1:
            source = process_slice(source, jax.process_count(), jax.process_index())
    else:
        shards, n_shards = local_shards(cfg.data_shards)
        source = activation_source(cfg, model) if n_shards == 1 else joined(
            [activation_source(cfg, model, shard=(s, n_shards)) for s in shards])
    return stacked_hooks(source, cfg.hooks) if cfg.hook_names else source
