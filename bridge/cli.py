"""The `jsae` command line: train, eval, cache, demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["build_parser", "load_config", "main"]


def _overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs as a nested dict; "sae.k=16" sets k in the sae section. Values are read
    as the config file is (bridge.run_config.load_yaml), so `lr=3e-4` is the float it reads as there."""
    import yaml

    from bridge.run_config import load_yaml
    from jsae import ConfigError

    out: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}.")
        *parents, leaf = key.split(".")
        target = out
        for parent in parents:
            target = target.setdefault(parent, {})
        try:
            target[leaf] = load_yaml(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: not a YAML value: {value!r} ({err}).") from None
    return out


def load_config(args: argparse.Namespace):
    """The run config of a `train` / `cache` command line: the config file (default: configs/default.yaml),
    --set overrides and --output-path on top."""
    from bridge.run_config import DEFAULT_CONFIG, RunConfig

    overrides = _overrides(args.set)
    if getattr(args, "output_path", None):
        overrides["output_path"] = args.output_path
    return RunConfig.from_yaml(args.config or DEFAULT_CONFIG, overrides)


def _plan_line(cfg) -> str:
    """"plan: ..." — the execution plan the run's trainer resolves (jsae.resolve_plan), on one line."""
    from bridge.run import run_members
    from jsae.backends import resolve_plan

    return f"plan: {resolve_plan(cfg.train, n_members=len(run_members(cfg)[0])).describe()}"


def _json_line(obj) -> str:
    """`obj` as one line of strict JSON: a NaN or infinite number is written as null (json.dumps would
    write the bare NaN / Infinity no JSON parser accepts)."""
    import math

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(v) for key, v in value.items()}
        if isinstance(value, list | tuple):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(obj), allow_nan=False)


def _print_report(command: str, lines: list[str], plan: str | None) -> None:
    print(f"jsae {command} --dry-run:")
    for line in lines:
        print(f"  {line}")
    if plan is not None:
        print(plan)
    print("dry run: every check passed; nothing was trained or written.")


