"""`jsae inspect`'s back end: feature dashboards of an SAE from a pass over held-out text of its model.

The model, hook and data are found as `jsae eval` finds them (bridge.eval_run.eval_run_config: the
SAE's metadata, else the embedded model and its held-out text), activations are read as training
reads them (bridge.activations.ActivationSource.model_activations), and the per-latent statistics
are gathered on the JAX device by jsae.latent_stats. The page is rendered by jsae.dashboard.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bridge.data import heldout_split, special_token_ids, token_rows
from bridge.eval_run import eval_ignored_tokens, eval_run_config, load_eval_model
from bridge.run_config import RunConfig
from jsae import ConfigError, InputError
from jsae.latent_stats import LatentStatsConfig, init_latent_stats, logit_effects, stats_to_numpy, update_latent_stats

DEFAULT_LATENTS = 64
DEFAULT_TOKENS = 65_536
ROWS_PER_BATCH = 16
N_LOGITS = 10
N_QUANTILE_GROUPS = 4
EXAMPLES_PER_QUANTILE = 5
JSON_NAME, HTML_NAME = "latents.json", "index.html"
# --top-density's second pass reuses the first pass's activations when they take at most this much memory
KEEP_ACTIVATIONS_BYTES = 1 << 30


def parse_latents(spec: str, d_sae: int) -> list[int]:
    """Latent indices from "0-63", "5" or "0-3,10,12-15" (ranges inclusive, order kept, no repeats).

    Raises ConfigError naming --latents for text that is not such a list or an index outside [0, d_sae).
    """
    latents: list[int] = []
    for part in str(spec).split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise ConfigError(f"--latents: expected indices and ranges like '0-63' or '1,5,9-12', got {spec!r}.") from None
        if lo > hi:
            raise ConfigError(f"--latents: the range {part.strip()!r} is empty (it runs backwards).")
        if lo < 0 or hi >= d_sae:
            raise ConfigError(f"--latents: {part.strip()!r} is outside the SAE's latents 0 to {d_sae - 1} "
                              f"(d_sae={d_sae}).")
        latents += [i for i in range(lo, hi + 1) if i not in latents]
    return latents


def inspect_config(sae, *, n_tokens: int = DEFAULT_TOKENS, model_name: str | None = None,
                   dataset_path: str | None = None, hook_name: str | None = None, context_size: int | None = None,
                   device: str = "auto") -> RunConfig:
    """Where to inspect `sae` (as `jsae eval` decides it), sized to at least `n_tokens` held-out tokens."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ConfigError(f"tokens to read (--tokens) must be >= 1, got {n_tokens!r}.")
    probe = eval_run_config(sae, model_name=model_name, dataset_path=dataset_path, hook_name=hook_name,
                            context_size=context_size, device=device)
    n_rows = math.ceil(n_tokens / probe.context_size)
    return eval_run_config(sae, model_name=model_name, dataset_path=dataset_path, hook_name=hook_name,
                           context_size=probe.context_size, device=device,
                           n_eval_batches=math.ceil(n_rows / ROWS_PER_BATCH), eval_batch_size_prompts=ROWS_PER_BATCH)


def read_rows(cfg: RunConfig, model, n_rows: int) -> np.ndarray:
    """(rows, context_size) held-out token rows, at most `n_rows` (fewer where the data ends)."""
    rows = list(itertools.islice(token_rows(cfg, model, split=heldout_split(cfg), cycle=False), n_rows))
    if not rows:
        raise InputError(f"dataset_path: {cfg.dataset_path!r} gave no held-out row of context_size={cfg.context_size}.")
    return np.asarray(rows, dtype=np.int32)


def counted_mask(cfg: RunConfig, model, rows: np.ndarray) -> np.ndarray:
    """Tokens that count (`jsae eval`'s rule: the special tokens, BOS included, are left out)."""
    ignored = eval_ignored_tokens(cfg, model)
    if ignored is True:
        ignored = special_token_ids(model.tokenizer) if model.tokenizer is not None else []
    return ~np.isin(rows, np.asarray(ignored or [], dtype=rows.dtype))


