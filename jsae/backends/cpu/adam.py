"""The clipped Adam update in one pass over each parameter, in place (`kernels.adam`).

`apply` gives the parameters and optimiser state that `jsae.training.optim.adam_chain` and
`optax.apply_updates` give (up to float rounding: the global norm's squares are summed by dot
products, in another order), for float32 parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jsae.backends.cpu import kernels


def apply(grads: dict, opt_state: Any, params: dict, lr: jax.Array, *, max_grad_norm: float, b1: float, b2: float,
          eps: float) -> tuple[dict, Any]:
    """params - lr · adam_direction(clip(grads)) and the new (clip state, Adam state), each parameter in one pass."""
    clip_state, adam_state = opt_state
    norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads)))
    keep = norm < max_grad_norm
    count = optax.safe_increment(adam_state.count)
    f32 = jnp.float32
    coefficients = jnp.stack([
        keep.astype(f32), norm.astype(f32), f32(max_grad_norm), f32(1 - b1), f32(b1), f32(1 - b2), f32(b2),
        (1 - b1**count).astype(f32), (1 - b2**count).astype(f32), f32(eps), -jnp.asarray(lr, f32)])
    new_params, mu, nu = {}, {}, {}
    for name in params:
        new_params[name], mu[name], nu[name] = kernels.adam(params[name], grads[name], adam_state.mu[name],
                                                            adam_state.nu[name], coefficients)
    return new_params, (clip_state, adam_state._replace(count=count, mu=mu, nu=nu))
