"""Package-level promises: torch-free import, the demo command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import jsae


def test_import_jsae_does_not_import_torch():
    code = "import sys, jsae, jsae.io, jsae.pretrained; print('torch' in sys.modules, 'sae_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_public_api_exports():
    for name in jsae.__all__:
        assert hasattr(jsae, name), name
    assert set(jsae.ARCHITECTURES) >= {
        "standard",
        "gated",
        "jumprelu",
        "topk",
        "transcoder",
        "skip_transcoder",
        "jumprelu_transcoder",
    }


def test_demo_command_round_trips(tmp_path, capsys):
    from bridge.cli import main

    assert main(["demo", "--output-path", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "tensors bit-identical True" in out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    again = jsae.SAE.load_from_disk(tmp_path / "demo")
    assert again.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in ci and ci in readme


def test_the_cpu_kernels_build_wherever_a_compiler_is_found():
    # tests/test_kernels.py skips where the kernels cannot be built; a C++ compiler on the path
    # means they must build (a compile error in jsae/backends/cpu/cpu_kernels.cc fails here).
    from jsae.backends.cpu import kernels

    if kernels._compiler() is None or os.environ.get("JSAE_CPU_KERNELS") == "0":
        pytest.skip("no C++ compiler here (or JSAE_CPU_KERNELS=0)")
    kernels.build(kernels._compiler())  # raises with the compiler's errors
    assert kernels.available()
    # scipy-openblas32 is a dependency (and mkl a test dependency): tests/test_dense_kernels.py
    # must not skip for a BLAS that failed to load
    if os.environ.get("JSAE_DENSE_KERNELS") != "0":
        assert kernels.dense_available()
        choice = os.environ.get("JSAE_BLAS") or ("mkl" if kernels.cpu_vendor() == "GenuineIntel" else "openblas")
        assert ("libmkl_rt" if choice == "mkl" else "scipy_openblas") in kernels.blas_library()
