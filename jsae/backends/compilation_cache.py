"""Compiled programs kept on disk between processes: JAX's persistent compilation cache, in jsae's cache folder.

A `jsae train` of the default run compiles for ~3 s before its first step on 2 CPU cores (the
training step ~2.4 s, the state's initialisation and the evaluations the rest), while the first
buffer of activations fills; with the cache, a later run of the same shapes loads them instead.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path

import jax

# Programs that compile faster than this are not written: eager operations' programs are many and
# cheap to rebuild; a training step's or an evaluation's are few and slow.
MIN_COMPILE_SECONDS = 0.1
MAX_SIZE_BYTES = 1 << 30  # least recently used entries are dropped beyond this


def default_cache_path() -> Path:
    """`<jsae cache folder>/xla/<key>`: one folder per jaxlib version, machine type and CPU feature set.

    The CPU's features are part of the folder's name because XLA:CPU compiles for the host it runs
    on: a home folder shared by machines of different CPUs keeps their programs apart.
    """
    import jaxlib

    from jsae.backends.cpu.kernels import _cpu_fingerprint, cache_dir

    key = "\0".join([jaxlib.__version__, platform.machine(), _cpu_fingerprint()])
    return cache_dir() / "xla" / hashlib.sha256(key.encode()).hexdigest()[:16]


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Keep this process's compiled programs on disk and load them in later processes (JAX's
    persistent compilation cache); call before anything is compiled.

    Args:
        path: the cache folder (default `default_cache_path()`: under `$JSAE_CACHE_DIR`, else
            `~/.cache/jsae`).

    Returns:
        The folder in use; None where the cache stays as the user set it: JAX's own cache folder
        already configured (`JAX_COMPILATION_CACHE_DIR` or `jax.config`), JSAE_COMPILATION_CACHE=0,
        or JAX's cache switched off (`jax_enable_compilation_cache`); also None, after a warning,
        where the folder cannot be created or written.

    Entries are written for programs that took at least `MIN_COMPILE_SECONDS` to compile, and the
    least recently used are dropped beyond `MAX_SIZE_BYTES`; processes share the folder safely. A
    program loaded from the cache is the one compiled before: its results are the same bit for bit.
    """
    if (os.environ.get("JSAE_COMPILATION_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir
            or not jax.config.jax_enable_compilation_cache):
        return None
    folder = Path(path) if path is not None else default_cache_path()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError as error:
        warnings.warn(f"jsae: compiled programs are not kept on disk ({error}); JSAE_COMPILATION_CACHE=0 silences "
                      "this.", RuntimeWarning, stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)  # evicts under a `filelock` lock
    return folder
