"""Populate the (test-private) Hugging Face cache the way hf_hub_download leaves it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def populate_hub_cache(repo_id: str, files: dict[str, Path | bytes], revision: str = "main") -> Path:
    """Put `files` (path in repo -> local file or bytes) into the cache as one snapshot; return it."""
    from huggingface_hub import constants

    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    for rel, source in files.items():
        target = snapshot / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snapshot
