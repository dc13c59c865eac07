"""Exceptions raised by jsae: each message names the file or field, what was expected and what was found."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class JsaeError(Exception):
    """Base class of every error jsae raises on purpose."""


class ConfigError(JsaeError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class FormatError(JsaeError, ValueError):
    """A file on disk does not hold what its format promises."""


class MissingFileError(JsaeError, FileNotFoundError):
    """A file jsae needs is not there."""


class InputError(JsaeError, ValueError):
    """An array handed to an SAE has the wrong shape or holds non-finite values."""


def close_names(name: str, known: Iterable[str], n: int = 3) -> str:
    """A sentence fragment suggesting the known names closest to `name` (empty if none is close)."""
    matches = difflib.get_close_matches(str(name), [str(k) for k in known], n=n, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"
