"""`jsae train` tells glibc to keep freed memory, so a run's repeated buffers stop page-faulting;
JSAE_MALLOC=system keeps glibc's defaults (jsae.backends.malloc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jsae.backends.hugepages import _glibc_version

pytestmark = pytest.mark.skipif(_glibc_version() is None, reason="glibc's mallopt")

# One "batch": buffers of 1-8 MiB allocated and freed together, as a forward's activations are.
# Under glibc's defaults the heap's top is trimmed after each batch and the next one faults its
# pages in again; with the thresholds set, the pages stay mapped.
BATCHES = """
import resource, sys
import numpy as np
from jsae.backends.malloc import retain_freed_memory

applied = retain_freed_memory()
def batch():
    buffers = [np.ones(n << 18, np.float32) for n in (1, 2, 3, 4, 8)]
    del buffers
for _ in range(3):
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_batch(**env: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", BATCHES], env=os.environ | env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], float(out[1])


def test_freed_memory_is_reused_without_page_faults():
    applied, faults = faults_per_batch(JSAE_MALLOC="retain")
    assert applied == "True"
    assert faults < 50  # 18 MiB a batch: 4,608 pages


def test_system_keeps_glibcs_defaults():
    applied, faults = faults_per_batch(JSAE_MALLOC="system")
    assert applied == "False"
    assert faults > 1000  # the pages of the trimmed heap fault in again each batch


def test_the_command_line_applies_it(monkeypatch, tmp_path, capsys):
    """At a real command line (not a dry run) `jsae` sets the thresholds before the command runs."""
    from bridge import cli
    from jsae.backends import malloc

    calls = []
    monkeypatch.setattr(malloc, "retain_freed_memory", lambda: calls.append("malloc") or True)
    monkeypatch.setattr("jsae.enable_compilation_cache", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", ["jsae", "plan", "--set", "n_devices=1"])
    assert cli.main() == 0
    assert calls == ["malloc"]
    monkeypatch.setattr(sys, "argv", ["jsae", "train", "--dry-run"])
    calls.clear()
    cli.main()
    assert calls == []  # a dry run changes nothing in the process