def train(args: argparse.Namespace) -> int:
    """Train an SAE on a language model's activations and write an SAELens folder."""
    from bridge.run import run

    cfg = load_config(args)
    what = f"{cfg.train.sae.architecture} SAE {cfg.train.sae.d_in} -> {cfg.train.sae.d_sae}"
    if cfg.sweep:
        what = f"sweep of {len(next(iter(cfg.sweep.values())))} {what}s over {', '.join(cfg.sweep)}"
    hooks = ", ".join(cfg.hooks) + (f" -> {cfg.hook_name_out}" if cfg.hook_name_out is not None else "")
    print(f"jsae train: {what} on {cfg.model_name} {hooks}, {cfg.train.total_training_tokens:,} "
          "tokens", flush=True)
    if args.dry_run:
        from bridge.dry_run import dry_run_train

        _print_report("train", dry_run_train(cfg), _plan_line(cfg))
        return 0
    print(_plan_line(cfg), flush=True)
    _hugepage_hint()
    sae, summary = run(cfg)
    import jax

    if jax.process_index() != 0:  # process 0 wrote the folder and reports
        return 0
    where = cfg.train.output_path or "(not saved: no output_path)"
    if "saes" in summary:  # a sweep or several hooks: one row per SAE
        from bridge.summaries import summary_table

        print(f"\n{len(sae)} SAEs written to {where}/<name>\n")
        print(summary_table(summary["saes"], list(cfg.sweep)))
        if args.json:
            print(_json_line(summary))
        return 0
    print(f"\nSAE written to {where}")
    if "l0" not in summary:
        print(f"evals off (n_eval_batches: 0) | dead features {summary['dead_features']} of {sae.cfg.d_sae}")
        if args.json:
            print(_json_line(summary))
        return 0
    print(f"held-out ({int(summary['total_tokens_eval_sparsity_variance']):,} tokens): L0 {summary['l0']:.1f} | "
          f"explained variance {summary['explained_variance']:.3f} | MSE {summary['mse']:.4g} | dead features "
          f"{summary['dead_features']} of {sae.cfg.d_sae} ({100 * summary['dead_fraction']:.1f}%)")
    print(f"spliced into the model: CE loss score {summary['ce_loss_score']:.3f} (CE {summary['ce_loss_without_sae']:.3f} "
          f"clean, {summary['ce_loss_with_sae']:.3f} with the SAE, {summary['ce_loss_with_ablation']:.3f} zero-ablated) "
          f"| KL score {summary['kl_div_score']:.3f}")
    if summary.get("plots"):
        print(f"plots: {', '.join(summary['plots'])}")
    if args.json:
        print(_json_line(summary))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate a SAELens-format SAE folder with it spliced into its model (SAELens' run_evals metrics)."""
    import jsae
    from bridge.eval_run import check_finite_weights, eval_run_config, evaluate_sae

    sae = jsae.SAE.load_from_disk(args.sae_dir)
    check_finite_weights(sae, args.sae_dir)
    cfg = eval_run_config(sae, model_name=args.model, dataset_path=args.dataset, hook_name=args.hook,
                          n_eval_batches=args.batches, eval_batch_size_prompts=args.batch_size,
                          context_size=args.context_size, device=args.device)
    if args.dry_run:
        from bridge.dry_run import dry_run_eval

        lines = [f"SAE: {args.sae_dir} ({sae.cfg.architecture} {sae.cfg.d_in} -> {sae.cfg.d_sae})"]
        _print_report("eval", lines + dry_run_eval(sae, cfg), None)
        return 0
    if not args.json:
        print(f"jsae eval: {sae.cfg.architecture} SAE {sae.cfg.d_in} -> {sae.cfg.d_sae} on {cfg.model_name} "
              f"{cfg.hook_name}, data {cfg.dataset_path}", flush=True)
    metrics, _ = evaluate_sae(sae, cfg, verbose=not args.json)
    if args.json:
        print(_json_line(metrics))
        return 0
    for group, values in metrics.items():
        print(f"{group}:")
        for name, value in values.items():
            print(f"  {name:<36} {value:.6g}" if isinstance(value, float) else f"  {name:<36} {value}")
    return 0


def cache(args: argparse.Namespace) -> int:
    """Write the configured run's activations to disk once, for repeated training."""
    from bridge.cache import write_cache
    from bridge.run import prepare
    from bridge.saelens_cache import write_saelens_cache

    cfg = load_config(args)
    if args.cache_path:
        path = args.cache_path
    elif cfg.activations_cache:
        path = cfg.activations_cache
    else:
        raise SystemExit("jsae cache: give --cache-path, or set activation_cache_path (or SAELens' "
                         "cached_activations_path / use_cached_activations) in the config.")
    if args.dry_run:
        from bridge.dry_run import dry_run_train

        _print_report("cache", dry_run_train(cfg, cache_path=path), None)
        return 0
    model, cfg = prepare(cfg)
    writer = write_saelens_cache if args.format == "saelens" else write_cache
    info = writer(cfg, model, path, n_tokens=args.tokens or cfg.train.total_training_tokens)
    print(f"cache written to {path}: {info['n_tokens']:,} tokens in {info['n_shards']} shards")
    return 0


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


def _hugepage_hint() -> None:
    """One line on stderr where huge pages would speed training on CPU and the environment has them off
    (jsae.backends.hugepages): glibc reads its tunables at start-up, so only the user's environment can
    turn them on."""
    from jsae.backends import default_platform
    from jsae.backends.hugepages import hugepage_hint

    hint = hugepage_hint(dict(os.environ), default_platform())
    if hint is not None:
        print(hint, file=sys.stderr, flush=True)


DRY_RUN_HELP = ("check the config, model, hook, data and output paths, print the plan, and exit without "
                "training or writing anything")


def _jax_memory_policy(args: argparse.Namespace) -> None:
    """JAX's GPU memory variables for a command whose model shares the GPU with JAX
    (bridge.model.apply_jax_memory_policy). Runs before anything starts JAX's backend, which reads them once."""
    from bridge.model import apply_jax_memory_policy

    if args.command in ("eval", "inspect"):
        apply_jax_memory_policy(args.device, None)
    elif args.command in ("train", "cache", "plan"):
        cfg = load_config(args)
        apply_jax_memory_policy(cfg.device, cfg.jax_memory_fraction)


def build_parser() -> argparse.ArgumentParser:
    """The `jsae` command line's parser; each command's function is `args.func`."""
    parser = argparse.ArgumentParser(prog="jsae", description="Sparse autoencoders in JAX, SAELens-compatible.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an SAE (default: configs/default.yaml, the embedded model)")
    p.add_argument("config", nargs="?", default=None, help="run config YAML (default: configs/default.yaml)")
    p.add_argument("--output-path", default=None, help="where the SAE folder is written")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (YAML value)")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line (a NaN or infinite "
                   "value is written as null)")
    p.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process run: process 0's address (with --num-processes and --process-id; not needed "
                        "under SLURM, mpirun or JAX_COORDINATOR_ADDRESS, which JAX reads itself)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-process run: how many processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-process run: this process's index, from 0")
    p.set_defaults(func=train)

    p = sub.add_parser("eval", help="evaluate an SAE folder (jsae or sae_lens) spliced into its model")
    p.add_argument("sae_dir", help="folder with cfg.json and sae_weights.safetensors")
    p.add_argument("--model", default=None, help="model (default: the SAE's metadata.model_name, else embedded)")
    p.add_argument("--dataset", default=None, help="dataset (default: the SAE's metadata.dataset_path, else stdlib)")
    p.add_argument("--hook", default=None, help="hook point (default: the SAE's metadata.hook_name)")
    p.add_argument("--batches", type=int, default=10, help="batches of token rows to evaluate on, >= 1 (default 10)")
    p.add_argument("--batch-size", type=int, default=16, help="token rows per batch (default 16)")
    p.add_argument("--context-size", type=int, default=None, help="tokens per row (default: the SAE's metadata)")
    p.add_argument("--device", default="auto", help="torch device of the model: auto (CUDA when torch sees CUDA "
                   "and JAX runs on a GPU, else cpu; the default), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout (strict "
                   "JSON: a metric that is NaN or infinite is null; an SAE with non-finite weights is an error, exit 2)")
    p.add_argument("--dry-run", action="store_true", help="check the SAE folder, model, hook and data; evaluate nothing")
    p.set_defaults(func=evaluate)

    p = sub.add_parser("cache", help="write a run's activations to disk")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--cache-path", default=None)
    p.add_argument("--tokens", type=int, default=None, help="tokens to cache (default: total_training_tokens)")
    p.add_argument("--format", choices=("jsae", "saelens"), default="jsae", help="jsae's layout (the default, "
                   "read fastest) or SAELens' (a datasets folder sae_lens trains from as cached_activations_path)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (YAML value)")
    p.add_argument("--dry-run", action="store_true", help="check the config, model, hook, data and cache path; "
                   "write nothing")
    p.set_defaults(func=cache)

    p = sub.add_parser("plan", help="print a run's execution plan, mesh and per-device memory; train nothing")
    p.add_argument("config", nargs="?", default=None, help="run config YAML (default: configs/default.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (YAML value)")
    p.add_argument("--json", action="store_true", help="print one JSON object (plan, mesh, per_device_bytes, fits)")
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default=None,
                   help="plan the step another platform runs (default: this machine's devices)")
    p.add_argument("--device-memory-gib", type=float, default=None,
                   help="memory of one device, GiB (default: the local device's; needed with another --platform)")
    p.add_argument("--dry-run", action="store_true", help="accepted for uniformity: plan never trains or writes")
    p.set_defaults(func=plan)

    p = sub.add_parser("pretrained", help="list SAELens' pretrained releases and SAE ids (offline)")
    from jsae.releases import add_cli_arguments, cli_command

    add_cli_arguments(p)
    p.set_defaults(func=cli_command)

    from bridge.pretokenize import add_parser as add_pretokenize_parser

    add_pretokenize_parser(sub)

    p = sub.add_parser("inspect", help="feature dashboards of an SAE folder: an HTML page and a JSON file")
    p.add_argument("sae_dir", help="folder with cfg.json and sae_weights.safetensors")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--latents", default=None, help="latents to show, e.g. 0-63 or 1,5,9-12 (default: the first 64)")
    which.add_argument("--top-density", type=int, default=None, metavar="N",
                       help="show the N latents that fire most often on the tokens read (one more pass)")
    p.add_argument("--tokens", type=int, default=65_536, help="held-out tokens to read, in whole rows (default 65536)")
    p.add_argument("--out", default=None, help="folder for index.html and latents.json (default: SAE_DIR/inspect)")
    p.add_argument("--model", default=None, help="model (default: the SAE's metadata.model_name, else embedded)")
    p.add_argument("--dataset", default=None, help="dataset (default: the SAE's metadata.dataset_path, else stdlib)")
    p.add_argument("--hook", default=None, help="hook point (default: the SAE's metadata.hook_name)")
    p.add_argument("--context-size", type=int, default=None, help="tokens per row (default: the SAE's metadata)")
    p.add_argument("--device", default="auto", help="torch device of the model (as for jsae eval; default auto)")
    p.add_argument("--dry-run", action="store_true", help="check the SAE folder, latents, model, hook, data and --out; "
                   "read and write nothing else")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("demo", help="load, run and round-trip an SAE on a small TransformerLens model")
    p.add_argument("--output-path", default=None, help="where to write the demo SAE folder")
    p.set_defaults(func=demo)

    return parser


