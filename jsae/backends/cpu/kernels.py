"""jsae's CPU kernels for XLA:CPU, built on first use: a row-wise top-k, the encoder's top-k, TopK
training's sparse products, the dense steps' fused products, a BLAS product and a fused Adam update.

XLA:CPU's top-k runs a partial sort over each row on one thread; `cpu_kernels.cc` beside this
file selects the same values and indices in the same order from the few entries that can be among
the top k, on XLA's intra-op threads. The sparse TopK step's products over each token's k active
latents (`gather_rows_dot`, `gather_rows_weighted`, `scatter_rows`) are XLA gathers and scatters
of one row at a time otherwise; here they are loops over rows on the same threads.

On CPUs with AMX tiles, `encoder_top_k` takes the sparse step's top-k without the dense float32
encoder product: a bf16 product on the tiles, with a rigorous bound on its error, picks the
candidates, which get float32 dot products.

`dense_encode` and `dense_backward` (`dense_kernels.cc`) run a standard or JumpReLU SAE's dense
training step: its five products on a BLAS sgemm (MKL on Intel CPUs where installed, else
OpenBLAS from scipy-openblas32; `build._blas_library`), one single-threaded call per block on each of
XLA's threads, with the elementwise work between the products done on each block
(`jsae.backends.cpu.dense`).

It is C++ against the XLA FFI headers jaxlib ships, compiled once per machine with the system's
C++ compiler (`$CXX`, else `c++`) into a cache folder (`$JSAE_CACHE_DIR`, else
`$XDG_CACHE_HOME/jsae`, else `~/.cache/jsae`; `build`) and loaded from there afterwards. Where it cannot be
built (no compiler, not x86/ARM Linux or macOS) jsae warns once and the execution plan keeps XLA's
operations: the results are the same either way (up to float rounding). `JSAE_CPU_KERNELS=0`
turns the kernels off. Measured speed-ups are in bench/RESULTS.md.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# The build machinery and the BLAS choice live in `build`; every name stays importable from here.
from jsae.backends.cpu.build import (  # noqa: F401
    BLAS_LIBRARIES,
    HEADERS,
    SOURCE,
    SOURCES,
    TARGETS,
    TOP_K_TARGET,
    _blas_library,
    _compile_commands,
    _compiler,
    _cpu_fingerprint,
    build,
    cache_dir,
    cpu_vendor,
    library_path,
    logger,
)

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet in this process
_library: ctypes.CDLL | None = None
_blas: str | None = None  # the BLAS the dense kernels call, once loaded


def available() -> bool:
    """Whether the CPU kernels are registered with XLA in this process (building it on first call).

    False (after one warning) where it cannot be built; False without trying when
    JSAE_CPU_KERNELS=0.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
    return _loaded


def _load() -> bool:
    global _library
    if os.environ.get("JSAE_CPU_KERNELS", "1") == "0":
        return False
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
        library = ctypes.cdll.LoadLibrary(str(build(compiler)))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _library = library
    except (OSError, RuntimeError, AttributeError) as error:
        warnings.warn(f"jsae: using jax.lax.top_k and XLA's gathers on CPU ({error}). Results are the same, TopK "
                      "training is slower; "
                      "JSAE_CPU_KERNELS=0 silences this.", RuntimeWarning, stacklevel=3)
        return False
    return True


def encoder_top_k_available() -> bool:
    """Whether `encoder_top_k` can run here: the kernels are available and the CPU has AMX tiles
    (Intel Xeon from Sapphire Rapids on) that Linux grants this process.

    JSAE_ENCODER_TOP_K=0 makes it false (the sparse TopK path then takes XLA's dense encoder product).
    """
    if os.environ.get("JSAE_ENCODER_TOP_K", "1") == "0" or not available():
        return False
    return bool(_library.JsaeEncoderTopKUsable())


