"""Mixed precision: the training step's products in `compute_dtype`, accumulated in float32.

Parameters and optimiser state keep the SAE's `dtype`; with `compute_dtype` bfloat16 the inputs of
every product an architecture runs through its `Ops` (`dot`, `matmul`, `dense_forward` and the
sparse TopK gathers and scatters) are rounded to bfloat16 and the product accumulates and returns
float32 (`preferred_element_type=jnp.float32`), forward and backward alike. Everything else (the
elementwise work, the losses, Adam) stays in the parameters' dtype. The execution plan picks these
primitives (`ExecutionPlan.ops`); the CPU back end's kernels are float32-only, so a bfloat16 plan
runs XLA's products.

`matmul_precision` is XLA's precision for float32 products (`jax.default_matmul_precision` while the
step is traced): "default" leaves XLA's choice (TF32 on recent NVIDIA GPUs, bfloat16 passes on TPU),
"tf32" asks for TensorFloat-32, "float32" (or "highest") for full float32.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from jsae.saes._ops import Ops

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# matmul_precision -> jax.default_matmul_precision's name (None: JAX's default).
MATMUL_PRECISIONS = {"default": None, "tf32": "tensorfloat32", "float32": "float32", "highest": "float32"}


def _mm(a, b):
    # An explicit DEFAULT precision: the inputs are already in the compute dtype, so the step's
    # matmul_precision (meant for float32 products) does not apply to them.
    return jnp.matmul(a, b, precision=jax.lax.Precision.DEFAULT, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_dot(a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """a @ b with a and b rounded to `dtype`, accumulated in and returned as float32.

    a is (..., d) (a vector or a batch of rows), b (d, m). The backward's two products take the
    cotangent rounded to `dtype` and the saved low-precision operands, and accumulate in float32 too
    (autodiff of the cast would round the gradients to `dtype`).
    """
    return _mm(a.astype(dtype), b.astype(dtype))


def _mixed_dot_fwd(a, b, dtype):
    a_c, b_c = a.astype(dtype), b.astype(dtype)
    # Zero scalars carry the operands' dtypes (residuals must be arrays).
    return _mm(a_c, b_c), (a_c, b_c, jnp.zeros((), a.dtype), jnp.zeros((), b.dtype))


def _mixed_dot_bwd(dtype, residuals, g):
    a_c, b_c, a_like, b_like = residuals
    d, m = b_c.shape
    g_c = g.astype(dtype).reshape(-1, m)
    d_a = _mm(g_c, b_c.T).reshape(a_c.shape)
    d_b = _mm(a_c.reshape(-1, d).T, g_c)
    return d_a.astype(a_like.dtype), d_b.astype(b_like.dtype)


mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def with_compute_dtype(ops: Ops, compute_dtype: str) -> Ops:
    """`ops` with its products in `compute_dtype` (float32 accumulation); `ops` itself for float32.

    The products are `ops`' own with their inputs cast (which must take `out_dtype`, as the reference
    and the Pallas decoder do); the plan picks no float32-only kernel for a lower compute dtype.
    """
    if compute_dtype == "float32":
        return ops
    dtype = COMPUTE_DTYPES[compute_dtype]
    dot = functools.partial(mixed_dot, dtype=dtype)

    def gather_rows_weighted(weights, indices, table):
        return ops.gather_rows_weighted(weights.astype(dtype), indices, table.astype(dtype), out_dtype=table.dtype)

    def gather_rows_dot(rows, indices, table):
        return ops.gather_rows_dot(rows.astype(dtype), indices, table.astype(dtype))

    def scatter_rows(weights, indices, rows, m):
        return ops.scatter_rows(weights.astype(dtype), indices, rows.astype(dtype), m, out_dtype=rows.dtype)

    return ops.replace(
        name=f"{ops.name}+{compute_dtype}", dot=dot, matmul=dot,
        dense_forward=functools.partial(ops.dense_forward, dot=dot),
        gather_rows_weighted=gather_rows_weighted, gather_rows_dot=gather_rows_dot, scatter_rows=scatter_rows,
        compute_dtype=compute_dtype,
    )


def matmul_precision_context(matmul_precision: str):
    """The context a step is traced in for `matmul_precision` (a no-op for "default")."""
    name = MATMUL_PRECISIONS[matmul_precision]
    return contextlib.nullcontext() if name is None else jax.default_matmul_precision(name)
