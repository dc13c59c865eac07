"""`jsae plan CONFIG`: what a run would execute, and whether it fits the device, without training.

The execution plan and the mesh are the trainer's own; the step's memory comes from XLA's memory
analysis of the step compiled from abstract shapes (nothing is allocated); the shuffle buffer and
the model's weights are counted from their shapes.
"""

from __future__ import annotations

from typing import Any

from bridge.run import prepare, run_members, run_sweep
from bridge.run_config import RunConfig


def activation_buffer_bytes(cfg: RunConfig) -> int:
    """The shuffle buffer: n_batches_in_buffer model forwards of store_batch_size_prompts rows, one
    (tokens, d_in) slice of `activations_dtype` per hook."""
    tokens = cfg.n_batches_in_buffer * cfg.store_batch_size_prompts * cfg.context_size
    width = 2 if cfg.activations_dtype == "bfloat16" else 4
    return tokens * cfg.train.sae.batch_width * width * len(cfg.hooks)  # a transcoder's rows: d_in + d_out


def plan_report(cfg: RunConfig, *, platform: str | None = None, device_bytes: int | None = None) -> dict[str, Any]:
    """The run's plan, mesh and per-device memory (bytes) against what a device holds.

    Args:
        platform: plan for this platform instead of the local devices' ("gpu" from a CPU machine: the
            step a GPU would run, compiled here from abstract shapes).
        device_bytes: what one device holds (default: the local device's limit; unknown for another platform).

    Returns:
        {"plan", "mesh", "per_device_bytes": {params_and_optimizer, step_temporaries, activation_buffer,
        model_weights, total}, "device_bytes" (None where unknown), "fits", "suggestions"}.
    """
    import jsae
    from jsae.backends import device_memory_bytes

    model, cfg = prepare(cfg)
    trainer = jsae.Trainer(cfg.train, sweep=run_sweep(cfg, *run_members(cfg)), check_memory=False, platform=platform)
    per_device = trainer.step_memory(cfg.activations_dtype)
    # on an accelerator, act_store_device: cpu keeps the buffer in host memory, off the device
    off_device = cfg.act_store_device == "cpu" and trainer.plan.platform != "cpu"
    per_device["activation_buffer"] = 0 if off_device else activation_buffer_bytes(cfg)
    per_device["model_weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
    per_device["total"] = sum(per_device.values())
    limit = device_bytes
    if limit is None and trainer.plan.platform == trainer.devices[0].platform:
        limit = device_memory_bytes(trainer.devices[0])
    fits = limit is None or per_device["total"] <= limit
    suggestions = []
    if not fits:
        n = len(trainer.devices)
        if cfg.train.model_axis_size < n:
            suggestions.append(f"model_axis_size: {n} (split the latents over the {n} devices)")
        if getattr(cfg.train.sae, "compute_dtype", "bfloat16") != "bfloat16":
            suggestions.append("sae.compute_dtype: bfloat16 (half-width products and their temporaries)")
        if trainer.plan.platform != "cpu" and cfg.act_store_device != "cpu":
            suggestions.append("act_store_device: cpu (the shuffle buffer in host memory)")
        suggestions += [f"train_batch_size_tokens: {cfg.train.train_batch_size_tokens // 2} (fewer step temporaries)",
                        f"n_batches_in_buffer: {max(cfg.n_batches_in_buffer // 2, 1)} (a smaller shuffle buffer)"]
    return {"plan": trainer.plan.to_dict(), "describe": trainer.plan.describe(),
            "mesh": dict(trainer.mesh.shape), "per_device_bytes": per_device, "device_bytes": limit, "fits": fits,
            "suggestions": suggestions}


def format_report(report: dict[str, Any]) -> str:
    from jsae.training.memory import describe_bytes

    lines = [f"plan: {report['describe']}",
             "mesh: " + " x ".join(f"{axis} {size}" for axis, size in report["mesh"].items())]
    for name, n in report["per_device_bytes"].items():
        lines.append(f"  {name:<22} {describe_bytes(n)}")
    limit = report["device_bytes"]
    held = "unknown" if limit is None else describe_bytes(limit)
    lines.append(f"a device holds {held}: " + ("fits" if report["fits"] else "does NOT fit"))
    lines += [f"  try {s}" for s in report["suggestions"]]
    return "\n".join(lines)