def _inspect(args: argparse.Namespace) -> int:
    """Feature dashboards of an SAE folder (bridge.inspect_run)."""
    from bridge.inspect_run import inspect_command

    return inspect_command(args)


def plan(args: argparse.Namespace) -> int:
    """The execution plan, the mesh and each device's memory (XLA's analysis of the compiled step, the
    shuffle buffer, the model's weights); exit 1 with suggestions where the run would not fit."""
    from bridge.plan import format_report, plan_report

    with contextlib.redirect_stdout(sys.stderr):  # model loaders that print must not mix with --json output
        limit = None if args.device_memory_gib is None else int(args.device_memory_gib * (1 << 30))
        report = plan_report(load_config(args), platform=args.platform, device_bytes=limit)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["fits"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        # its pass alternates torch forwards and JAX steps on the same cores: OpenMP threads spinning
        # after each torch operation would take them from XLA (libgomp reads this once, when torch loads)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from jsae import JsaeError, enable_compilation_cache
    from jsae.training.hooks import sigterm_interrupts

    try:  # SIGTERM stops a command as Ctrl-C does (training checkpoints first: TrainingInterrupted)
        with sigterm_interrupts():
            _jax_memory_policy(args)
            if args.command == "train" and not args.dry_run:
                from bridge.distributed import initialize

                initialize(args.coordinator, args.num_processes, args.process_id)
            # at a real command line: programs compiled by an earlier run of the same shapes load from disk (a
            # dry run compiles nothing and leaves nothing behind, the cache folder included)
            if argv is None and not getattr(args, "dry_run", False):
                enable_compilation_cache()
            return args.func(args)
    except JsaeError as err:
        print(f"jsae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jsae {args.command}: stopped by a signal", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
