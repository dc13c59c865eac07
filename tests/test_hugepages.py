"""`jsae` runs itself under glibc's huge-page malloc tunable where that helps, and only there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cli import HUGEPAGE_TUNABLE, hugepage_environment, jsae_environment

ROOT = Path(__file__).resolve().parents[1]
GLIBC = (2, 36)


def test_sets_the_tunable_on_a_recent_glibc_with_huge_pages():
    for mode in ("madvise", "always"):
        assert hugepage_environment({"PATH": "/bin"}, GLIBC, mode) == {"PATH": "/bin", "GLIBC_TUNABLES": HUGEPAGE_TUNABLE}


def test_keeps_other_tunables():
    env = hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise")
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGEPAGE_TUNABLE}"


@pytest.mark.parametrize("environ, glibc, mode", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"),  # the user's own choice stands
    ({"JSAE_HUGEPAGES": "0"}, GLIBC, "madvise"),  # opted out
    ({}, (2, 34), "madvise"),  # glibc without the tunable
    ({}, None, "madvise"),  # not glibc
    ({}, GLIBC, "never"),  # the kernel gives no huge pages
    ({}, GLIBC, None),
])
def test_leaves_the_environment_alone(environ, glibc, mode):
    assert hugepage_environment(environ, glibc, mode) is None


@pytest.mark.skipif(jsae_environment({}) is None,
                    reason="no glibc >= 2.35 with transparent huge pages here")
def test_the_command_line_reruns_itself_under_the_tunable():
    # A real command line (main() without argv) replaces its process once, then runs the command.
    code = ("import os, sys; print('tunables', os.environ.get('GLIBC_TUNABLES'), flush=True); "
            "sys.argv = ['jsae', 'eval', 'no-such-folder']; from bridge.cli import main; sys.exit(main())")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JSAE_HUGEPAGES")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("tunables")]
    assert lines == ["tunables None", f"tunables {HUGEPAGE_TUNABLE}"]
    assert "no-such-folder" in proc.stderr and proc.returncode == 2  # then ran the command
