"""Building jsae's CPU kernels and choosing the BLAS their dense steps call.

`cpu_kernels.cc` and `dense_kernels.cc` beside this file are C++ against the XLA FFI headers
jaxlib ships, compiled once per machine with the system's C++ compiler (`$CXX`, else `c++`) into
a cache folder (`$JSAE_CACHE_DIR`, else `$XDG_CACHE_HOME/jsae`, else `~/.cache/jsae`) and loaded
from there afterwards (`jsae.backends.cpu.kernels` loads and registers them).

The dense kernels' BLAS is MKL on Intel CPUs where installed, else OpenBLAS from
scipy-openblas32 (`_blas_library`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# Every file the library is built from (the cache key covers them all).
SOURCES = (SOURCE, SOURCE.with_name("dense_kernels.cc"))
HEADERS = (SOURCE.with_name("parallel.h"),)
TOP_K_TARGET = "jsae_top_k_f32"
# XLA FFI target name -> the symbol cpu_kernels.cc defines for it
TARGETS = {
    TOP_K_TARGET: "JsaeTopKF32",
    "jsae_top_k_affine_f32": "JsaeTopKAffineF32",
    "jsae_gather_rows_dot_f32": "JsaeGatherRowsDotF32",
    "jsae_gather_rows_weighted_f32": "JsaeGatherRowsWeightedF32",
    "jsae_scatter_rows_f32": "JsaeScatterRowsF32",
    "jsae_encoder_top_k_f32": "JsaeEncoderTopKF32",
    "jsae_dense_encode_f32": "JsaeDenseEncodeF32",
    "jsae_dense_backward_f32": "JsaeDenseBackwardF32",
    "jsae_adam_f32": "JsaeAdamF32",
    "jsae_matmul_f32": "JsaeMatmulF32",
}

logger = logging.getLogger(__name__)


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
    base = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
            *map(str, SOURCES), "-ldl", "-o", str(output)]
    return [base[:2] + ["-march=native"] + base[2:], base]  # plain flags if the compiler lacks -march=native


def library_path(compiler: str) -> Path:
    """The cached shared library for this source, jaxlib, compiler and CPU."""
    import jaxlib

    texts = [f.read_text() for f in (*SOURCES, *HEADERS)]
    key = "\0".join([*texts, jaxlib.__version__, compiler, platform.machine(), _cpu_fingerprint()])
    return cache_dir() / "kernels" / f"cpu_kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(compiler: str) -> Path:
    """Compile cpu_kernels.cc into the cache (if it is not there yet) and return the library's path.

    Written to a temporary file and renamed into place, so processes building at once (several
    hosts on one machine) each see either no library or a whole one.
    """
    path = library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("jsae: compiling the CPU kernels (once per machine) into %s", path)
    errors = []
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        output = Path(tmp) / path.name
        for command in _compile_commands(compiler, output):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(output, path)
                return path
            errors.append(f"$ {' '.join(command)}\n{result.stderr.strip()[-2000:]}")
    raise RuntimeError("could not compile jsae's CPU kernels:\n" + "\n".join(errors))


BLAS_LIBRARIES = ("mkl", "openblas")


def cpu_vendor() -> str:
    """The CPU's vendor string ('GenuineIntel', 'AuthenticAMD', ...) from /proc/cpuinfo, '' where unknown."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _blas_library() -> tuple[str, str, str]:
    """(path, sgemm symbol, single-thread setter) of the BLAS the dense kernels call.

    $JSAE_BLAS picks one of BLAS_LIBRARIES; unset: Intel MKL on an Intel CPU where the `mkl`
    package is installed (`pip install "jsae[mkl]"`), else OpenBLAS from the scipy-openblas32
    package (the build NumPy and SciPy ship). MKL is taken on Intel only: it measured faster than
    OpenBLAS on an Intel Xeon and slower on an AMD EPYC (bench/RESULTS.md). Either is a
    library of its own in this process, made single-threaded: the kernels share work over XLA's
    threads.
    """
    choice = os.environ.get("JSAE_BLAS", "")
    if choice not in ("", *BLAS_LIBRARIES):
        raise OSError(f"JSAE_BLAS must be one of {list(BLAS_LIBRARIES)}, got {choice!r}")
    if choice == "mkl" or (choice == "" and cpu_vendor() == "GenuineIntel"):
        found = sorted(Path(sys.prefix, "lib").glob("libmkl_rt.so*"))
        if found:  # MKL_Set_Threading_Layer(MKL_THREADING_SEQUENTIAL = 1): no OpenMP threads
            return str(found[-1]), "cblas_sgemm", "MKL_Set_Threading_Layer"
        if choice == "mkl":
            raise OSError(f"JSAE_BLAS=mkl, but no libmkl_rt in {Path(sys.prefix, 'lib')} (pip install mkl)")
    import scipy_openblas32

    path = Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True)
    return str(path), "scipy_cblas_sgemm", "scipy_openblas_set_num_threads"
