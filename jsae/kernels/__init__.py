"""jsae's CPU kernel: a row-wise top-k for XLA:CPU, built on first use.

XLA:CPU's top-k runs a partial sort over each row on one thread (30 ms for 4096 rows of 1024
latents with k = 32 on the 2-core machine of bench/RESULTS.md); TopK SAEs take one every step.
`top_k.cc` beside this file selects the same indices in the same order from the few entries that
can be among the top k, on XLA's intra-op threads (6 ms for the same top-k).

It is C++ against the XLA FFI headers jaxlib ships, compiled once per machine with the system's
C++ compiler (`$CXX`, else `c++`) into a cache folder (`$JSAE_CACHE_DIR`, else
`$XDG_CACHE_HOME/jsae`, else `~/.cache/jsae`) and loaded from there afterwards. Where it cannot be
built (no compiler, not x86/ARM Linux or macOS) jsae warns once and uses `jax.lax.top_k`: the
results are identical either way. `JSAE_CPU_KERNELS=0` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("top_k.cc")
TOP_K_TARGET = "jsae_top_k_indices_f32"
TOP_K_SYMBOL = "JsaeTopKIndicesF32"

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet in this process


def cache_dir() -> Path:
    """Where built kernels are kept: $JSAE_CACHE_DIR, else $XDG_CACHE_HOME/jsae, else ~/.cache/jsae."""
    if os.environ.get("JSAE_CACHE_DIR"):
        return Path(os.environ["JSAE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jsae"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_fingerprint() -> str:
    """The CPU's instruction-set features: a kernel built with -march=native is reused only on a CPU like this one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile_commands(compiler: str, output: Path) -> list[list[str]]:
    base = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", str(SOURCE),
            "-o", str(output)]
    return [base[:2] + ["-march=native"] + base[2:], base]  # plain flags if the compiler lacks -march=native


def library_path(compiler: str) -> Path:
    """The cached shared library for this source, jaxlib, compiler and CPU."""
    import jaxlib

    key = "\0".join([SOURCE.read_text(), jaxlib.__version__, compiler, platform.machine(), _cpu_fingerprint()])
    return cache_dir() / "kernels" / f"top_k-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(compiler: str) -> Path:
    """Compile top_k.cc into the cache (if it is not there yet) and return the library's path.

    Written to a temporary file and renamed into place, so processes building at once (several
    hosts on one machine) each see either no library or a whole one.
    """
    path = library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("jsae: compiling the CPU top-k kernel (once per machine) into %s", path)
    errors = []
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        output = Path(tmp) / path.name
        for command in _compile_commands(compiler, output):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(output, path)
                return path
            errors.append(f"$ {' '.join(command)}\n{result.stderr.strip()[-2000:]}")
    raise RuntimeError("could not compile jsae's CPU top-k kernel:\n" + "\n".join(errors))


def available() -> bool:
    """Whether the CPU top-k kernel is registered with XLA in this process (building it on first call).

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
    if os.environ.get("JSAE_CPU_KERNELS", "1") == "0":
        return False
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
        library = ctypes.cdll.LoadLibrary(str(build(compiler)))
        jax.ffi.register_ffi_target(TOP_K_TARGET, jax.ffi.pycapsule(getattr(library, TOP_K_SYMBOL)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as error:
        warnings.warn(f"jsae: using jax.lax.top_k on CPU ({error}). Results are the same, TopK training is slower; "
                      "JSAE_CPU_KERNELS=0 silences this.", RuntimeWarning, stacklevel=3)
        return False
    return True


def top_k_indices(x: jax.Array, k: int) -> jax.Array:
    """The indices `jax.lax.top_k(x, k)` returns, from the kernel: float32 x, any leading axes.

    For computations that run on CPU; builds and registers the kernel on first use, and raises
    RuntimeError where `available()` is false. Carries no gradient (take the values with
    `jnp.take_along_axis(x, indices, -1)`).
    """
    if not available():
        raise RuntimeError("jsae's CPU top-k kernel is not available here (see the warning above, or "
                           "JSAE_CPU_KERNELS=0 is set); use jax.lax.top_k")
    if x.dtype != jnp.float32:
        raise TypeError(f"the CPU top-k kernel takes float32, got {x.dtype}")
    if not 0 <= k <= x.shape[-1]:
        raise ValueError(f"top_k needs 0 <= k <= {x.shape[-1]} (the last axis), got k={k}")
    out = jax.ShapeDtypeStruct((*x.shape[:-1], k), jnp.int32)
    return jax.ffi.ffi_call(TOP_K_TARGET, out, vmap_method="broadcast_all")(jax.lax.stop_gradient(x))
