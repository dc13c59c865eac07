"""The training loop: feeds batches to the pure step on a device mesh, logs, checkpoints, resumes.

The loop owns no math: the step (jsae.training.step) does all of it. What lives here is what
must touch the host: data, the mesh, metrics files, orbax checkpoints, signals, the final save.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jsae._errors import ConfigError, InputError, JsaeError
from jsae.backends import ExecutionPlan, resolve_plan
from jsae.sae import SAE
from jsae.saes import TrainingArchitecture, get_training_architecture
from jsae.training.config import TrainConfig
from jsae.training.step import (
    TrainState,
    estimate_scaling_factor,
    feature_density,
    init_train_state,
    log_feature_sparsity,
    make_train_step,
)
from jsae.training.sweep import Sweep, check_members, init_sweep_state, make_sweep_step, member_state

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Per-latent TrainState counters (one entry per latent), split over the model axis with the latents.
LATENT_COUNTERS = ("steps_since_fired", "act_freq")


def state_sharding(state: Any, mesh: Mesh, arch: TrainingArchitecture) -> Any:
    """NamedShardings for `state` (a TrainState or its abstract shapes) that split the latents over the
    mesh's model axis: the architecture's per-latent parameters (`arch.latent_axes`; their Adam
    moments carry the same names) and the per-latent counters. Derived from the leaves' names,
    never their shapes (d_in may equal d_sae); everything else is replicated."""
    axes = dict(arch.latent_axes) | dict.fromkeys(LATENT_COUNTERS, -1)

    def sharding(path, leaf):
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        axis = axes.get(name) if isinstance(name, str) else None
        ndim = len(getattr(leaf, "shape", ()))
        if axis is None or ndim < -axis:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*(MODEL_AXIS if i == ndim + axis else None for i in range(ndim))))

    return jax.tree_util.tree_map_with_path(sharding, state)


class TrainingInterrupted(JsaeError, KeyboardInterrupt):
    """Raised after SIGTERM / Ctrl-C once the checkpoint has been written."""


class Trainer:
    """Trains one SAE on a mesh of devices (all processes' devices after `jax.distributed.initialize`):
    data parallel, or with `cfg.model_axis_size > 1` a (data, model) mesh whose model axis splits the
    latents.

    Args:
        cfg: the run config (with a sweep: the loop settings shared by every member).
        devices: devices of the mesh (default: the first `cfg.n_devices` of `jax.devices()`).
        sweep: several SAEs trained together in one compiled step (`jsae.training.sweep.Sweep`);
            `fit` then returns one SAE per member and saves each to <output_path>/<name>.
    """

    def __init__(self, cfg: TrainConfig, devices: list | None = None, *, sweep: Sweep | None = None):
        self.cfg = cfg
        self.sweep = sweep
        self.arch = get_training_architecture(cfg.sae.architecture)
        if sweep is not None:
            for field in ("total_training_tokens", "train_batch_size_tokens", "n_batches_for_norm_estimate"):
                values = {getattr(m, field) for m in sweep.members}
                if values != {getattr(cfg, field)}:
                    raise ConfigError(f"sweep: every member needs the run's {field}={getattr(cfg, field)}, "
                                      f"found {sorted(values)}.")
        if devices is None:
            available = jax.devices()
            n = cfg.n_devices or len(available)
            if n > len(available):
                raise ConfigError(f"TrainConfig.n_devices={n}, but only {len(available)} device(s) exist.")
            devices = available[:n]
        self.devices = list(devices)
        n = len(self.devices)
        self.model_axis_size = model = cfg.model_axis_size
        if n % model:
            raise ConfigError(
                f"TrainConfig.model_axis_size={model} does not divide the {n} device(s) of the mesh"
                + (" (larger than the devices available)" if model > n else "")
                + f"; choose a divisor of {n}, or set n_devices."
            )
        n_data = n // model
        if cfg.train_batch_size_tokens % n_data:
            data_axis = (f"{n} devices of the mesh" if model == 1 else
                         f"data axis size {n_data} ({n} devices / model_axis_size={model})")
            raise ConfigError(
                f"TrainConfig.train_batch_size_tokens={cfg.train_batch_size_tokens} is not divisible by the "
                f"{data_axis}; choose a multiple of {n_data}."
            )
        self.n_processes = jax.process_count()
        if cfg.train_batch_size_tokens % self.n_processes:
            raise ConfigError(
                f"TrainConfig.train_batch_size_tokens={cfg.train_batch_size_tokens} is not divisible by the "
                f"{self.n_processes} processes."
            )
        self.local_batch_size = cfg.train_batch_size_tokens // self.n_processes
        if model == 1:
            self.mesh = Mesh(np.array(self.devices), (DATA_AXIS,))
        else:
            grid = np.array(self.devices).reshape(n_data, model)
            split = [row for row in grid if len({d.process_index for d in row}) > 1]
            if split:
                raise ConfigError(
                    f"TrainConfig.model_axis_size={model} would split latents over devices of different processes; "
                    f"choose a divisor of each process's device count ({jax.local_device_count()})."
                )
            self.mesh = Mesh(grid, (DATA_AXIS, MODEL_AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        stacked = sweep is not None and bool(sweep.streams)
        batch_spec = P(None, DATA_AXIS) if stacked else P(DATA_AXIS)
        self.batch_sharding = NamedSharding(self.mesh, batch_spec)
        shape_cfg = cfg if sweep is None else check_members(sweep.members).replace(sweep_strategy=cfg.sweep_strategy)
        self.plan: ExecutionPlan = resolve_plan(shape_cfg, devices=self.devices,
                                                n_members=1 if sweep is None else len(sweep.members),
                                                feature_sharded=model > 1)
        options = self.plan.jit_compiler_options
        if model > 1:
            # GSPMD: the plain step on the global batch; XLA partitions it (top-k over sharded latents
            # included) and inserts the collectives. The state stays sharded between steps.
            shardings = state_sharding(jax.eval_shape(self._fresh_state), self.mesh, self.arch)
            self.step_fn = jax.jit(self._make_step(None), in_shardings=(shardings, self.batch_sharding),
                                   out_shardings=(shardings, self.replicated), donate_argnums=0,
                                   compiler_options=options)
        elif n == 1:
            self.step_fn = jax.jit(self._make_step(None), donate_argnums=0, compiler_options=options)
        else:
            sharded = jax.shard_map(
                self._make_step(DATA_AXIS),
                mesh=self.mesh,
                in_specs=(P(), batch_spec),
                out_specs=(P(), P()),
            )
            self.step_fn = jax.jit(sharded, donate_argnums=0, compiler_options=options)
        sync = cfg.sync_every_n_steps
        if sync is None:  # XLA's CPU collectives deadlock when many steps are in flight
            sync = 1 if n > 1 and self.devices[0].platform == "cpu" else 0
        self.sync_every = sync
        self.is_primary = jax.process_index() == 0
        self.fingerprint = self._fingerprint()
        self._stop_signal: int | None = None

    def _make_step(self, axis_name: str | None):
        if self.sweep is None:
            return make_train_step(self.cfg, axis_name, plan=self.plan)
        return make_sweep_step(self.sweep.members, axis_name, self.sweep.streams, plan=self.plan)

    def _fresh_state(self, scaling_factor: float | list[float] = 1.0, params: dict | None = None) -> TrainState:
        if self.sweep is None:
            return init_train_state(self.cfg, params=params, scaling_factor=scaling_factor)
        if params is not None:
            raise InputError("fit(params=...) cannot be combined with a sweep (each member initialises from its seed).")
        return init_sweep_state(self.sweep.members, scaling_factor=scaling_factor)

    # ------------------------------------------------------------------ data
    def _to_global(self, batch: Any) -> jax.Array:
        shape = tuple(getattr(batch, "shape", ()))
        d_in = self.cfg.sae.d_in
        streams = self._n_streams()
        expected = (self.local_batch_size, d_in) if streams is None else (streams, self.local_batch_size, d_in)
        if len(shape) != len(expected) or shape[-1] != d_in or (streams is not None and shape[0] != streams):
            want = f"({self.local_batch_size}, d_in={d_in})" if streams is None else (
                f"(n_streams={streams}, {self.local_batch_size}, d_in={d_in})")
            raise InputError(
                f"batch: expected shape {want} of activations"
                + (" (one slice per activation stream)" if streams is not None else "")
                + f", got {shape}; the SAE config's d_in must match the activations' width."
            )
        if shape[-2] != self.local_batch_size:
            raise InputError(
                f"batch: expected {self.local_batch_size} tokens per process (train_batch_size_tokens="
                f"{self.cfg.train_batch_size_tokens} over {self.n_processes} process(es)), got {shape[-2]}."
            )
        if isinstance(batch, jax.Array) and len(self.devices) == 1 and self.n_processes == 1:
            return jax.device_put(batch, self.batch_sharding)  # no copy; the sharding _compile_step compiles for
        return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(batch))

    def _n_streams(self) -> int | None:
        """Activation streams a sweep's batches stack (several hook points), None for one (tokens, d_in) batch."""
        return self.sweep.n_streams if self.sweep is not None and self.sweep.streams else None

    def _compile_step(self, state: TrainState, dtype: Any) -> None:
        """Compile the step for global batches of `dtype` (jit reuses it at the first step)."""
        tokens, d_in = self.local_batch_size * self.n_processes, self.cfg.sae.d_in
        streams = self._n_streams()
        shape = (tokens, d_in) if streams is None else (streams, tokens, d_in)
        self.step_fn.lower(state, jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=self.batch_sharding)).compile()

    @staticmethod
    def _skip(iterator: Iterator, source: Any, n: int) -> None:
        if n <= 0:
            return
        if hasattr(source, "seek"):
            source.seek(n)
            return
        for _ in range(n):
            next(iterator)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_manager(self):
        if self.cfg.checkpoint_path is None:
            return None
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.cfg.keep_checkpoints, create=True, enable_async_checkpointing=False
        )
        return ocp.CheckpointManager(Path(self.cfg.checkpoint_path).absolute(), options=options)

    def _save(self, manager, state: TrainState, meta: dict) -> None:
        import orbax.checkpoint as ocp

        step = int(meta["batches_consumed"])
        if step in manager.all_steps():
            return
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()

    def _restore(self, manager, template: TrainState) -> tuple[TrainState, dict] | None:
        import orbax.checkpoint as ocp

        step = manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                template, self._sharding(template))
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return restored["state"], restored["meta"]

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            self._stop_signal = signum

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    # ------------------------------------------------------------------ the loop
    def init_state(self, scaling_factor: float | list[float] = 1.0, params: dict | None = None) -> TrainState:
        state = self._fresh_state(scaling_factor, params)
        return jax.device_put(state, self._sharding(state))

    def _sharding(self, state: Any) -> Any:
        """Where each leaf of `state` lives: replicated, or with the latents split over the model axis."""
        if self.model_axis_size == 1:
            return jax.tree.map(lambda _: self.replicated, state)
        return state_sharding(state, self.mesh, self.arch)

    def _to_host(self, tree: Any) -> Any:
        """`tree` as numpy arrays on this process; gathers shards held by other processes (a collective:
        every process must call it)."""
        if self.model_axis_size > 1 and self.n_processes > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_get(tree)

    def fit(self, batches: Iterable, *, params: dict | None = None,
            evaluator: Callable[[SAE], Mapping[str, float]] | None = None,
            batch_dtype: Any = None) -> SAE | list[SAE]:
        """Train on `batches` (an iterable of (tokens, d_in) arrays, this process's share) and return the SAE
        (with a sweep: the list of SAEs, in member order).

        Args:
            batches: numpy / jax arrays ((n_streams, tokens, d_in) for a sweep over several streams); an
                object with `seek(n)` resumes without replaying data.
            params: initial parameters (default: SAELens' initialisation from `cfg.seed`).
            evaluator: called with the SAE as it would be saved every `cfg.eval_every_n_steps` steps and
                at the end (primary process only); its metrics are logged with an "eval/" prefix, and
                the final ones are written into the saved SAE's metadata as `eval_metrics`.
            batch_dtype: the batches' dtype, if known: the step is then compiled before the first batch
                is drawn (while a producer that `iter(batches)` started fills its buffer) instead of at
                step 0. Another dtype only costs a second compile.
        """
        cfg = self.cfg
        iterator = iter(batches)
        manager = self._checkpoint_manager()
        restored = None
        template = self.init_state(params=params)
        if manager is not None and cfg.resume:
            restored = self._restore(manager, template)
        if restored is not None:
            state, meta = restored
            self._check_same_run(meta)
            consumed = int(meta["batches_consumed"])
            self._skip(iterator, batches, consumed)
        else:
            consumed = 0
            state = template
            if cfg.sae.normalize_activations == "expected_average_only_in" and cfg.n_batches_for_norm_estimate:
                sample = [self._next(iterator, 0) for _ in range(cfg.n_batches_for_norm_estimate)]
                consumed = len(sample)
                scaling_factor = jnp.asarray(self._scaling_factor(sample), jnp.float32)
                state = template.replace(scaling_factor=jax.device_put(scaling_factor, self.replicated))
        del template

        norm_batches = consumed if restored is None else int(meta["norm_batches"])
        start_step = consumed - norm_batches
        logger = MetricsLogger(cfg, enabled=self.is_primary, append=restored is not None)
        logger.log_plan(start_step, start_step * cfg.train_batch_size_tokens, self.plan.to_dict())
        total = cfg.total_training_steps
        progress = _progress(cfg, start_step, enabled=self.is_primary)
        previous = self._install_signal_handlers()
        last_metrics = None
        t0, tokens_since = time.perf_counter(), 0
        try:
            if batch_dtype is not None and start_step < total:
                self._compile_step(state, batch_dtype)
            for step_index in range(start_step, total):
                batch = self._to_global(self._next(iterator, step_index))
                state, metrics = self.step_fn(state, batch)
                consumed += 1
                tokens_since += cfg.train_batch_size_tokens
                if cfg.on_nonfinite == "error" and last_metrics is not None:
                    self._check_finite(last_metrics, step_index - 1)
                last_metrics = metrics
                if self.sync_every and (step_index + 1) % self.sync_every == 0:
                    jax.block_until_ready(metrics)
                done = step_index + 1
                if done % cfg.log_every_n_steps == 0 or done == total:
                    values, shown = self._metric_values(jax.device_get(metrics))
                    elapsed = time.perf_counter() - t0
                    values["details/tokens_per_second"] = tokens_since / max(elapsed, 1e-9)
                    t0, tokens_since = time.perf_counter(), 0
                    logger.log(done, done * cfg.train_batch_size_tokens, values)
                    progress.update(shown, done)
                if (evaluator is not None and cfg.eval_every_n_steps and done % cfg.eval_every_n_steps == 0
                        and done != total):
                    self._evaluate(evaluator, self._saes(state, for_eval=True), logger, done)
                if manager is not None and cfg.checkpoint_every_n_steps and done % cfg.checkpoint_every_n_steps == 0:
                    self._save(manager, state, self._meta(consumed, norm_batches, done))
                if self._stop_signal is not None:
                    if manager is not None:
                        self._save(manager, state, self._meta(consumed, norm_batches, done))
                    raise TrainingInterrupted(
                        f"training stopped by signal {self._stop_signal} after step {done}"
                        + (f"; resume from {cfg.checkpoint_path}" if manager is not None else "")
                    )
            if cfg.on_nonfinite == "error" and last_metrics is not None:
                self._check_finite(last_metrics, total - 1)
            if manager is not None:
                self._save(manager, state, self._meta(consumed, norm_batches, total))
            saes = self._saes(state)
            if evaluator is not None and self.is_primary:
                finals = self._evaluate(evaluator, saes, logger, total)
                saes = [SAE(sae.cfg.replace(metadata=sae.cfg.metadata.replace(eval_metrics=final)), sae.params,
                            sae.sparsity) for sae, final in zip(saes, finals, strict=True)]
        finally:
            self._restore_signal_handlers(previous)
            progress.close()
            logger.close()
            if manager is not None:
                manager.close()
        self.state = state
        if cfg.output_path is not None and self.is_primary:
            for name, sae in zip(self._names(), saes, strict=True):
                sae.save_model(cfg.output_path if name is None else Path(cfg.output_path) / name)
        return saes if self.sweep is not None else saes[0]

    def _names(self) -> list[str | None]:
        return list(self.sweep.names) if self.sweep is not None else [None]

    def _saes(self, state: TrainState, *, for_eval: bool = False) -> list[SAE]:
        """Every SAE of `state` as it would be saved (a collective when latents are split over processes)."""
        if for_eval and not self.is_primary and not (self.model_axis_size > 1 and self.n_processes > 1):
            return []
        if self.sweep is None:
            return [self.inference_sae(state)]
        return [self.inference_sae(member_state(state, i), member)
                for i, member in enumerate(self.sweep.members)]

    def _scaling_factor(self, sample: list) -> float | list[float]:
        """expected_average_only_in: one scale for one stream, else one per stream handed to its members."""
        d_in = self.cfg.sae.d_in
        if self.sweep is None:
            return estimate_scaling_factor(sample, d_in)
        if not self.sweep.streams:
            return [estimate_scaling_factor(sample, d_in)] * len(self.sweep.members)
        per_stream = [estimate_scaling_factor([b[s] for b in sample], d_in) for s in range(self.sweep.n_streams)]
        return [per_stream[s] for s in self.sweep.streams]

    def _metric_values(self, metrics: dict) -> tuple[dict[str, float], dict[str, float]]:
        """(what is logged, what the progress bar shows): a sweep logs "<name>/<metric>" per member and
        shows the mean over members."""
        if self.sweep is None:
            values = {k: float(v) for k, v in metrics.items()}
            return values, values
        values, shown = {}, {}
        for key, value in metrics.items():
            array = np.asarray(value, np.float64)
            for name, v in zip(self.sweep.names, array, strict=True):
                values[f"{name}/{key}"] = float(v)
            shown[key] = float(array.mean())
        return values, shown

    def _evaluate(self, evaluator, saes: list[SAE], logger: MetricsLogger, step: int) -> list[dict[str, float]]:
        """Run the evaluator on each SAE and log its metrics as "eval/<metric>" ("eval/<name>/<metric>" in a sweep)."""
        if not self.is_primary:
            return []
        results, logged = [], {}
        for name, sae in zip(self._names(), saes, strict=True):
            values = {k: float(v) for k, v in evaluator(sae).items()}
            prefix = "eval/" if name is None else f"eval/{name}/"
            logged |= {prefix + k: v for k, v in values.items()}
            results.append(values)
        logger.log(step, step * self.cfg.train_batch_size_tokens, logged)
        return results

    def _fingerprint(self) -> dict:
        """The config fields that decide the result (not where files go, how progress shows, or how the
        latents are split over devices: orbax reshards, so a run may resume with another model_axis_size)."""
        skip = {"output_path", "checkpoint_path", "log_path", "progress_bar", "resume", "log_to_wandb",
                "wandb_project", "run_name", "log_every_n_steps", "eval_every_n_steps", "checkpoint_every_n_steps",
                "keep_checkpoints", "sync_every_n_steps", "model_axis_size", "sweep_strategy"}
        data = {k: v for k, v in self.cfg.to_dict().items() if k not in skip}
        data["sae"] = {k: v for k, v in data["sae"].items() if k != "metadata"}
        if self.sweep is not None:
            data["sweep"] = {
                "names": list(self.sweep.names),
                "streams": list(self.sweep.streams),
                "members": [{k: v for k, v in m.to_dict().items() if k not in skip} | {
                    "sae": {k: v for k, v in m.sae.to_dict().items() if k != "metadata"}} for m in self.sweep.members],
            }
        return json.loads(json.dumps(data, default=str))

    def _meta(self, consumed: int, norm_batches: int, step: int) -> dict:
        """What a checkpoint records besides the state: data position and the run's fingerprint."""
        return {"batches_consumed": consumed, "norm_batches": norm_batches, "step": step, "config": self.fingerprint}

    def _check_same_run(self, meta: dict) -> None:
        saved = meta.get("config")
        if saved is not None and saved != self.fingerprint:
            changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise ConfigError(
                f"checkpoint_path {self.cfg.checkpoint_path} holds a run with a different config (changed: "
                f"{changed}); use another checkpoint_path, delete it, or set resume: false."
            )

    def _next(self, iterator: Iterator, step_index: int):
        try:
            return next(iterator)
        except StopIteration:
            raise InputError(
                f"batches: the data ran out at step {step_index} of {self.cfg.total_training_steps} "
                f"(total_training_tokens={self.cfg.total_training_tokens})."
            ) from None

    def _check_finite(self, metrics: dict, step_index: int) -> None:
        if not bool(jnp.all(metrics["details/batch_finite"])):
            raise InputError(
                f"batch of step {step_index} holds NaN/inf values (or gave non-finite gradients); the "
                "parameters were left unchanged. Fix the data, or set on_nonfinite: skip to skip and count such "
                "batches."
            )

    # ------------------------------------------------------------------ the result
    def inference_sae(self, state: TrainState, cfg: TrainConfig | None = None) -> SAE:
        """The trained SAE as SAELens saves it: input scaling folded, training-only state converted.

        `cfg` is the SAE's own config (a sweep member's); default: the trainer's.
        """
        cfg = cfg or self.cfg
        sae_cfg = cfg.sae
        host = self._to_host(state.replace(opt_state=None))
        params = {k: np.asarray(v) for k, v in host.params.items()}
        scale = float(host.scaling_factor)
        inference_cfg = sae_cfg.inference_config()
        if sae_cfg.normalize_activations == "expected_average_only_in":
            params["W_enc"] = params["W_enc"] * scale
            params["W_dec"] = params["W_dec"] / scale
            params["b_dec"] = params["b_dec"] / scale
            inference_cfg = inference_cfg.replace(normalize_activations="none")
        else:
            scale = 1.0
        params = {k: jnp.asarray(v) for k, v in params.items()}
        params = self.arch.to_inference(params, host.extra, sae_cfg, scale)
        dtype = inference_cfg.jnp_dtype
        params = {k: v.astype(dtype) for k, v in params.items()}
        density = np.asarray(feature_density(host))
        dead = int(np.sum(np.asarray(host.steps_since_fired) > cfg.dead_feature_window))
        import jsae

        metadata = inference_cfg.metadata.replace(
            l0=float(density.sum()), num_dead_features=dead, jsae_version=jsae.__version__,
            jsae_execution=self.plan.to_dict(),
        )
        return SAE(inference_cfg.replace(metadata=metadata), params, np.asarray(log_feature_sparsity(host)))


