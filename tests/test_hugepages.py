"""Huge pages are the user's opt-in: `jsae` never reruns itself under another environment; `jsae train`
prints how to turn them on where they would take effect and are off."""

from __future__ import annotations

import os
import sys

import pytest

import jsae
from jsae.backends import hugepages
from jsae.backends.hugepages import HUGEPAGE_TUNABLE, hugepage_environment, hugepage_hint

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


@pytest.fixture
def huge_pages_available(monkeypatch):
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: GLIBC)
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "madvise")


def test_the_hint_is_the_export_line_to_type(huge_pages_available):
    hint = hugepage_hint({"PATH": "/bin"})
    assert f"export GLIBC_TUNABLES={HUGEPAGE_TUNABLE}" in hint and "\n" not in hint
    assert f"export GLIBC_TUNABLES=glibc.malloc.arena_max=2:{HUGEPAGE_TUNABLE}" in hugepage_hint(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})


@pytest.mark.parametrize("environ", [{"GLIBC_TUNABLES": HUGEPAGE_TUNABLE}, {"JSAE_HUGEPAGES": "0"}])
def test_no_hint_when_on_or_silenced(huge_pages_available, environ):
    assert hugepage_hint(environ) is None


def test_no_hint_where_glibc_cannot(monkeypatch):
    monkeypatch.setattr(hugepages, "_glibc_version", lambda: (2, 31))
    monkeypatch.setattr(hugepages, "_thp_mode", lambda: "always")
    assert hugepage_hint({}) is None


def test_train_prints_the_hint_on_stderr_only_when_it_applies(huge_pages_available, monkeypatch, capsys):
    from bridge.cli import _hugepage_hint

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("JSAE_HUGEPAGES", raising=False)
    _hugepage_hint()  # the tests run JAX on CPU, where the hint applies
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert f"export GLIBC_TUNABLES={HUGEPAGE_TUNABLE}" in captured.err
    monkeypatch.setenv("GLIBC_TUNABLES", HUGEPAGE_TUNABLE)
    _hugepage_hint()
    assert capsys.readouterr().err == ""


def test_the_command_line_never_reruns_itself(monkeypatch, tmp_path, capsys):
    # a real command line (main() without argv) runs in the environment it was started in
    def no_exec(*args, **kwargs):
        raise AssertionError(f"the command line re-executed itself: {args}")

    for name in ("execv", "execve", "execvp", "execvpe", "execl", "execle"):
        monkeypatch.setattr(os, name, no_exec)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(jsae, "enable_compilation_cache", lambda: None)  # keep this test process's JAX as it is
    monkeypatch.setattr(sys, "argv", ["jsae", "eval", str(tmp_path / "no-such-folder")])
    from bridge.cli import main

    assert main() == 2  # ran the command, which reports the missing folder
    assert "no-such-folder" in capsys.readouterr().err
    assert "GLIBC_TUNABLES" not in os.environ
