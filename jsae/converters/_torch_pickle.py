"""Reading `torch.save` checkpoints (`.pt`, `.pth`) of tensors without importing torch.

Some releases store their weights as torch checkpoints: a zip archive (torch >= 1.6) holding
`<name>/data.pkl`, a pickle whose tensors point at raw little-endian storages
`<name>/data/<key>`. The pickle is read with a restricted unpickler that builds numpy arrays and
accepts only the classes a state dict of tensors needs; anything else is a FormatError, so no
code from the file ever runs.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jsae._errors import FormatError, MissingFileError

#: torch storage class -> numpy dtype (torch/storage.py's typed storages).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[storage_offset : storage_offset + 1].reshape(()).copy()
    extent = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True) if n > 0)
    if any(n == 0 for n in size):
        return np.zeros(size, storage.dtype)
    if extent > storage.size:
        raise FormatError(f"a tensor of size {size} and stride {stride} reaches past its storage ({storage.size}).")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self._archive, self._prefix, self._source = archive, prefix, source
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise FormatError(
            f"{self._source}: the checkpoint pickles {module}.{name}; jsae reads checkpoints that hold "
            "tensors in dicts, lists and tuples only."
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise FormatError(f"{self._source}: unexpected persistent id {pid!r} in the checkpoint.")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise FormatError(f"{self._source}: storage of unsupported type {storage_type!r}.")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise FormatError(f"{self._source}: storage {key!r} is missing from the archive.") from None
            self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))
        return self._storages[key]


def load_torch_checkpoint(path: str | Path) -> Any:
    """The object a `torch.save` zip checkpoint holds, with every tensor a numpy array (native order)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise MissingFileError(f"{source}: file not found.")
    if not zipfile.is_zipfile(path):
        raise FormatError(
            f"{source}: not a zip-format torch checkpoint (torch.save since torch 1.6); jsae cannot read the "
            "legacy format. Re-save it with a current torch."
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if len(pickles) != 1:
            raise FormatError(f"{source}: expected one data.pkl in the checkpoint, found {pickles}.")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in archive.namelist() else "little"
        if byteorder != "little":
            raise FormatError(f"{source}: a {byteorder}-endian checkpoint; jsae reads little-endian ones.")
        with archive.open(pickles[0]) as f:
            try:
                return _Unpickler(f, archive, prefix, source).load()
            except FormatError:
                raise
            except Exception as err:
                raise FormatError(f"{source}: not a readable torch checkpoint ({type(err).__name__}: {err}).") from err


def tensor_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A checkpoint holding a flat {name: tensor} dict (a state dict), as numpy arrays."""
    obj = load_torch_checkpoint(path)
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "a dict holding non-tensors"
        raise FormatError(f"{path}: expected a state dict of tensors, found {kind}.")
    return {str(k): v for k, v in obj.items()}