def encoder_top_k(x: jax.Array, W: jax.Array, bias: jax.Array, scale: jax.Array | None,
                  k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top k of each row of h = (x @ W + bias) * scale without the dense float32 product:
    x (..., n, K), W (..., K, m), bias and scale (..., m) (scale None: 1) -> values, pre, indices
    (..., n, k), where pre = x @ W + bias at the indices and values = pre * scale.

    An approximate bf16 product on the CPU's AMX tiles, with a rigorous bound on its error, picks
    the entries that can be among the top k; only those get their float32 dot products, and the
    top k of them is returned in `jax.lax.top_k`'s order. The values are float32 dot products
    summed in a different order from XLA's (so equal to the dense path's up to float rounding).
    Raises RuntimeError where `encoder_top_k_available()` is false. No gradient.
    """
    if not encoder_top_k_available():
        raise RuntimeError("jsae's encoder_top_k needs the CPU kernels and a CPU with AMX tiles; use "
                           "kernels.top_k_affine on x @ W")
    scale = jnp.ones_like(bias) if scale is None else scale
    if any(a.dtype != jnp.float32 for a in (x, W, bias, scale)):
        raise TypeError("encoder_top_k takes float32 x, W, bias and scale, got "
                        f"{', '.join(str(a.dtype) for a in (x, W, bias, scale))}")
    lead = x.shape[:-2]
    if (x.ndim < 2 or W.shape != (*lead, x.shape[-1], W.shape[-1]) or bias.shape != (*lead, W.shape[-1])
            or scale.shape != bias.shape):
        raise ValueError(f"encoder_top_k: x {list(x.shape)} must be (..., n, K), W {list(W.shape)} (..., K, m), "
                         f"bias {list(bias.shape)} and scale {list(scale.shape)} (..., m), with the same leading axes")
    if not 0 <= k <= W.shape[-1]:
        raise ValueError(f"encoder_top_k needs 0 <= k <= {W.shape[-1]} (W's last axis), got k={k}")
    shape = (*x.shape[:-1], k)
    stop = jax.lax.stop_gradient
    return _call("jsae_encoder_top_k_f32", [(shape, jnp.float32), (shape, jnp.float32), (shape, jnp.int32)],
                 stop(x), stop(W), stop(bias), stop(scale))


def blas_library() -> str | None:
    """The path of the BLAS the dense kernels loaded, or None (see `dense_available`)."""
    return _blas if dense_available() else None


_blas_tried = False


def dense_available() -> bool:
    """Whether `dense_encode` and `dense_backward` can run here: the kernels are available and
    their BLAS (`_blas_library`: MKL on Intel CPUs where installed, else OpenBLAS from
    scipy-openblas32) loads.

    JSAE_DENSE_KERNELS=0 makes it false (the dense steps then run XLA's products and fusions).
    """
    global _blas, _blas_tried
    if os.environ.get("JSAE_DENSE_KERNELS", "1") == "0" or not available():
        return False
    with _lock:
        if not _blas_tried:
            _blas_tried = True
            try:
                path, sgemm, threads = _blas_library()
                if _library.JsaeLoadBlas(path.encode(), sgemm.encode(), threads.encode()):
                    _blas = path
                else:
                    raise OSError(f"could not load {sgemm} from {path}")
            except (ImportError, OSError) as error:
                warnings.warn(f"jsae: the dense steps use XLA's products on CPU ({error}). Results are the "
                              "same, standard and JumpReLU training is slower; JSAE_DENSE_KERNELS=0 silences "
                              "this.", RuntimeWarning, stacklevel=3)
    return _blas is not None


def dense_encode(x: jax.Array, W_enc: jax.Array, b_enc: jax.Array, W_dec: jax.Array,
                 threshold: jax.Array | None) -> tuple[jax.Array, ...]:
    """The dense SAE forward in blocks of tokens, its products by the BLAS: x (n, d), W_enc (d, m),
    b_enc (m,), W_dec (m, d), threshold (m,) for JumpReLU or None for ReLU ->
    h, pre, lin, sums, fired, l0 where pre = x W_enc + b_enc, h = relu(pre) (threshold None) or
    pre * (pre > threshold), lin = h W_dec (n, d), sums = Σ_tokens h and fired = the tokens where h
    != 0 (JumpReLU: pre > threshold) (m,), l0 = the latents where h != 0, a token (n,). pre is (0,)
    for ReLU. No gradient (`jsae.saes._dense_fused` defines it); float32, no leading axes.
    """
    _check_dense("dense_encode", x, W_enc, b_enc, W_dec, *([] if threshold is None else [threshold]))
    n, d = x.shape
    m = W_enc.shape[1]
    if W_enc.shape != (d, m) or b_enc.shape != (m,) or W_dec.shape != (m, d) or (
            threshold is not None and threshold.shape != (m,)):
        raise ValueError(f"dense_encode: x {list(x.shape)} must be (n, d), W_enc {list(W_enc.shape)} (d, m), b_enc "
                         f"{list(b_enc.shape)} and threshold (m,), W_dec {list(W_dec.shape)} (m, d)")
    jump = threshold is not None
    if threshold is None:
        threshold = jnp.zeros((0,), jnp.float32)
    f32 = jnp.float32
    results = [((n, m), f32), ((n, m) if jump else (0,), f32), ((n, d), f32), ((m,), f32), ((m,), f32),
               ((n,), f32)]
    stop = jax.lax.stop_gradient
    return _call("jsae_dense_encode_f32", results, stop(x), stop(W_enc), stop(b_enc), stop(W_dec), stop(threshold),
                 vmap_method="sequential", jump=jump)


def dense_backward(x: jax.Array, W_dec: jax.Array, h: jax.Array, pre: jax.Array, threshold: jax.Array | None,
                   g_lin: jax.Array, g_sums: jax.Array, g_l0: jax.Array, *, bandwidth: float = 1.0,
                   ste_to_input: bool = False) -> tuple[jax.Array, ...]:
    """`dense_encode`'s backward in blocks of latents, from the cotangents of lin (n, d), sums (m,)
    and l0 (n,) (l0's reaches JumpReLU's threshold and, with ste_to_input, its pre-activations,
    through the rectangle-kernel estimator of width `bandwidth`) -> the gradients of W_enc (d, m),
    b_enc (m,), W_dec (m, d) and threshold (m,) (zeros for ReLU).
    """
    jump = threshold is not None
    if threshold is None:
        threshold = jnp.zeros((0,), jnp.float32)
    _check_dense("dense_backward", x, W_dec, h, pre, threshold, g_lin, g_sums, g_l0)
    (n, d), m = x.shape, h.shape[-1]
    if (h.shape != (n, m) or W_dec.shape != (m, d) or g_lin.shape != (n, d) or g_sums.shape != (m,)
            or g_l0.shape != (n,) or (jump and (pre.shape != (n, m) or threshold.shape != (m,)))):
        raise ValueError("dense_backward: operands of mismatched shapes")
    f32 = jnp.float32
    results = [((d, m), f32), ((m,), f32), ((m, d), f32), ((m,), f32)]
    stop = jax.lax.stop_gradient
    return _call("jsae_dense_backward_f32", results, *map(stop, (x, W_dec, h, pre, threshold, g_lin, g_sums, g_l0)),
                 vmap_method="sequential", jump=jump, bandwidth=np.float32(bandwidth),
                 ste_to_input=bool(ste_to_input))


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (n, d) @ b (d, m) on the dense kernels' BLAS, in blocks of a's rows shared over XLA's
    threads (see `dense_available`). No gradient (its inputs are taken as constants); float32, no
    leading axes (the sparse TopK step's encoder product on CPU).
    """
    _check_dense("matmul", a, b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: a {list(a.shape)} must be (n, d) and b {list(b.shape)} (d, m)")
    stop = jax.lax.stop_gradient
    return _call("jsae_matmul_f32", [((a.shape[0], b.shape[1]), jnp.float32)], stop(a), stop(b),
                 vmap_method="sequential")[0]


def adam(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array,
         coefficients: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Adam step after a global-norm clip, in one pass over each element, in place (the
    outputs alias p, m and v): the p, m, v that optax.chain(clip_by_global_norm, scale_by_adam)
    and apply_updates give. coefficients: float32 [keep (1 where the global norm is below the
    clip), norm, max_norm, 1 - b1, b1, 1 - b2, b2, 1 - b1^count, 1 - b2^count, eps, -lr]. No gradient.
    """
    _check_available("optax")
    if any(a.dtype != jnp.float32 for a in (p, g, m, v, coefficients)) or coefficients.shape != (11,):
        raise TypeError("adam takes float32 p, g, m, v and 11 float32 coefficients")
    if not p.shape == g.shape == m.shape == v.shape:
        raise ValueError(f"adam: p {list(p.shape)}, g {list(g.shape)}, m {list(m.shape)} and v {list(v.shape)} "
                         "must have one shape")
    stop = jax.lax.stop_gradient
    results = [(p.shape, jnp.float32)] * 3
    return _call("jsae_adam_f32", results, *map(stop, (p, g, m, v, coefficients)), vmap_method="sequential",
                 input_output_aliases={0: 0, 2: 1, 3: 2})


def _check_dense(name: str, *arrays: jax.Array) -> None:
    if not dense_available():
        raise RuntimeError(f"jsae's {name} needs the CPU kernels and OpenBLAS (scipy-openblas32); use XLA's products")
    if any(a.dtype != jnp.float32 for a in arrays):
        raise TypeError(f"{name} takes float32 operands, got {', '.join(str(a.dtype) for a in arrays)}")
    if arrays[0].ndim != 2:
        raise ValueError(f"{name} takes x (n, d), got {list(arrays[0].shape)}")


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)` from the kernel: the same values (bit for bit) and indices, float32 x,
    any leading axes.

    For computations that run on CPU; builds and registers the kernel on first use, and raises
    RuntimeError where `available()` is false. Carries no gradient (`jsae.saes._base.row_top_k`
    adds lax.top_k's).
    """
    shape = _check_top_k(x, k)
    values, indices = _call(TOP_K_TARGET, [(shape, jnp.float32), (shape, jnp.int32)], jax.lax.stop_gradient(x))
    return values, indices


def top_k_affine(x: jax.Array, bias: jax.Array, scale: jax.Array | None, k: int) -> tuple[jax.Array, jax.Array]:
    """`top_k((x + bias) * scale, k)` without writing out (x + bias) * scale: x (..., n), bias and
    scale (n,) (under vmap, with x's mapped axes in front). scale None: x + bias.

    The values are (x + bias) * scale at the indices, the same floats XLA computes. No gradient.
    """
    scale = jnp.ones_like(bias) if scale is None else scale
    shape = _check_top_k(x, k, bias, scale)
    if bias.shape != scale.shape or bias.shape[-1:] != x.shape[-1:]:
        raise ValueError(f"top_k_affine: bias {list(bias.shape)} and scale {list(scale.shape)} must both be "
                         f"({x.shape[-1]},) for x {list(x.shape)}")
    stop = jax.lax.stop_gradient
    values, indices = _call("jsae_top_k_affine_f32", [(shape, jnp.float32), (shape, jnp.int32)], stop(x), stop(bias),
                            stop(scale))
    return values, indices


def _check_top_k(x: jax.Array, k: int, *others: jax.Array) -> tuple[int, ...]:
    """Checks for either top-k kernel (kernels there, float32 operands, 0 <= k <= n); the outputs' shape."""
    _check_available("jax.lax.top_k")
    if any(a.dtype != jnp.float32 for a in (x, *others)):
        raise TypeError(f"the CPU top-k kernel takes float32, got {', '.join(str(a.dtype) for a in (x, *others))}")
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"top_k needs 0 <= k <= {x.shape[-1]} (the last axis), got k={k}")
    return (*x.shape[:-1], k)


def usable(*arrays: jax.Array) -> bool:
    """Whether the kernels can take these arrays: they are float32 (or int32 indices) and the
    kernels are available. (Which platform runs them is the execution plan's choice.)"""
    return all(a.dtype in (jnp.float32, jnp.int32) for a in arrays) and available()


def _varying(a: jax.Array) -> frozenset:
    """The manual mesh axes `a` varies over (inside jax.shard_map; empty elsewhere)."""
    axis_type = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset(axis_type.varying) if axis_type is not None else frozenset()


def _call(target: str, results: list[tuple], *args: jax.Array, vmap_method: str = "broadcast_all",
          input_output_aliases: dict | None = None, **attributes) -> tuple[jax.Array, ...]:
    """jax.ffi.ffi_call of `target` on args; results: a (shape, dtype) for each output.

    Under jax.shard_map, the inputs are first cast to vary over every mesh axis any of them varies
    over (an FFI call takes operands of one type), and the results are typed as varying over those
    axes too, as the XLA operations they replace would be.
    """
    axes = frozenset().union(*(_varying(a) for a in args))
    kind = {}
    if axes:
        args = tuple(jax.lax.pcast(a, tuple(sorted(axes - _varying(a))), to="varying") if axes - _varying(a) else a
                     for a in args)
        like = jax.typeof(args[0])  # the cast inputs' manual axis type, on their (abstract) mesh
        kind = {"sharding": jax.sharding.NamedSharding(like.sharding.mesh, jax.sharding.PartitionSpec()),
                "manual_axis_type": like.manual_axis_type}
    out = tuple(jax.ShapeDtypeStruct(shape, dtype, **kind) for shape, dtype in results)
    call = jax.ffi.ffi_call(target, out, vmap_method=vmap_method, input_output_aliases=input_output_aliases)
    return tuple(call(*args, **attributes))


def _check_available(instead: str) -> None:
    if not available():
        raise RuntimeError("jsae's CPU kernels are not available here (see the warning above, or "
                           f"JSAE_CPU_KERNELS=0 is set); use {instead}")


def _check_slots(name: str, indices: jax.Array, **float32s: jax.Array) -> None:
    if indices.ndim < 2 or indices.dtype != jnp.int32:
        raise TypeError(f"{name} takes (..., n, k) int32 indices, got {indices.dtype}{list(indices.shape)}")
    for arg, a in float32s.items():
        if a.dtype != jnp.float32 or a.ndim != indices.ndim or a.shape[:-2] != indices.shape[:-2]:
            raise TypeError(f"{name} takes a float32 {arg} with the indices' leading axes "
                            f"{list(indices.shape[:-2])}, got {a.dtype}{list(a.shape)}")


def gather_rows_dot(rows: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
    """out[..., t, j] = rows[..., t, :] · table[..., indices[..., t, j], :]: (..., n, d), (..., n, k), (..., m, d) -> (..., n, k).

    Indices outside [0, m) give 0. No gradient; float32 sums in a different order from XLA's.
    """
    _check_available("jsae.saes._sparse_topk's XLA products")
    _check_slots("gather_rows_dot", indices, rows=rows, table=table)
    if rows.shape[-2:] != (indices.shape[-2], table.shape[-1]):
        raise ValueError(f"gather_rows_dot: rows {list(rows.shape)} must be (..., n, d) for indices "
                         f"{list(indices.shape)} and table {list(table.shape)}")
    return _call("jsae_gather_rows_dot_f32", [(indices.shape, jnp.float32)], rows, indices, table)[0]


def gather_rows_weighted(weights: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
    """out[..., t, :] = Σ_j weights[..., t, j] · table[..., indices[..., t, j], :]: -> (..., n, d).

    Indices outside [0, m) add nothing. No gradient; float32 sums in a different order from XLA's.
    """
    _check_available("jsae.saes._sparse_topk's XLA products")
    _check_slots("gather_rows_weighted", indices, weights=weights, table=table)
    if weights.shape != indices.shape:
        raise ValueError(f"gather_rows_weighted: weights {list(weights.shape)} must have the indices' shape "
                         f"{list(indices.shape)}")
    return _call("jsae_gather_rows_weighted_f32", [((*indices.shape[:-1], table.shape[-1]), jnp.float32)], weights,
                 indices, table)[0]


def scatter_rows(weights: jax.Array, indices: jax.Array, rows: jax.Array, m: int) -> jax.Array:
    """out[..., i, :] = Σ over (t, j) with indices[..., t, j] = i of weights[..., t, j] · rows[..., t, :]: -> (..., m, d).

    Indices outside [0, m) add nothing. No gradient; each row's sum runs in (t, j) order whatever
    the thread count, so results are deterministic.
    """
    _check_available("jsae.saes._sparse_topk's XLA products")
    _check_slots("scatter_rows", indices, weights=weights, rows=rows)
    if weights.shape != indices.shape or rows.shape[-2] != indices.shape[-2]:
        raise ValueError(f"scatter_rows: weights {list(weights.shape)} must have the indices' shape and rows "
                         f"{list(rows.shape)} their n, for indices {list(indices.shape)}")
    shape = (*indices.shape[:-2], m, rows.shape[-1])
    return _call("jsae_scatter_rows_f32", [(shape, jnp.float32)], weights, indices, rows)[0]
