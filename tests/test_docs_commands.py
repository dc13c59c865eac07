"""The README and docs/ stay true: their `jsae` commands parse and plan, their Python compiles, their links resolve."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def fenced(page: Path, language: str) -> list[tuple[int, str]]:
    """(line number of the first line, text) of every fenced block of `language` on `page`."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def jsae_commands() -> list[tuple[str, list[str]]]:
    """(page:line, argv without the leading "jsae") of every `jsae ...` line in a bash block."""
    commands = []
    for page in PAGES:
        for first, block in fenced(page, "bash"):
            for offset, line in enumerate(block.splitlines()):
                if line.startswith("jsae "):
                    words = shlex.split(line, comments=True)
                    commands.append((f"{page.relative_to(ROOT)}:{first + offset}", words[1:]))
    return commands


def python_blocks() -> list[tuple[str, str]]:
    return [(f"{page.relative_to(ROOT)}:{first}", block) for page in PAGES for first, block in fenced(page, "python")]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


COMMANDS = jsae_commands()


def test_the_pages_have_commands_and_code():
    assert len(COMMANDS) >= 10
    assert len(python_blocks()) >= 8
    assert {Path(where.split(":")[0]).name for where, _ in COMMANDS} >= {"README.md", "training.md", "evals.md"}


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; details belong in docs/"


@pytest.mark.parametrize("where,source", python_blocks(), ids=[where for where, _ in python_blocks()])
def test_python_blocks_compile(where, source):
    compile(source, where, "exec")


def test_relative_links_point_at_files():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                anchors = {slug(m) for m in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                if anchor not in anchors:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def make_sae_folder(path: Path) -> None:
    import jsae

    cfg = jsae.TopKSAEConfig(d_in=128, d_sae=1024, k=32, metadata=jsae.Metadata(hook_name="blocks.2.hook_resid_pre"))
    jsae.SAE.from_config(cfg, seed=0).save_model(path)


@pytest.mark.slow
@pytest.mark.parametrize("where,argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_jsae_commands_dry_run(where, argv, tmp_path, monkeypatch):
    from bridge.cli import main

    # relative paths in the commands (configs/, runs/, cache/, out/) resolve inside tmp_path
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    if argv[0] in ("eval", "inspect"):
        make_sae_folder(tmp_path / argv[1])
    try:
        code = main([*argv, "--dry-run"])
    except SystemExit as exit:
        pytest.fail(f"{where}: `jsae {shlex.join(argv)} --dry-run` exited with {exit.code}")
    assert code in (0, None), f"{where}: `jsae {shlex.join(argv)} --dry-run` returned {code}"
