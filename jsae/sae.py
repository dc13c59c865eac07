"""`jsae.SAE`: an SAELens-shaped handle on a config plus a plain parameter pytree.

The SAE is itself a pytree (params and sparsity are its leaves, the config is static), so it
can be passed straight through `jax.jit`, `jax.vmap` and `jax.pmap`; `sae.module` is the Flax
Linen module for code that prefers `module.apply({"params": params}, x, method="encode")`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsae import io
from jsae._errors import ConfigError, InputError
from jsae.config import SAEConfig
from jsae.saes import ForwardOutput, InputState, get_architecture
from jsae.tensors import check_finite_params

Array = jax.Array


@jax.tree_util.register_pytree_with_keys_class
class SAE:
    """A sparse autoencoder (any SAELens architecture) with SAELens' method names.

    Args:
        cfg: the architecture's config (e.g. `jsae.StandardSAEConfig`).
        params: dict of arrays named like the SAELens tensors (W_enc, b_enc, W_dec, b_dec, ...).
        sparsity: optional log10 feature density, shape (d_sae,), saved as sparsity.safetensors.
        check_finite: make `encode`/`forward` raise on NaN/inf inputs (forces a host sync).
    """

    def __init__(
        self,
        cfg: SAEConfig,
        params: Mapping[str, Any],
        sparsity: Any | None = None,
        *,
        check_finite: bool = False,
        _validate: bool = True,
    ):
        self.cfg = cfg
        if _validate:
            io.check_params(params, cfg, source="params")
            params = {k: jnp.asarray(v) for k, v in params.items()}
            if sparsity is not None:
                sparsity = jnp.asarray(sparsity)
        self.params = dict(params)
        self.sparsity = sparsity
        self.check_finite = check_finite
        self._last_state: InputState | None = None

    # ------------------------------------------------------------------ pytree
    def tree_flatten_with_keys(self):
        children = (
            (jax.tree_util.GetAttrKey("params"), self.params),
            (jax.tree_util.GetAttrKey("sparsity"), self.sparsity),
        )
        return children, (self.cfg, self.check_finite)

    @classmethod
    def tree_unflatten(cls, aux, children):
        cfg, check_finite = aux
        params, sparsity = children
        return cls(cfg, params, sparsity, check_finite=check_finite, _validate=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: SAEConfig, *, seed: int = 0) -> SAE:
        """A freshly initialised SAE (SAELens' inference init: kaiming-uniform W_dec, W_enc = W_dec.T)."""
        from jsae.saes import init_params

        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise ConfigError(f"SAE.from_config: seed must be an integer, got {seed!r}.")
        return cls(cfg, init_params(cfg, jax.random.key(seed)))

    @classmethod
    def load_from_disk(
        cls,
        path: str | os.PathLike,
        device: str | None = None,
        dtype: str | None = None,
        fold_W_dec_norm: bool = False,
    ) -> SAE:
        """Load an SAELens folder (any version), a sparsify folder or a Gemma Scope params.npz folder."""
        cfg, params, sparsity = io.read_folder(path, dtype=dtype)
        check_finite_params(params, source=str(path))
        sae = cls(cfg, params, sparsity).to(device)
        return sae.fold_W_dec_norm() if fold_W_dec_norm else sae

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str, device: str | None = None, dtype: str = "float32",
                        force_download: bool = False, fold_W_dec_norm: bool = False) -> SAE:
        """Download (or read from the Hugging Face cache) a released SAE; see `jsae.pretrained`.

        SAELens' signature; the SAE of `from_pretrained_with_cfg_and_sparsity`.
        """
        return cls.from_pretrained_with_cfg_and_sparsity(release, sae_id, device, dtype, force_download,
                                                         fold_W_dec_norm)[0]

    @classmethod
    def from_pretrained_with_cfg_and_sparsity(
        cls,
        release: str,
        sae_id: str,
        device: str | None = None,
        dtype: str = "float32",
        force_download: bool = False,
        fold_W_dec_norm: bool = False,
    ) -> tuple[SAE, dict[str, Any], Array | None]:
        """SAELens' pre-6.0 `from_pretrained` form: (sae, cfg dict, log10 sparsity or None)."""
        from jsae import pretrained

        cfg, params, sparsity, norm_scaling_factor = pretrained.load(
            release, sae_id, dtype=dtype, force_download=force_download
        )
        sae = cls(cfg, params, sparsity)
        if cfg.normalize_activations == "expected_average_only_in" and norm_scaling_factor is not None:
            sae = sae.fold_activation_norm_scaling_factor(norm_scaling_factor)
        sae = sae.to(device)
        if fold_W_dec_norm:
            sae = sae.fold_W_dec_norm()
        return sae, sae.cfg.to_dict(), sae.sparsity

    def save_model(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write cfg.json + sae_weights.safetensors (+ sparsity.safetensors) atomically."""
        params = {k: np.asarray(v) for k, v in self.params.items()}
        sparsity = None if self.sparsity is None else np.asarray(self.sparsity)
        return io.write_folder(path, self.cfg, params, sparsity)

    # ------------------------------------------------------------------ placement and copies
    def replace(self, **changes: Any) -> SAE:
        """A copy with `cfg`, `params` or `sparsity` replaced."""
        kwargs = {"cfg": self.cfg, "params": self.params, "sparsity": self.sparsity} | changes
        return SAE(kwargs["cfg"], kwargs["params"], kwargs["sparsity"], check_finite=self.check_finite)

    def to(self, device: Any = None, dtype: str | None = None) -> SAE:
        """Move to a device ("cpu", "cuda"/"gpu", "cuda:1", or a jax.Device) and/or cast the dtype."""
        sae = self
        if dtype is not None:
            from jsae.config import canonical_dtype

            name = canonical_dtype(dtype, field="dtype argument")
            params = {k: v.astype(jnp.dtype(name)) for k, v in sae.params.items()}
            sae = sae.replace(cfg=sae.cfg.replace(dtype=name), params=params)
        if device is not None:
            target = resolve_device(device)
            sae = jax.device_put(sae, target)
        return sae

    @property
    def module(self):
        """The Flax Linen module of this architecture (parameters passed at apply time)."""
        return get_architecture(self.cfg.architecture).module_cls(self.cfg)

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def W_enc(self) -> Array:
        """The encoder (d_in, d_sae); W_decᵀ for tied architectures (matching_pursuit, tied temporal)."""
        return self.params["W_enc"] if "W_enc" in self.params else self.params["W_dec"].T

    @property
    def W_dec(self) -> Array:
        return self.params["W_dec"]

    @property
    def b_dec(self) -> Array:
        return self.params["b_dec"]

    def __repr__(self) -> str:
        return (
            f"SAE(architecture={self.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae}, dtype={self.cfg.dtype!r})"
        )

    # ------------------------------------------------------------------ compute
    def apply(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one of the module's methods with this SAE's params."""
        return self.module.apply({"params": self.params}, *args, method=method, **kwargs)

    def _check(self, x: Any) -> Array:
        x = as_real_array(x, what="input")
        if self.check_finite and not isinstance(x, jax.core.Tracer):
            if not bool(jnp.all(jnp.isfinite(x))):
                bad = int(jnp.size(x) - jnp.sum(jnp.isfinite(x)))
                raise InputError(f"input: {bad} non-finite value(s) (NaN/inf) in an array of shape {x.shape}.")
        return x

    def encode(self, x: Any) -> Array:
        """Latent activations (..., d_sae). Inputs may be numpy or jax arrays."""
        feature_acts, _, state = self.encode_with_state(x)
        return feature_acts

    def encode_with_state(self, x: Any) -> tuple[Array, Array, InputState]:
        """(feature_acts, hidden_pre, state); `state` lets `decode` undo runtime normalisation."""
        out = self.apply("encode_with_state", self._check(x))
        self._last_state = out[2]
        return out

    def encode_with_hidden_pre(self, x: Any) -> tuple[Array, Array]:
        feature_acts, hidden_pre, _ = self.encode_with_state(x)
        return feature_acts, hidden_pre

    def decode(self, feature_acts: Any, state: InputState | None = None) -> Array:
        """Reconstruction from latents.

        Like SAELens, modes that normalise at run time (constant_norm_rescale, layer_norm) and
        hook_z reshaping reuse the statistics of the last `encode` call unless `state` is given;
        under `jax.jit` pass `state` (from `encode_with_state`) or use the forward pass.
        """
        if state is None:
            state = self._last_state
        return self.apply("decode", as_real_array(feature_acts, what="feature_acts"), state)

    def forward(self, x: Any, use_error_term: bool = False) -> Array:
        return self.apply("__call__", self._check(x), use_error_term)

    __call__ = forward

    def forward_with_details(self, x: Any, use_error_term: bool = False) -> ForwardOutput:
        return self.apply("forward_with_details", self._check(x), use_error_term)

    # ------------------------------------------------------------------ folding (returns new SAEs)
    def fold_W_dec_norm(self) -> SAE:
        """Unit-norm decoder rows with the norms moved into the encoder; outputs unchanged."""
        fold = get_architecture(self.cfg.architecture).fold_W_dec_norm
        return self.replace(params=fold(self.params, self.cfg))

    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> SAE:
        """Fold a training-time input scale s into the weights as the architecture does (SAELens: W_enc*s,
        W_dec/s, b_dec/s); normalize_activations becomes "none"."""
        fold = get_architecture(self.cfg.architecture).fold_activation_norm_scaling_factor
        params, cfg = fold(dict(self.params), self.cfg, scaling_factor)
        return self.replace(cfg=cfg, params=params)


def as_real_array(x: Any, *, what: str) -> Array:
    """`x` as a JAX array; InputError for complex or non-numeric data.

    Complex inputs must not reach the SAE: casting them to the parameter dtype would silently
    drop the imaginary part.
    """
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(x).dtype
        except (TypeError, ValueError) as err:
            raise InputError(f"{what}: expected a numeric array, got {type(x).__name__} ({err}).") from err
    try:
        dtype = np.dtype(dtype)
    except TypeError as err:
        raise InputError(f"{what}: expected a numeric array, got dtype {dtype!r}.") from err
    if dtype.kind == "c":
        raise InputError(
            f"{what}: dtype {dtype.name} is complex; an SAE takes real activations. "
            "Pass x.real (or another real view of the data) explicitly."
        )
    if dtype.kind not in "biufV":
        raise InputError(f"{what}: expected a numeric array, got dtype {dtype.name}.")
    return jnp.asarray(x)


def resolve_device(device: Any) -> Any:
    """A jax.Device for "cpu" / "cuda" / "gpu" / "cuda:N" / "tpu", or the device itself."""
    if isinstance(device, jax.Device):
        return device
    text = str(device)
    platform, _, index = text.partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    try:
        devices = jax.devices(platform)
    except RuntimeError as err:
        raise ConfigError(
            f"device: {text!r} asked for, but JAX has no {platform!r} backend here "
            f"(available: {sorted({d.platform for d in jax.devices()})})."
        ) from err
    i = int(index) if index else 0
    if i >= len(devices):
        raise ConfigError(f"device: {text!r} asked for, but only {len(devices)} {platform} device(s) exist.")
    return devices[i]
