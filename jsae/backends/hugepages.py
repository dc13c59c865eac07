"""Huge pages for glibc's malloc: an opt-in the user's environment sets, never set behind their back.

XLA:CPU allocates each step's temporaries afresh; with 4 KiB pages the kernel zero-fills them
one page fault at a time. The glibc tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) madvises
those blocks into 2 MiB transparent huge pages. glibc reads it once, at process start, so it
must be in the environment the interpreter starts in:

    export GLIBC_TUNABLES=glibc.malloc.hugetlb=1

`jsae train` prints that line as a hint where the tunable would take effect and is not set
(JSAE_HUGEPAGES=0 silences the hint).
"""

from __future__ import annotations

import os
from pathlib import Path

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None if unknown."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def hugepage_environment(environ: dict[str, str], glibc: tuple[int, int] | None,
                         thp_mode: str | None) -> dict[str, str] | None:
    """`environ` with the huge-page tunable added; None where it would change nothing or is not wanted.

    None when the tunable (any value) is already in GLIBC_TUNABLES (the user's choice stands), when
    JSAE_HUGEPAGES is "0", when glibc is older than 2.35 or absent, or when the kernel gives no
    transparent huge pages. Other tunables are kept.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get("JSAE_HUGEPAGES", "1") == "0" or "glibc.malloc.hugetlb" in tunables or glibc is None
            or glibc < (2, 35) or thp_mode not in ("always", "madvise")):
        return None
    return dict(environ) | {"GLIBC_TUNABLES": f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE}


def jsae_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """`hugepage_environment` of `environ` on this machine (None: nothing to add here)."""
    return hugepage_environment(environ, _glibc_version(), _thp_mode())


def hugepage_hint(environ: dict[str, str], platform: str = "cpu") -> str | None:
    """The line telling the user how to turn huge pages on, where they would take effect (JAX on
    `platform` "cpu", this glibc and kernel) and are off."""
    env = jsae_environment(environ)
    if env is None or platform != "cpu":
        return None
    return (f"hint: huge pages for glibc's malloc may speed up XLA on CPU (most for wide SAEs): "
            f"export GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (JSAE_HUGEPAGES=0 hides this line)")
