"""What runs, decided once: the execution plan, and the back ends that supply fast primitives.

`resolve_plan(cfg, ...)` turns a training config, the devices and their platform into a small
frozen `ExecutionPlan`: which TopK path, which top-k, which products, which optimiser update,
how a sweep's members share a step, which compiler options. Every `auto` setting resolves here
and nowhere else; nothing outside this package checks the platform, reads a `JSAE_*` variable
or touches the CPU kernels. The plan's `ops()` is the `Ops` bundle the training step is built
on: the reference primitives (`jsae.saes._ops`) with the back end's replacements where the plan
chose them. The plan is recorded with every run (metrics.jsonl) and every saved SAE
(cfg.json `metadata.jsae_execution`).

A plan for another platform can be resolved on any machine (`resolve_plan(cfg, platform="gpu")`)
and run there: it then uses the reference primitives, which every platform runs, and that platform's
JAX-level ones (`jsae.backends.accelerator`), its Pallas kernels in Pallas' interpret mode.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsae.backends.compilation_cache import default_cache_path, enable_compilation_cache
from jsae.saes._ops import REFERENCE, Ops

PLATFORMS = ("cpu", "gpu", "tpu")

# TopK "auto" goes sparse on CPU when d_sae / k is at least this with jsae's CPU kernels, or at
# least the second without them; other platforms keep the dense path until measured
# (bench/bench.py --cases topk --dense-topk; bench/RESULTS.md).
SPARSE_MIN_D_SAE_PER_K = 8
SPARSE_MIN_D_SAE_PER_K_XLA = 32
# The sparse forward screens its top-k on AMX tiles from this d_sae on: the screen's fixed costs
# (packing W_enc, the candidates' bookkeeping) lose to the plain product at narrower SAEs.
SCREEN_MIN_D_SAE = 4096
# From this many weights per matrix (d_in * d_sae) a step with a dead-latent loss branches once on
# whether any latent is dead: the none-dead program drops the aux-k loss's work, which pays for
# compiling a second program only at this size and above (bench/RESULTS.md).
DEAD_BRANCH_MIN_WEIGHTS = 1 << 21
# Without jsae's CPU top-k kernel, a sweep's "auto" strategy unrolls its members on CPU up to this
# many (compile time grows with each), maps beyond.
UNROLL_MAX_MEMBERS = 16
# XLA options the training steps compile with, per platform: on CPU the plain dot rather than the
# YNNPACK fusions, which ran the step's encoder product slower (bench/RESULTS.md).
STEP_COMPILER_OPTIONS = {"cpu": {"xla_cpu_experimental_ynn_fusion_type": ""}}


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """What a training run executes, resolved once by `resolve_plan`.

    Attributes:
        platform: "cpu", "gpu" or "tpu".
        topk: TopK training's path, "dense" or "sparse" (same losses and gradients); None for
            architectures without that choice.
        top_k: the row top-k: "cpu_kernel", "xla_split" (one XLA top-k per CPU core), "blockwise"
            (two stages, no sort of whole rows; an accelerator's sparse path,
            `jsae.backends.accelerator`) or "xla".
        sparse_products: the sparse TopK path's gathers and scatters, "cpu_kernel", "pallas" (the
            decoder as a Pallas kernel on a GPU, XLA's scatters; interpret mode off the GPU) or "xla";
            None off the sparse path.
        encoder_product: the sparse path's dense encoder product, "blas" (the CPU kernels' BLAS) or "xla".
        encoder_screen: the sparse path's top-k is screened on AMX tiles without the float32 product.
        dense_step: a ReLU / JumpReLU dense step, "cpu_fused" (BLAS kernels with the elementwise
            work between the products) or "xla"; None for other architectures.
        optimizer: "fused_adam" (one in-place pass per parameter) or "optax".
        sweep: how a sweep's members share a step, "vmap", "map" or "unroll"; None for one SAE.
        dead_latent_branch: the step branches once on whether any latent is dead.
        latent_shards: devices the latents are split over (the model axis size; 1 unsharded). Above
            1, row top-ks are taken shard by shard (`jsae.backends.sharded`).
        blas: the BLAS library the CPU kernels call, where one is loaded.
        compute_dtype: the products' input dtype, "float32" or "bfloat16" (float32 accumulation;
            `jsae.backends.precision`); the CPU kernels' products are float32-only, so a bfloat16 plan
            runs XLA's (dense_step, encoder_product and sparse_products "xla").
        matmul_precision: XLA's precision for float32 products, "default", "tf32" or "float32".
        compiler_options: XLA options for `jax.jit` of the step, as (name, value) pairs.
    """

    platform: str
    topk: str | None = None
    top_k: str = "xla"
    sparse_products: str | None = None
    encoder_product: str = "xla"
    encoder_screen: bool = False
    dense_step: str | None = None
    optimizer: str = "optax"
    sweep: str | None = None
    dead_latent_branch: bool = False
    latent_shards: int = 1
    blas: str | None = None
    compute_dtype: str = "float32"
    matmul_precision: str = "default"
    compiler_options: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (cfg.json `metadata.jsae_execution`, metrics.jsonl)."""
        out = dataclasses.asdict(self)
        out["compiler_options"] = dict(self.compiler_options)
        return out

    def describe(self) -> str:
        """One line: the platform and every choice that applies."""
        parts = [f"{name} {value}" for name, value in self.to_dict().items()
                 if name not in ("platform", "compiler_options") and value not in (None, False, {})
                 and not (name == "latent_shards" and value == 1)
                 and (name, value) not in (("compute_dtype", "float32"), ("matmul_precision", "default"))]
        return f"{self.platform}: " + ", ".join(parts)

    def ops(self) -> Ops:
        """The primitives the training step runs on."""
        return _ops_for(self)

    @property
    def jit_compiler_options(self) -> dict[str, str] | None:
        return dict(self.compiler_options) or None


