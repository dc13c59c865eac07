"""The training loop: takes steps of the pure step (jsae.training.step) on a device mesh
(jsae.training.mesh); logging, progress, evals, checkpoints (jsae.training.checkpoints), signals and
the non-finite check are hooks run every n steps (jsae.training.hooks)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jsae._errors import ConfigError, InputError
from jsae.backends import ExecutionPlan, resolve_plan
from jsae.sae import SAE
from jsae.saes import get_training_architecture
from jsae.tensors import non_finite_params
from jsae.training import outputs
from jsae.training.checkpoints import Checkpoints, fingerprint
from jsae.training.config import TrainConfig
from jsae.training.data import check_batch
from jsae.training.hooks import (
    Hook,
    LogMetrics,
    MetricsLogger,
    NonFiniteCheck,
    ProgressBar,
    StepInfo,
    StopSignals,
    TrainingInterrupted,
    sigterm_interrupts,
    wait_for_device,
)
from jsae.training.memory import refuse_if_too_large, step_memory
from jsae.training.mesh import DATA_AXIS, check_fits, compile_step, make_mesh, state_sharding
from jsae.training.results import SweepResult, saved_sae
from jsae.training.sae_checkpoints import log_final_artifacts, sae_folder_hooks
from jsae.training.step import TrainState, estimate_scaling_factor, init_train_state, make_train_step
from jsae.training.sweep import Sweep, check_members, init_sweep_state, make_sweep_step, member_state

__all__ = ["SweepResult", "Trainer", "TrainingInterrupted", "train"]


class Trainer:
    """Trains one SAE (or a sweep's SAEs) on a mesh of devices (all processes' devices after
    `jax.distributed.initialize`): data parallel, or with `cfg.model_axis_size > 1` a (data, model)
    mesh whose model axis splits the latents.

    Args:
        cfg: the run config (with a sweep: the loop settings shared by every member).
        devices: devices of the mesh (default: the first `cfg.n_devices` of `jax.devices()`).
        sweep: several SAEs trained together in one compiled step (`jsae.training.sweep.Sweep`);
            `fit` then returns a `SweepResult` and saves each SAE to <output_path>/<name>.
        check_memory: refuse, before anything is allocated, a run whose state cannot fit a device.
        platform: plan the step for this platform instead of the devices' (`jsae.resolve_plan`): a GPU
            plan compiled and run on CPU devices, or `jsae plan --platform gpu`'s memory analysis.

    Attributes:
        plan: the `ExecutionPlan` the step runs (recorded in metrics.jsonl and each saved cfg.json).
    """

    def __init__(self, cfg: TrainConfig, devices: list | None = None, *, sweep: Sweep | None = None,
                 check_memory: bool = True, platform: str | None = None):
        self.cfg, self.sweep = cfg, sweep
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
        self.model_axis_size = cfg.model_axis_size
        self.n_processes = jax.process_count()
        if cfg.train_batch_size_tokens % self.n_processes:
            raise ConfigError(f"TrainConfig.train_batch_size_tokens={cfg.train_batch_size_tokens} is not divisible "
                              f"by the {self.n_processes} processes.")
        self.local_batch_size = cfg.train_batch_size_tokens // self.n_processes
        self.mesh = make_mesh(self.devices, self.model_axis_size, cfg.train_batch_size_tokens)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(None, DATA_AXIS) if self._n_streams() else P(DATA_AXIS))
        shape_cfg = cfg if sweep is None else check_members(sweep.members).replace(sweep_strategy=cfg.sweep_strategy)
        self.plan: ExecutionPlan = resolve_plan(shape_cfg, platform=platform, devices=self.devices,
                                                n_members=1 if sweep is None else len(sweep.members),
                                                feature_sharded=self.model_axis_size > 1)
        state_shape = jax.eval_shape(self._fresh_state)
        if check_memory:
            check_fits(state_shape, cfg, self.devices, 1 if sweep is None else len(sweep.members))
        shardings = state_sharding(state_shape, self.mesh, self.arch) if self.model_axis_size > 1 else None
        self.step_fn = compile_step(self._make_step, self.mesh, self.batch_sharding, shardings,
                                    self.plan.jit_compiler_options)
        sync = cfg.sync_every_n_steps
        if sync is None:  # XLA's CPU collectives deadlock when many steps are in flight
            sync = 1 if len(self.devices) > 1 and self.devices[0].platform == "cpu" else 0
        self.sync_every = sync
        self.is_primary = jax.process_index() == 0
        self.fingerprint = fingerprint(cfg, sweep)
        self.hooks: list[Hook] = []

    def add_hook(self, fn: Callable[[StepInfo], None], every: int = 1) -> None:
        """Run `fn(info)` every `every` steps of `fit` (after the built-in hooks of that step)."""
        self.hooks.append(Hook(fn, every))

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

    def init_state(self, scaling_factor: float | list[float] = 1.0, params: dict | None = None) -> TrainState:
        state = self._fresh_state(scaling_factor, params)
        return jax.device_put(state, self._sharding(state))

    def _sharding(self, state: Any) -> Any:
        """Where each leaf of `state` lives: replicated, or with the latents split over the model axis."""
        if self.model_axis_size == 1:
            return jax.tree.map(lambda _: self.replicated, state)
        return state_sharding(state, self.mesh, self.arch)

    # ------------------------------------------------------------------ the loop
    def fit(self, batches: Iterable, *, params: dict | None = None,
            evaluator: Callable[[SAE], Mapping[str, float]] | None = None, batch_dtype: Any = None) -> Any:
        """Train on `batches` (this process's share of each batch) and return the SAE as SAELens saves it
        (with a sweep: a `SweepResult` of the SAEs, in member order).

        Args:
            batches: (tokens, d_in) numpy / jax arrays ((n_streams, tokens, d_in) for a sweep over several
                streams); an object with `seek(n)` resumes without replaying data.
            params: initial parameters (default: SAELens' initialisation from `cfg.seed`).
            evaluator: called with the SAE as it would be saved every `cfg.eval_every_n_steps` steps and
                at the end (primary process only); its metrics are logged with an "eval/" prefix, and
                the final ones are written into the saved SAE's metadata as `eval_metrics`.
            batch_dtype: the batches' dtype, if known: the step is then compiled before the first batch
                is drawn (while a producer that `iter(batches)` started fills its buffer).
        """
        cfg, total = self.cfg, self.cfg.total_training_steps
        outputs.check_writable(cfg)
        iterator = iter(batches)
        checkpoints = (Checkpoints(cfg.checkpoint_path, keep=cfg.keep_checkpoints, fingerprint=self.fingerprint)
                       if cfg.checkpoint_path is not None else None)
        logger = progress = None
        try:
            state, consumed, norm_batches, resumed = self._start(iterator, batches, params, checkpoints)
            start = consumed - norm_batches
            logger = MetricsLogger(cfg, enabled=self.is_primary, append=resumed)
            logger.log_plan(start, start * cfg.train_batch_size_tokens, self.plan.to_dict())
            progress = ProgressBar(cfg, start, enabled=self.is_primary)
            with StopSignals() as signals:
                hooks, finite = self._hooks(logger, progress, evaluator, checkpoints, signals, norm_batches, start)
                if batch_dtype is not None and start < total:
                    self._compile_step(state, batch_dtype)
                for step_index in range(start, total):
                    state, metrics = self.step_fn(state, self._to_global(self._next(iterator, step_index)))
                    consumed += 1
                    info = StepInfo(step_index + 1, total, state, metrics, consumed,
                                    (step_index + 1) * cfg.train_batch_size_tokens)
                    for hook in hooks:
                        hook(info)
                finite.finish()
                if checkpoints is not None:
                    checkpoints.save(state, batches_consumed=consumed, norm_batches=norm_batches, step=total)
            progress.close()
            self.state = state
            with sigterm_interrupts():
                return self._finish(state, evaluator, logger)
        finally:
            for closing in (progress, logger, checkpoints):
                if closing is not None:
                    closing.close()

    def _start(self, iterator: Iterator, batches: Any, params: dict | None, checkpoints: Checkpoints | None):
        """(state, batches consumed, of them for the norm estimate, resumed?): the newest checkpoint's, or
        a fresh state (with the expected_average_only_in scale estimated from the first batches)."""
        cfg = self.cfg
        template = self.init_state(params=params)
        if checkpoints is not None and checkpoints.steps() and not cfg.resume:
            raise ConfigError(f"checkpoint_path {checkpoints.path} holds checkpoints of an earlier run (steps "
                              f"{checkpoints.steps()}) and resume is false: a fresh run will not write over them. "
                              "Delete the folder, choose another checkpoint_path, or set resume: true.")
        restored = checkpoints.restore(template, self._sharding(template)) if checkpoints is not None else None
        if restored is not None:
            state, meta = restored
            consumed = int(meta["batches_consumed"])
            self._skip(iterator, batches, consumed)
            return state, consumed, int(meta["norm_batches"]), True
        if cfg.sae.normalize_activations != "expected_average_only_in" or not cfg.n_batches_for_norm_estimate:
            return template, 0, 0, False
        sample = [self._next(iterator, 0) for _ in range(cfg.n_batches_for_norm_estimate)]
        factor = self._scaling_factor(sample)
        state = template.replace(scaling_factor=jax.device_put(jnp.asarray(factor, jnp.float32), self.replicated))
        return state, len(sample), len(sample), False

    def _hooks(self, logger, progress, evaluator, checkpoints, signals, norm_batches: int, start: int):
        """The built-in hooks in the order they run after each step, then the user's; and the non-finite check."""
        cfg = self.cfg
        finite = NonFiniteCheck()

        def save(info: StepInfo) -> None:
            checkpoints.save(info.state, batches_consumed=info.batches_consumed, norm_batches=norm_batches,
                             step=info.step)

        def evaluate(info: StepInfo) -> None:
            if info.step != info.total:  # the final evaluation runs on the saved SAEs
                self._evaluate(evaluator, self._saes(info.state, for_eval=True), logger, info.step)

        def stop(info: StepInfo) -> None:
            if signals.received is not None:
                if checkpoints is not None:
                    save(info)
                raise TrainingInterrupted(f"training stopped by signal {signals.received} after step {info.step}"
                                          + (f"; resume from {cfg.checkpoint_path}" if checkpoints else ""))

        hooks = [Hook(finite, 1 if cfg.on_nonfinite == "error" else 0), Hook(wait_for_device, self.sync_every),
                 Hook(LogMetrics(logger, progress, self._metric_values, start * cfg.train_batch_size_tokens),
                      cfg.log_every_n_steps, at_end=True)]
        if evaluator is not None:
            hooks.append(Hook(evaluate, cfg.eval_every_n_steps))
        if checkpoints is not None:
            hooks.append(Hook(save, cfg.checkpoint_every_n_steps))
        hooks += sae_folder_hooks(self, logger, save if checkpoints is not None else None)  # n_checkpoints, wandb
        return [*hooks, *self.hooks, Hook(stop, 1)], finite

    def _finish(self, state: TrainState, evaluator, logger: MetricsLogger) -> Any:
        """The SAEs as saved: refused where training left non-finite weights; evaluated, then written to
        output_path (a signal during the final evaluation stops it after saving the SAEs without its metrics;
        one during the write stops the run once the folders are complete)."""
        saes = self._saes(state)
        for name, sae in zip(self._names(), saes, strict=True):
            if bad := non_finite_params(sae.params):
                raise InputError(f"training left non-finite values in {'; '.join(bad)}"
                                 + (f" of {name}" if name else "") + "; the SAE was not saved. Check the data "
                                   "(on_nonfinite: error stops at the first bad batch) and the learning rate.")
        if evaluator is not None and self.is_primary:
            try:
                finals = self._evaluate(evaluator, saes, logger, self.cfg.total_training_steps)
            except KeyboardInterrupt:
                self._save(saes)
                raise TrainingInterrupted("final evaluation stopped by a signal; the SAEs were saved without "
                                          "eval_metrics") from None
            saes = [SAE(sae.cfg.replace(metadata=sae.cfg.metadata.replace(eval_metrics=final)), sae.params,
                        sae.sparsity) for sae, final in zip(saes, finals, strict=True)]
        if (received := self._save(saes)) is not None:
            raise TrainingInterrupted(f"stopped by signal {received} while saving; the SAEs were saved")
        log_final_artifacts(self, logger, saes)
        return saes[0] if self.sweep is None else SweepResult(tuple(self.sweep.names), tuple(saes))

    def _save(self, saes: list[SAE]) -> int | None:
        """Write the SAEs to output_path; a signal meanwhile waits until every folder is complete and is
        returned (None when none came)."""
        with StopSignals() as signals:
            if self.cfg.output_path is not None and self.is_primary:
                for name, sae in zip(self._names(), saes, strict=True):
                    sae.save_model(self.cfg.output_path if name is None else f"{self.cfg.output_path}/{name}")
        return signals.received

    # ------------------------------------------------------------------ data
    def _to_global(self, batch: Any) -> jax.Array:
        """This process's `batch` as its share of the global batch, sharded over the data axis."""
        check_batch(batch, self.cfg, self.n_processes, self._n_streams())
        if isinstance(batch, jax.Array):  # from the device it is on (sliced per device), never through the host
            return jax.make_array_from_process_local_data(self.batch_sharding, batch)
        return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(batch))

    def _n_streams(self) -> int | None:
        """Activation streams a sweep's batches stack (several hook points), None for one (tokens, d_in) batch."""
        return self.sweep.n_streams if self.sweep is not None and self.sweep.streams else None

    def _batch_struct(self, dtype: Any) -> jax.ShapeDtypeStruct:
        tokens, d_in, streams = self.local_batch_size * self.n_processes, self.cfg.sae.batch_width, self._n_streams()
        shape = (tokens, d_in) if streams is None else (streams, tokens, d_in)
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=self.batch_sharding)

    def _compile_step(self, state: TrainState, dtype: Any) -> None:
        """Compile the step for global batches of `dtype` (jit reuses it at the first step); refuse it
        where XLA says one step needs more memory than a device holds."""
        compiled = self.step_fn.lower(state, self._batch_struct(dtype)).compile()
        refuse_if_too_large(step_memory(state, compiled), self.devices[0])

    def step_memory(self, batch_dtype: Any = "float32") -> dict[str, int]:
        """Per-device bytes of this trainer's step (`jsae.training.memory.step_memory`), compiled for
        batches of `batch_dtype` from abstract shapes: nothing is allocated."""
        state = jax.eval_shape(self._fresh_state)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                             self._sharding(state))
        return step_memory(state, self.step_fn.lower(state, self._batch_struct(batch_dtype)).compile())

    @staticmethod
    def _skip(iterator: Iterator, source: Any, n: int) -> None:
        if n > 0 and hasattr(source, "seek"):
            source.seek(n)
            return
        for _ in range(n):
            next(iterator)

    def _next(self, iterator: Iterator, step_index: int):
        try:
            return next(iterator)
        except StopIteration:
            raise InputError(f"batches: the data ran out at step {step_index} of {self.cfg.total_training_steps} "
                             f"(total_training_tokens={self.cfg.total_training_tokens}).") from None

    def _scaling_factor(self, sample: list) -> float | list[float]:
        """expected_average_only_in: one scale for one stream, else one per stream handed to its members.
        With on_nonfinite: skip, batches holding NaN/inf are left out of the estimate."""
        sae, skip = self.cfg.sae, self.cfg.on_nonfinite == "skip"

        def estimate(batches):
            if skip:
                batches = [b for b in batches if np.all(np.isfinite(np.asarray(b)))]
            # from the input alone (a transcoder's target is scaled by the same factor)
            inputs = [sae.split_batch(b)[0] for b in batches]
            factor = estimate_scaling_factor(inputs, sae.d_in, across_processes=True) if batches else math.nan
            if not math.isfinite(factor):
                raise InputError(f"normalize_activations: expected_average_only_in: the norm estimate over the first "
                                 f"{len(sample)} batches is not finite ({factor}): they hold NaN/inf values or only "
                                 "zeros. Fix the data, or raise n_batches_for_norm_estimate.")
            return factor

        if self.sweep is None:
            return estimate(sample)
        if not self.sweep.streams:
            return [estimate(sample)] * len(self.sweep.members)
        per_stream = [estimate([b[s] for b in sample]) for s in range(self.sweep.n_streams)]
        return [per_stream[s] for s in self.sweep.streams]

    # ------------------------------------------------------------------ metrics and evals
    def _names(self) -> list[str | None]:
        return list(self.sweep.names) if self.sweep is not None else [None]

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

    def _evaluate(self, evaluator, saes: list[SAE], logger: MetricsLogger, step: int) -> list[dict]:
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

    # ------------------------------------------------------------------ the result
    def _saes(self, state: TrainState, *, for_eval: bool = False) -> list[SAE]:
        """Every SAE of `state` as it would be saved (a collective when latents are split over processes)."""
        if for_eval and not self.is_primary and not (self.model_axis_size > 1 and self.n_processes > 1):
            return []
        if self.sweep is None:
            return [self.inference_sae(state)]
        return [self.inference_sae(member_state(state, i), member) for i, member in enumerate(self.sweep.members)]

    def _to_host(self, tree: Any) -> Any:
        """`tree` as numpy arrays on this process; gathers shards held by other processes (a collective:
        every process must call it)."""
        if self.model_axis_size > 1 and self.n_processes > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_get(tree)

    def inference_sae(self, state: TrainState, cfg: TrainConfig | None = None) -> SAE:
        """The trained SAE as SAELens saves it (`jsae.training.results.saved_sae`); `cfg`: the SAE's own
        config (a sweep member's)."""
        host = self._to_host(state.replace(opt_state=None))
        return saved_sae(host, cfg or self.cfg, self.arch, self.plan)


def train(cfg: TrainConfig, batches: Iterable, **kwargs: Any) -> SAE:
    """Train an SAE on any iterable of activation batches; see `Trainer.fit`."""
    return Trainer(cfg).fit(batches, **kwargs)