@jax.jit
def _fired_counts(sae, x, mask):
    return ((sae.encode(x) > 0) & mask.reshape(-1, 1)).sum(0, dtype=jnp.int32)


@partial(jax.jit, static_argnames=("shape",))
def _encode_latents(sae, x, latents, shape):
    return sae.encode(x)[:, latents].reshape(*shape, latents.shape[0])


def _batches(rows: np.ndarray, activations, desc: str, verbose: bool):
    """(first row, its token rows, their activations as a jax.Array (tokens, d_in)) per batch of rows.

    `activations`: a reader (token rows -> torch activations) that runs the model, or the list of arrays
    an earlier pass over the same rows kept.
    """
    import torch
    from tqdm.auto import tqdm

    from bridge.dlpack import torch_to_jax

    starts = range(0, len(rows), ROWS_PER_BATCH)
    for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not verbose)):
        tokens = rows[start : start + ROWS_PER_BATCH]
        if isinstance(activations, list):
            yield start, tokens, activations[b]
        else:
            yield start, tokens, torch_to_jax(activations(torch.as_tensor(tokens, dtype=torch.long)).float())


def _activation_reader(sae, model, cfg: RunConfig):
    """token rows (rows, context) -> the SAE's input, one token per row of the result: the hook's activations
    as training reads them, with an attention hook_z's heads split again for an SAE that reshapes hook_z input."""
    from bridge.activations import ActivationSource

    source = ActivationSource(model, cfg.hook_name, iter(()), batch_size=1, context_size=cfg.context_size,
                              hook_head_index=cfg.hook_head_index, as_jax=False, prefetch=0)
    if sae.cfg.reshape_activations != "hook_z" or cfg.hook_head_index is not None:
        return source.model_activations
    n_heads = model.cfg.n_heads
    return lambda tokens: source.model_activations(tokens).reshape(-1, n_heads, sae.cfg.d_in // n_heads)


def latent_densities(sae, model, cfg: RunConfig, rows: np.ndarray, mask: np.ndarray, *, keep: bool = False,
                     verbose: bool = False):
    """Each latent's firing density over the counted tokens of `rows`: ((d_sae,) float64, the model's
    activations of each batch when `keep`, for a second pass without the model, else None)."""
    read = _activation_reader(sae, model, cfg)
    counts = jnp.zeros((sae.cfg.d_sae,), jnp.int32)
    kept = [] if keep else None
    for start, tokens, x in _batches(rows, read, "inspect: densities", verbose):
        counts = counts + _fired_counts(sae, x, jnp.asarray(mask[start : start + len(tokens)]))
        if keep:
            kept.append(x)
    return np.asarray(counts, dtype=np.float64) / max(int(mask.sum()), 1), kept


def gather_stats(sae, model, cfg: RunConfig, rows: np.ndarray, mask: np.ndarray, latents: list[int],
                 stats_cfg: LatentStatsConfig, *, seed: int = 0, activations: list | None = None,
                 verbose: bool = False) -> dict[str, np.ndarray]:
    """jsae.latent_stats over `rows` for `latents`: the host copy of the final state (`activations`: the
    batches `latent_densities` kept, else the model runs)."""
    read = _activation_reader(sae, model, cfg) if activations is None else activations
    stats = init_latent_stats(stats_cfg)
    index = jnp.asarray(latents, dtype=jnp.int32)
    key = jax.random.key(seed)
    context = rows.shape[1]
    for start, tokens, x in _batches(rows, read, "inspect: top activations", verbose):
        acts = _encode_latents(sae, x, index, tokens.shape)
        stats = update_latent_stats(stats, acts, jnp.asarray(mask[start : start + len(tokens)]),
                                    jnp.int32(start * context), jax.random.fold_in(key, start), cfg=stats_cfg)
    return stats_to_numpy(stats)


RESIDUAL_HOOKS = ("resid", "_out", "hook_mlp_in", "mlp.hook_in", "hook_normalized")


def residual_directions(sae, model, hook_name: str, hook_head_index: int | None, latents: list[int]):
    """The latents' decoder rows as residual-stream directions (latents, d_model), or None for a hook
    with no single linear map to the residual stream (e.g. attention hook_q / hook_k / hook_v).

    As sae-dashboard's to_resid_direction: rows at residual-stream hooks (resid_*, *_out, the MLP's
    input, ln hook_normalized) are used as they are; at an MLP's hook_pre / hook_post they go through
    that layer's W_out, at an attention hook_z through its W_O (one head with hook_head_index). A
    transcoder's rows live at its output hook (metadata.hook_name_out).
    """
    rows = np.asarray(sae.W_dec, dtype=np.float32)[latents]
    hook_name = sae.cfg.metadata.get("hook_name_out") or hook_name
    parts = hook_name.split(".")
    layer = int(parts[1]) if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit() else None
    if layer is not None and parts[-1] == "hook_z":
        W_O = model.blocks[layer].attn.W_O.detach().float().cpu().numpy()  # (n_heads, d_head, d_model)
        if hook_head_index is not None:
            return rows @ W_O[hook_head_index]
        return rows @ W_O.reshape(-1, W_O.shape[-1])  # rows are flattened (n_heads d_head)
    if layer is not None and parts[-2:] in (["mlp", "hook_pre"], ["mlp", "hook_post"]):
        return rows @ model.blocks[layer].mlp.W_out.detach().float().cpu().numpy()
    if any(key in hook_name for key in RESIDUAL_HOOKS) and rows.shape[1] == model.cfg.d_model:
        return rows
    return None


class _TokenText:
    """Each token id's text, decoded once (byte-level pieces of one id may not be valid UTF-8 alone)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)
        return self.cache[token_id]


def _context(rows: np.ndarray, token: int, value: float, window: np.ndarray, left: int, text) -> dict:
    """One example: the window of tokens around `token` with the latent's activation at each."""
    context = rows.shape[1]
    row, pos = divmod(int(token), context)
    start, stop = max(pos - left, 0), min(pos + len(window) - left, context)
    ids = rows[row, start:stop].tolist()
    acts = window[start - (pos - left) : stop - (pos - left)]
    return {"row": row, "position": pos, "value": float(value), "centre": pos - start, "token_ids": ids,
            "tokens": [text(i) for i in ids], "activations": [float(a) for a in acts]}


def quantile_examples(values: np.ndarray, tokens: np.ndarray, windows: np.ndarray, rows, left: int, text) -> list:
    """Examples from each quantile group of the sampled firing tokens, highest group first: the sample
    is uniform over the tokens where the latent fires, so its ranks estimate the firing distribution's."""
    order = np.argsort(values)
    groups = []
    for g in reversed(range(N_QUANTILE_GROUPS)):
        part = order[len(order) * g // N_QUANTILE_GROUPS : len(order) * (g + 1) // N_QUANTILE_GROUPS]
        if len(part) == 0:
            continue
        picks = part[np.unique(np.linspace(0, len(part) - 1, EXAMPLES_PER_QUANTILE).round().astype(int))][::-1]
        groups.append({"quantile": [g / N_QUANTILE_GROUPS, (g + 1) / N_QUANTILE_GROUPS],
                       "range": [float(values[part].min()), float(values[part].max())], "n_sampled": int(len(part)),
                       "examples": [_context(rows, tokens[i], values[i], windows[i], left, text) for i in picks]})
    return groups


def build_report(sae, model, cfg: RunConfig, rows: np.ndarray, latents: list[int], stats: dict,
                 stats_cfg: LatentStatsConfig, *, sae_dir: str, densities: np.ndarray | None = None) -> dict:
    """The JSON document of the dashboards (see docs/analysis.md for its fields)."""
    from jsae.neuronpedia import neuronpedia_url

    text = _TokenText(model.tokenizer)
    directions = residual_directions(sae, model, cfg.hook_name, cfg.hook_head_index, latents)
    logits = None
    if directions is not None:
        W_U = model.W_U.detach().float().cpu().numpy()
        logits = [np.asarray(a) for a in logit_effects(jnp.asarray(directions), jnp.asarray(W_U),
                                                       min(N_LOGITS, W_U.shape[1]))]
    n_tokens = int(stats["n_tokens"])
    meta = sae.cfg.metadata
    out = {"sae": {"path": str(sae_dir), "architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in,
                   "d_sae": sae.cfg.d_sae, "neuronpedia_id": meta.neuronpedia_id},
           "model_name": cfg.model_name, "hook_name": cfg.hook_name, "dataset_path": cfg.dataset_path,
           "split": heldout_split(cfg), "context_size": int(rows.shape[1]), "n_rows": int(rows.shape[0]),
           "n_tokens": n_tokens, "window": [stats_cfg.left, stats_cfg.right],
           "histogram_log10_edges": [round(float(e), 6) for e in stats_cfg.bin_edges()], "latents": []}
    for i, latent in enumerate(latents):
        fired = int(stats["n_fired"][i])
        top = [j for j in range(stats_cfg.n_top) if stats["top_values"][i, j] > 0]
        sampled = np.flatnonzero(stats["sample_keys"][i] >= 0)
        entry = {
            "index": latent, "density": fired / max(n_tokens, 1), "n_fired": fired,
            "mean_activation": float(stats["sum_fired"][i]) / fired if fired else 0.0,
            "max_activation": float(stats["top_values"][i, 0]) if top else 0.0,
            "histogram": [int(c) for c in stats["histogram"][i]],
            "top_contexts": [_context(rows, stats["top_tokens"][i, j], stats["top_values"][i, j],
                                      stats["top_windows"][i, j], stats_cfg.left, text) for j in top],
            "quantiles": quantile_examples(stats["sample_values"][i, sampled], stats["sample_tokens"][i, sampled],
                                           stats["sample_windows"][i, sampled], rows, stats_cfg.left, text),
        }
        if densities is not None:
            entry["rank_by_density"] = int(np.sum(densities > densities[latent]))
        if logits is not None:
            entry["promoted"] = [{"token": text(t), "id": int(t), "logit": float(v)}
                                 for v, t in zip(logits[0][i], logits[1][i], strict=True)]
            entry["suppressed"] = [{"token": text(t), "id": int(t), "logit": float(v)}
                                   for v, t in zip(logits[2][i], logits[3][i], strict=True)]
        if meta.neuronpedia_id:
            entry["neuronpedia_url"] = neuronpedia_url(sae, latent)
        out["latents"].append(entry)
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Write beside `path`, then rename: a reader sees the old file or the new one, never half of one
    (the file gets the mode `open` gives under the umask)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def choose_latents(sae, latents: str | None, top_density: int | None) -> list[int] | None:
    """The latents to show from --latents (None: the first DEFAULT_LATENTS); None back when --top-density
    decides them after the density pass."""
    if latents is not None and top_density is not None:
        raise ConfigError("give --latents or --top-density, not both.")
    if top_density is not None:
        if isinstance(top_density, bool) or top_density < 1 or top_density > sae.cfg.d_sae:
            raise ConfigError(f"--top-density: expected 1 to d_sae={sae.cfg.d_sae} latents, got {top_density!r}.")
        return None
    return parse_latents(latents or f"0-{min(DEFAULT_LATENTS, sae.cfg.d_sae) - 1}", sae.cfg.d_sae)


def inspect_sae(sae, cfg: RunConfig, out_dir: str | os.PathLike, *, latents: list[int] | None = None,
                top_density: int | None = None, n_tokens: int = DEFAULT_TOKENS, sae_dir: str = "",
                stats_cfg: LatentStatsConfig | None = None, verbose: bool = False) -> dict:
    """Run the pass and write `out_dir`/latents.json and `out_dir`/index.html; returns the JSON document.

    Args:
        latents: the latents to show; None with `top_density`: the N latents that fire most often.
        n_tokens: held-out tokens to read (whole rows; fewer where the data ends).
    """
    from bridge.dry_run import check_folder
    from jsae.dashboard import render_dashboard

    out_dir = Path(out_dir).expanduser()
    check_folder(out_dir, "--out")
    model = load_eval_model(sae, cfg)
    rows = read_rows(cfg, model, math.ceil(n_tokens / cfg.context_size))
    mask = counted_mask(cfg, model, rows)
    densities = kept = None
    if latents is None:
        keep = rows.size * sae.cfg.d_in * 4 <= KEEP_ACTIVATIONS_BYTES
        densities, kept = latent_densities(sae, model, cfg, rows, mask, keep=keep, verbose=verbose)
        latents = [int(i) for i in np.argsort(-densities, kind="stable")[:top_density]]
    stats_cfg = stats_cfg or LatentStatsConfig(n_latents=len(latents))
    if stats_cfg.n_latents != len(latents):
        raise ConfigError(f"LatentStatsConfig.n_latents={stats_cfg.n_latents} but {len(latents)} latents are shown.")
    stats = gather_stats(sae, model, cfg, rows, mask, latents, stats_cfg, activations=kept, verbose=verbose)
    report = build_report(sae, model, cfg, rows, latents, stats, stats_cfg, sae_dir=sae_dir, densities=densities)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / JSON_NAME, json.dumps(report, allow_nan=False))
    _write_atomic(out_dir / HTML_NAME, render_dashboard(report))
    return report


def inspect_command(args) -> int:
    """`jsae inspect`: the command line's arguments to `inspect_sae`, or with --dry-run its checks."""
    import jsae
    from bridge.eval_run import check_finite_weights

    sae = jsae.SAE.load_from_disk(args.sae_dir)
    check_finite_weights(sae, args.sae_dir)
    latents = choose_latents(sae, args.latents, args.top_density)
    cfg = inspect_config(sae, n_tokens=args.tokens, model_name=args.model, dataset_path=args.dataset,
                         hook_name=args.hook, context_size=args.context_size, device=args.device)
    out_dir = args.out or os.path.join(args.sae_dir, "inspect")
    which = f"the {args.top_density} densest latents" if latents is None else f"{len(latents)} latents"
    if args.dry_run:
        from bridge.dry_run import check_folder, dry_run_eval

        lines = [f"SAE: {args.sae_dir} ({sae.cfg.architecture} {sae.cfg.d_in} -> {sae.cfg.d_sae}), {which}",
                 *dry_run_eval(sae, cfg), f"--out: {out_dir} ({check_folder(out_dir, '--out')})"]
        print("jsae inspect --dry-run:")
        print("\n".join(f"  {line}" for line in lines))
        print("dry run: every check passed; nothing was read past the first row or written.")
        return 0
    print(f"jsae inspect: {which} of {sae.cfg.architecture} SAE {sae.cfg.d_in} -> {sae.cfg.d_sae} on "
          f"{cfg.model_name} {cfg.hook_name}, {args.tokens:,} held-out tokens of {cfg.dataset_path}", flush=True)
    report = inspect_sae(sae, cfg, out_dir, latents=latents, top_density=args.top_density, n_tokens=args.tokens,
                         sae_dir=args.sae_dir, verbose=True)
    print(f"{len(report['latents'])} latents over {report['n_tokens']:,} tokens: {os.path.join(out_dir, HTML_NAME)} "
          f"and {JSON_NAME}")
    return 0