@functools.cache
def _ops_for(plan: ExecutionPlan) -> Ops:
    from jsae.backends.precision import with_compute_dtype
    from jsae.backends.sharded import sharded_ops

    sparse = plan.topk == "sparse"
    if plan.platform != "cpu":
        from jsae.backends import accelerator

        ops = accelerator.ops(platform=plan.platform, top_k=plan.top_k, sparse_products=plan.sparse_products or "xla",
                              sparse_topk=sparse, interpret=plan.platform != default_platform())
    else:
        from jsae.backends import cpu

        ops = cpu.ops(top_k=plan.top_k, sparse_products=plan.sparse_products or "xla",
                      encoder_product=plan.encoder_product, dense_step=plan.dense_step or "xla",
                      encoder_screen=plan.encoder_screen, sparse_topk=sparse)
    return sharded_ops(with_compute_dtype(ops, plan.compute_dtype), plan.latent_shards)


def default_platform() -> str:
    """The platform of JAX's default backend."""
    return jax.default_backend()


def _cpu_kernels() -> tuple[bool, bool, bool, str | None]:
    """(kernels, dense kernels with their BLAS, AMX screen, BLAS path) on this machine."""
    from jsae.backends.cpu import kernels

    if not kernels.available():
        return False, False, False, None
    dense = kernels.dense_available()
    return True, dense, kernels.encoder_top_k_available(), kernels.blas_library()