def train(cfg: TrainConfig, batches: Iterable, **kwargs: Any) -> SAE:
    """Train an SAE on any iterable of activation batches; see `Trainer.fit`."""
    return Trainer(cfg).fit(batches, **kwargs)


# ---------------------------------------------------------------------- logging and progress
class MetricsLogger:
    """Appends one JSON object per logged step to a JSONL file, and optionally logs to wandb."""

    def __init__(self, cfg: TrainConfig, *, enabled: bool, append: bool):
        self.file = None
        self.wandb = None
        if not enabled:
            return
        path = cfg.log_path or (os.path.join(cfg.output_path, "metrics.jsonl") if cfg.output_path else None)
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a" if append else "w")  # noqa: SIM115
            self.path = path
        if cfg.log_to_wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.run_name, config=cfg.to_dict(), resume="allow")

    def log(self, step: int, tokens: int, values: dict[str, float]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "tokens": tokens, **values}) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_plan(self, step: int, tokens: int, plan: dict) -> None:
        """Record the execution plan a (re)started run executes (`jsae_execution`, as in cfg.json)."""
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "tokens": tokens, "jsae_execution": plan}) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.config.update({"jsae_execution": plan}, allow_val_change=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class _progress:
    """A tqdm bar over tokens showing tokens/s, loss, L0, explained variance and dead latents."""

    def __init__(self, cfg: TrainConfig, start_step: int, *, enabled: bool):
        self.bar = None
        self.cfg = cfg
        self.last = start_step
        if enabled and cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.total_training_steps * cfg.train_batch_size_tokens,
                            initial=start_step * cfg.train_batch_size_tokens, unit="tok", unit_scale=True,
                            desc="Training SAE", dynamic_ncols=True)

    def update(self, values: dict[str, float], step: int) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix({
            "loss": f"{values['losses/overall_loss']:.4g}",
            "L0": f"{values['metrics/l0']:.1f}",
            "EV": f"{values['metrics/explained_variance']:.3f}",
            "dead": int(values["sparsity/dead_features"]),
        }, refresh=False)
        self.bar.update((step - self.last) * self.cfg.train_batch_size_tokens)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
