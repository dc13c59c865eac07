"""What runs beside the training loop, every n steps: logging, the progress bar, evals, checkpoints,
signals, the non-finite check and the wait on the device. The loop itself only takes steps.

A hook is `fn(info: StepInfo)` run every `every` steps (and, with `at_end`, after the last step
too); `Trainer.add_hook(fn, every=n)` adds one of your own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jsae._errors import InputError, JsaeError


@dataclasses.dataclass
class StepInfo:
    """The run after a step.

    Attributes:
        step: steps taken (1 after the first step).
        total: steps the run takes.
        state: the TrainState (on device; fetching from it waits for the step).
        metrics: the step's metrics (on device).
        batches_consumed: batches drawn from the data so far (steps plus norm-estimation batches).
        tokens: training tokens seen so far.
    """

    step: int
    total: int
    state: Any
    metrics: dict
    batches_consumed: int
    tokens: int


@dataclasses.dataclass
class Hook:
    """`fn(info)` every `every` steps; with `at_end`, also after the last step when that is not a multiple."""

    fn: Callable[[StepInfo], None]
    every: int = 1
    at_end: bool = False

    def __call__(self, info: StepInfo) -> None:
        if self.every > 0 and (info.step % self.every == 0 or (self.at_end and info.step == info.total)):
            self.fn(info)


class TrainingInterrupted(JsaeError, KeyboardInterrupt):
    """Raised after SIGTERM / Ctrl-C once the checkpoint has been written."""


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop checks between steps (main thread only), so a
    signal never lands in the middle of a step or a checkpoint write."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                self.received = signum

            self._previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}


@contextlib.contextmanager
def sigterm_interrupts():
    """For the duration, SIGTERM raises KeyboardInterrupt as Ctrl-C does (main thread only), so work
    outside the loop's StopSignals (the final evaluation, the CLI's own evaluation) stops through the
    same path as Ctrl-C, with its message, rather than by SIGTERM's default action (no message)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_finite(metrics: dict, step_index: int) -> None:
    """Raise where the step's batch held NaN/inf (the step left the parameters unchanged)."""
    if not bool(jnp.all(metrics["details/batch_finite"])):
        raise InputError(
            f"batch of step {step_index} holds NaN/inf values (or gave non-finite gradients); the "
            "parameters were left unchanged. Fix the data, or set on_nonfinite: skip to skip and count such "
            "batches."
        )


def wait_for_device(info: StepInfo) -> None:
    """Wait for the step (forced CPU devices: XLA's collectives deadlock with many steps in flight)."""
    jax.block_until_ready(info.metrics)


class NonFiniteCheck:
    """on_nonfinite: error — checks each step's metrics one step late, so the loop never waits on the
    step it just dispatched; `finish` checks the last one."""

    def __init__(self):
        self.previous: tuple[int, dict] | None = None

    def __call__(self, info: StepInfo) -> None:
        if self.previous is not None:
            check_finite(self.previous[1], self.previous[0])
        self.previous = (info.step - 1, info.metrics)

    def finish(self) -> None:
        if self.previous is not None:
            check_finite(self.previous[1], self.previous[0])


# ---------------------------------------------------------------------- logging and progress
class MetricsLogger:
    """Appends one JSON object per logged step to a JSONL file, and optionally logs to wandb."""

    def __init__(self, cfg, *, enabled: bool, append: bool):
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


class ProgressBar:
    """A tqdm bar over tokens showing tokens/s, loss, L0, explained variance and dead latents."""

    def __init__(self, cfg, start_step: int, *, enabled: bool):
        self.bar = None
        self.tokens_per_step = cfg.train_batch_size_tokens
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
        self.bar.update((step - self.last) * self.tokens_per_step)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogMetrics:
    """Fetches the step's metrics, logs them with the tokens/s since the last log, and moves the bar.

    `values(metrics) -> (logged, shown)` turns fetched metrics into what is logged and what the bar
    shows (a sweep logs each member's)."""

    def __init__(self, logger: MetricsLogger, progress: ProgressBar, values: Callable, start_tokens: int):
        self.logger, self.progress, self.values = logger, progress, values
        self.since, self.last_tokens = time.perf_counter(), start_tokens

    def __call__(self, info: StepInfo) -> None:
        logged, shown = self.values(jax.device_get(info.metrics))
        now = time.perf_counter()
        logged["details/tokens_per_second"] = (info.tokens - self.last_tokens) / max(now - self.since, 1e-9)
        self.since, self.last_tokens = now, info.tokens
        self.logger.log(info.step, info.tokens, logged)
        self.progress.update(shown, info.step)