def resolve_plan(cfg, *, platform: str | None = None, devices: Sequence | None = None, n_members: int = 1,
                 feature_sharded: bool | None = None) -> ExecutionPlan:
    """The execution plan of training `cfg` (a `jsae.TrainConfig`).

    Args:
        cfg: the run's config (a sweep's: any member's; they share shapes).
        platform: the platform to plan for (default: the devices', else JAX's default backend). A
            platform other than the one present gets the reference primitives only.
        devices: the devices the step runs on.
        n_members: SAEs trained together in one step (a sweep); 1 for one SAE.
        feature_sharded: the latents are split over devices (default: cfg.model_axis_size > 1). FFI
            kernels would run on whole, gathered weights on every device, so the dense step and the
            optimiser stay XLA's, which XLA partitions.
    """
    present = devices[0].platform if devices else default_platform()
    platform = platform or present
    if platform not in PLATFORMS:
        raise ValueError(f"resolve_plan: platform must be one of {list(PLATFORMS)}, got {platform!r}")
    sharded = cfg.model_axis_size > 1 if feature_sharded is None else feature_sharded
    sae = cfg.sae
    float32 = sae.jnp_dtype == jnp.float32
    on_cpu = platform == "cpu" and present == "cpu"
    # FFI kernels are opaque to XLA's partitioner: on split latents they would gather whole rows and weights
    # onto every device, so a feature-sharded step runs XLA's own primitives only.
    use_kernels = on_cpu and float32 and not sharded
    kernels, dense_kernels, amx, blas = _cpu_kernels() if use_kernels else (False, False, False, None)
    # The kernels' products are float32: a lower compute dtype runs XLA's (top-k and Adam stay).
    product_kernels = kernels and cfg.compute_dtype == "float32"
    dense_kernels, amx = dense_kernels and product_kernels, amx and product_kernels

    topk = getattr(sae, "topk_implementation", None)
    if topk == "auto":
        per_k = SPARSE_MIN_D_SAE_PER_K if kernels else SPARSE_MIN_D_SAE_PER_K_XLA
        # the sparse path's gathers of decoder rows by latent index would cross the model axis
        topk = "sparse" if platform == "cpu" and not sharded and sae.d_sae >= per_k * sae.k else "dense"
    sparse = topk == "sparse"

    if kernels:
        top_k = "cpu_kernel"
    else:
        from jsae.backends.cpu import cpu_cores

        top_k = "xla_split" if on_cpu and cpu_cores() > 1 else "xla"
    if sparse and platform != "cpu":
        top_k = "blockwise"  # the aux-k loss takes k = d_in / 2: no sort of whole rows
    if not sparse:
        sparse_products = None
    elif platform != "cpu":
        # the Pallas decoder is written for GPUs (Triton); a TPU keeps XLA's gathers
        sparse_products = "pallas" if platform == "gpu" else "xla"
    else:
        sparse_products = "cpu_kernel" if product_kernels else "xla"
    dense_step = None
    if hasattr(sae, "dense_step_fusable"):
        fused = (sae.dense_implementation == "auto" and dense_kernels and not sharded and sae.dense_step_fusable())
        dense_step = "cpu_fused" if fused else "xla"
    fused_adam = cfg.adam_implementation == "auto" and kernels and not sharded
    strategy = resolve_strategy(cfg.sweep_strategy, n_members, platform, kernels) if n_members > 1 else None
    from jsae.saes import get_training_architecture

    dead_branch = (get_training_architecture(sae.architecture).dead_latent_loss
                   and sae.d_in * sae.d_sae >= DEAD_BRANCH_MIN_WEIGHTS)
    return ExecutionPlan(
        platform=platform,
        topk=topk,
        top_k=top_k,
        sparse_products=sparse_products,
        encoder_product="blas" if sparse and dense_kernels else "xla",
        encoder_screen=sparse and amx and sae.d_sae >= SCREEN_MIN_D_SAE,
        dense_step=dense_step,
        optimizer="fused_adam" if fused_adam else "optax",
        sweep=strategy,
        dead_latent_branch=dead_branch,
        latent_shards=cfg.model_axis_size if sharded else 1,
        compute_dtype=cfg.compute_dtype,
        matmul_precision="float32" if cfg.matmul_precision == "highest" else cfg.matmul_precision,
        blas=_blas_name(blas) if (fused_adam or dense_step == "cpu_fused" or sparse) and blas else None,
        compiler_options=tuple(sorted((step_compiler_options(platform) or {}).items())) if platform == present
        else (),
    )


def resolve_strategy(strategy: str, n_members: int, platform: str, cpu_kernels: bool = False) -> str:
    """The sweep strategy "auto" stands for: vmap off CPU; on CPU a map over the members, or (without
    jsae's CPU top-k kernel, whose work already spreads over the cores) the members unrolled side by
    side up to UNROLL_MAX_MEMBERS."""
    if strategy != "auto":
        return strategy
    if platform != "cpu":
        return "vmap"
    return "unroll" if not cpu_kernels and n_members <= UNROLL_MAX_MEMBERS else "map"


def _blas_name(path: str) -> str:
    return "mkl" if "libmkl_rt" in path else "openblas"


@functools.cache
def step_compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """`compiler_options` for `jax.jit` of a training step on `platform` (default: JAX's default backend).

    None where jsae sets nothing, or where this jaxlib does not know an option.
    """
    platform = platform or default_platform()
    options = STEP_COMPILER_OPTIONS.get(platform)
    if not options:
        return None
    probe = jax.device_put(np.zeros((2, 2), np.float32), jax.devices(platform)[0])
    try:
        jax.jit(lambda a: a @ a, compiler_options=options).lower(probe).compile()
    except Exception:  # an option this jaxlib does not know: compile with its defaults
        return None
    return dict(options)


def fused_optimizer_apply(plan: ExecutionPlan, *, max_grad_norm: float, b1: float, b2: float, eps: float):
    """The back end's in-place clipped-Adam update for `plan`, or None where the plan keeps optax's."""
    if plan.optimizer != "fused_adam":
        return None
    from jsae.backends.cpu import adam

    return functools.partial(adam.apply, max_grad_norm=max_grad_norm, b1=b1, b2=b2, eps=eps)


def device_memory_bytes(device) -> int | None:
    """Memory one device can hold: an accelerator's allocator limit, the host's physical memory for
    a CPU device; None where unknown."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        pass
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        import os

        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


__all__ = ["ExecutionPlan", "Ops", "PLATFORMS", "REFERENCE", "default_cache_path", "default_platform", "device_memory_bytes",
           "enable_compilation_cache", "fused_optimizer_apply", "resolve_plan", "resolve_strategy", "step_compiler_options"]
