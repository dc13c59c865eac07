"""Text every machine has: the CPython standard library sources and pydoc's topic help.

This is the embedded default's corpus: the tokenizer and language model shipped with jsae were
trained on its training split, and the default SAE run reads its activations on it.
"""

from __future__ import annotations

import random
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
HELD_OUT_PERCENT = 5
SPLITS = ("train", "heldout", "all")


def is_held_out(name: str) -> bool:
    """A stable 5% of documents (by name) never seen in training."""
    return zlib.crc32(name.encode()) % 100 < HELD_OUT_PERCENT


def _sources(split: str, seed: int | None) -> list[tuple[str, Path | str]]:
    """(name, file or pydoc topic) of the split's documents, in the order they are read."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, Path | str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        docs.append(("stdlib/" + rel.as_posix(), path))
    from pydoc_data.topics import topics

    docs += [(f"pydoc/{k}", k) for k in sorted(topics)]
    docs = [(name, source) for name, source in docs if split == "all" or is_held_out(name) == (split == "heldout")]
    if seed is not None and split == "train":
        # Sorted order groups alike files (every encodings/ table in a row), so the data would change
        # character as training moves through it. The held-out split keeps its order whatever the seed,
        # so evals of runs with different seeds read the same rows.
        random.Random(seed).shuffle(docs)
    return docs


def document_names(split: str = "train", *, seed: int | None = None) -> list[str]:
    """The names of `stdlib_documents(split, seed=seed)`, in its order, without reading any file
    (a file that cannot be read or holds only whitespace is listed here but skipped there)."""
    return [name for name, _ in _sources(split, seed)]


def stdlib_documents(split: str = "train", *, seed: int | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of every standard-library .py file and pydoc topic.

    Args:
        split: "train", "heldout" or "all".
        seed: shuffles the training documents' order (the same seed, the same order); None, and the
            "heldout" and "all" splits whatever the seed, keep the sorted order: files, then topics.
    """
    from pydoc_data.topics import topics

    for name, source in _sources(split, seed):
        if isinstance(source, Path):
            try:
                text = source.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
        else:
            text = topics[source]
        if text.strip():
            yield name, text
