"""Text every machine has: the CPython standard library sources and pydoc's topic help.

This is the embedded default's corpus: the tokenizer and language model shipped with jsae were
trained on its training split, and the default SAE run reads its activations on it.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
HELD_OUT_PERCENT = 5


def is_held_out(name: str) -> bool:
    """A stable 5% of documents (by name) never seen in training."""
    return zlib.crc32(name.encode()) % 100 < HELD_OUT_PERCENT


def stdlib_documents(split: str = "train") -> Iterator[tuple[str, str]]:
    """(name, text) of every standard-library .py file and pydoc topic, in a fixed order.

    Args:
        split: "train", "heldout" or "all".
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    names = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        names.append(("stdlib/" + rel.as_posix(), path))
    from pydoc_data.topics import topics

    docs = [(name, path) for name, path in names] + [(f"pydoc/{k}", k) for k in sorted(topics)]
    for name, source in docs:
        if split != "all" and is_held_out(name) != (split == "heldout"):
            continue
        if isinstance(source, Path):
            try:
                text = source.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
        else:
            text = topics[source]
        if text.strip():
            yield name, text
