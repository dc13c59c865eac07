"""SAE configs: frozen dataclasses whose field names are the SAELens cfg.json names.

One config class per architecture (see `jsae.saes`); this module holds the common base,
the metadata mapping and the dtype / normalisation vocabularies shared by all of them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import jax.numpy as jnp

from jsae._errors import ConfigError, close_names

#: The SAELens cfg.json format version jsae reads and writes (metadata.sae_lens_version).
SAELENS_FORMAT_VERSION = "6.54.12"

DTYPES: dict[str, Any] = {
    "float32": jnp.float32,
    "float64": jnp.float64,
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
}
# Legacy spellings found in cfg.json files written by older SAELens versions.
_DTYPE_ALIASES = {f"torch.{name}": name for name in DTYPES} | {
    "torch.float": "float32",
    "torch.half": "float16",
    "torch.double": "float64",
    "float": "float32",
}

#: Largest d_in / d_sae: JAX's top_k and gathers index with int32, so wider axes cannot be computed.
MAX_WIDTH = 2**31 - 1

NORMALIZE_MODES = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPE_MODES = ("none", "hook_z")
# torch's device types (torch.device's parser), with an optional index: what SAELens writes as cfg.json's device.
TORCH_DEVICE = re.compile(r"^(cpu|cuda|ipu|xpu|mkldnn|opengl|opencl|ideep|hip|ve|fpga|maia|xla|lazy|vulkan|mps|meta|hpu"
                          r"|mtia|privateuseone)(:\d+)?$")


def canonical_dtype(name: Any, *, field: str = "dtype") -> str:
    """Return the short dtype name ("float32", ...) for any spelling SAELens accepts."""
    text = str(name)
    text = _DTYPE_ALIASES.get(text, text)
    if text not in DTYPES:
        raise ConfigError(
            f"{field}: expected one of {sorted(DTYPES)}, got {name!r}."
            + close_names(text, list(DTYPES) + list(_DTYPE_ALIASES))
        )
    return text


class Metadata(Mapping):
    """Read-only, hashable mapping of cfg.json's `metadata` block.

    Like SAELens' `SAEMetadata`, missing keys read as None both as attributes
    (`cfg.metadata.hook_name`) and with `.get`; `metadata["key"]` raises KeyError.
    """

    __slots__ = ("_data", "_key")

    def __init__(self, data: Mapping[str, Any] | None = None, **kwargs: Any):
        merged = dict(data or {}) | kwargs
        # Round-trip through JSON: values must be JSON data, and the copy is private.
        try:
            text = json.dumps(merged, sort_keys=True)
        except TypeError as err:
            raise ConfigError(f"metadata: values must be JSON-serialisable ({err}).") from err
        object.__setattr__(self, "_data", json.loads(text))
        object.__setattr__(self, "_key", text)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self._data.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Metadata is read-only: use metadata.replace(key=value).")

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Metadata):
            return self._key == other._key
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Metadata({self._data!r})"

    def __reduce__(self):
        return (Metadata, (self._data,))

    def replace(self, **changes: Any) -> Metadata:
        """A copy with `changes` applied."""
        return Metadata(self._data | changes)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self._key)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Fields every SAELens SAE config has (cfg.json names).

    Attributes:
        d_in: width of the activations the SAE reads.
        d_sae: number of latents.
        dtype: parameter dtype name ("float32", "bfloat16", ...).
        device: kept for cfg.json compatibility; jsae places arrays with JAX.
        apply_b_dec_to_input: subtract b_dec from the input before encoding.
        normalize_activations: one of NORMALIZE_MODES.
        reshape_activations: "hook_z" flattens (n_heads, d_head) inputs.
        metadata: model/hook/dataset facts (see `Metadata`).
    """

    architecture: ClassVar[str] = ""
    #: normalize_activations values this architecture accepts.
    normalize_modes: ClassVar[tuple[str, ...]] = NORMALIZE_MODES

    d_in: int
    d_sae: int
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    reshape_activations: str = "none"
    metadata: Metadata = dataclasses.field(default_factory=Metadata)

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("d_in", "d_sae"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}.{field} must be a positive integer, got {value!r}.")
            if value > MAX_WIDTH:
                raise ConfigError(f"{name}.{field} must be at most {MAX_WIDTH} (2**31 - 1), got {value!r}.")
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"{name}.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}." + close_names(self.dtype, DTYPES)
            )
        if self.normalize_activations not in self.normalize_modes:
            raise ConfigError(
                f"{name}.normalize_activations must be one of {list(self.normalize_modes)}, "
                f"got {self.normalize_activations!r}." + close_names(self.normalize_activations, self.normalize_modes)
            )
        if self.reshape_activations not in RESHAPE_MODES:
            raise ConfigError(
                f"{name}.reshape_activations must be one of {list(RESHAPE_MODES)}, got {self.reshape_activations!r}."
            )
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise ConfigError(f"{name}.apply_b_dec_to_input must be a bool, got {self.apply_b_dec_to_input!r}.")
        if isinstance(self.device, str) and not TORCH_DEVICE.match(self.device):  # (a non-string: below)
            raise ConfigError(f"{name}.device must be a torch device name such as 'cpu', 'cuda' or 'cuda:1' (kept for "
                              f"SAELens' cfg.json; jsae places arrays with JAX), got {self.device!r}.")
        if not isinstance(self.metadata, Metadata):
            raise ConfigError(f"{name}.metadata must be a jsae.Metadata, got {type(self.metadata)}.")
        for field in dataclasses.fields(self):  # a flag, coefficient or name of another type is misread later
            value, kind = getattr(self, field.name), str(field.type)
            if kind == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{name}.{field.name} must be true or false, got {value!r}.")
            if kind == "str" and not isinstance(value, str):
                raise ConfigError(f"{name}.{field.name} must be a string, got {value!r}.")
            if kind in ("float", "float | None") and not (value is None and "None" in kind) and (
                    isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)):
                raise ConfigError(f"{name}.{field.name} must be a finite number{' or null' if 'None' in kind else ''}, "
                                  f"got {value!r}.")

    @property
    def jnp_dtype(self) -> Any:
        """The JAX dtype named by `dtype`."""
        return DTYPES[self.dtype]

    @property
    def d_out(self) -> int:  # transcoders override this with a field
        """Width of the reconstruction (d_in for autoencoders)."""
        return self.d_in

    def to_dict(self) -> dict[str, Any]:
        """The cfg.json dict, as SAELens writes it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["metadata"] = self.metadata.to_dict()
        out["architecture"] = self.architecture
        return out

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def dataclass_from_dict(cls: type, data: Mapping[str, Any], *, where: str) -> Any:
    """Build dataclass `cls` from `data`; an unknown key is an error naming it and the closest field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of field names to values, got {type(data).__name__}.")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key {key!r} for {cls.__name__}." + close_names(str(key), names)
                + f" Known keys: {sorted(names)}."
            )
    kwargs = dict(data)
    if "metadata" in kwargs and not isinstance(kwargs["metadata"], Metadata):
        kwargs["metadata"] = Metadata(kwargs["metadata"] or {})
    if "dtype" in kwargs:
        kwargs["dtype"] = canonical_dtype(kwargs["dtype"], field=f"{where}.dtype")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err
