"""SAELens' table of released SAEs: jsae's snapshot of it, the installed sae_lens' copy, and search.

jsae ships SAELens' `pretrained_saes.yaml` as `saelens_registry.json.gz` (the same data, as
gzip'd JSON: {"sae_lens_version": ..., "releases": {release: entry}}; regenerate it with
scripts/snapshot_saelens_registry.py). Every release resolves from it without sae_lens. When
an installed sae_lens is newer than the snapshot, its own registry (read without importing
sae_lens or torch) is preferred and the snapshot fills in releases it lacks; otherwise the
snapshot is preferred. Names are SAELens' names: release, sae_id, repo_id, conversion_func,
neuronpedia.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.metadata
import importlib.util
import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

SNAPSHOT_PATH = Path(__file__).with_name("saelens_registry.json.gz")
#: Names users write for registry releases (the SAELens README's `gemma-2b-res`).
RELEASE_ALIASES = {"gemma-2b-res": "gemma-2b-res-jb"}


@dataclasses.dataclass(frozen=True)
class Release:
    """One registry release (a `pretrained_saes.yaml` entry)."""

    name: str
    repo_id: str
    model: str | None
    conversion_func: str | None
    saes: dict[str, dict[str, Any]]  # sae id -> {id, path, l0, neuronpedia, norm_scaling_factor, ...}
    config_overrides: dict[str, Any]
    links: dict[str, Any] = dataclasses.field(default_factory=dict)

    def path(self, sae_id: str) -> str:
        """The SAE's path in the repository (SAELens' folder_name; integer paths read as strings)."""
        return str(self.saes[sae_id]["path"])


def releases_from_data(data: Mapping[str, Any]) -> dict[str, Release]:
    """Releases from the parsed registry (release name -> YAML entry), as SAELens reads them."""
    return {
        name: Release(
            name=name,
            repo_id=entry["repo_id"],
            model=entry.get("model"),
            conversion_func=entry.get("conversion_func"),
            saes={str(s["id"]): s for s in entry.get("saes", [])},
            config_overrides=dict(entry.get("config_overrides") or {}),
            links=dict(entry.get("links") or {}),
        )
        for name, entry in data.items()
    }


def read_saelens_yaml(path: Path) -> dict[str, Any]:
    """sae_lens' pretrained_saes.yaml, parsed as SAELens parses it (C loader when PyYAML has it)."""
    import yaml

    with open(path) as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def read_snapshot(path: Path = SNAPSHOT_PATH) -> tuple[str, dict[str, Any]]:
    """(sae_lens version, registry data) of a snapshot file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        snap = json.load(f)
    return snap["sae_lens_version"], snap["releases"]


def write_snapshot(path: Path, version: str, data: Mapping[str, Any]) -> None:
    """Write a snapshot byte-for-byte reproducibly (no timestamp in the gzip header)."""
    text = json.dumps({"sae_lens_version": version, "releases": data}, separators=(",", ":"), ensure_ascii=False)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(text.encode("utf-8"))


@functools.cache
def snapshot_registry() -> dict[str, Release]:
    return releases_from_data(read_snapshot()[1])


@functools.cache
def snapshot_version() -> str:
    return read_snapshot()[0]


def saelens_registry_path() -> Path | None:
    """sae_lens' pretrained_saes.yaml, located without importing sae_lens."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"
    return path if path.is_file() else None


def saelens_version() -> str | None:
    """The installed sae-lens distribution's version, or None."""
    try:
        return importlib.metadata.version("sae-lens")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def saelens_registry() -> dict[str, Release]:
    """The installed sae_lens' registry, or {} when sae_lens (or its YAML) is absent or unreadable."""
    path = saelens_registry_path()
    if path is None:
        return {}
    import yaml

    try:
        return releases_from_data(read_saelens_yaml(path))
    except (OSError, yaml.YAMLError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _newer(version: str | None, than: str) -> bool:
    try:
        return version is not None and Version(version) > Version(than)
    except InvalidVersion:
        return False


def registries() -> tuple[dict[str, Release], dict[str, Release]]:
    """(preferred, fallback): the installed sae_lens' registry first only when it is newer than the snapshot.

    The same sae_lens version as the snapshot's has the same registry, so it is not read again.
    """
    version = saelens_version()
    if _newer(version, snapshot_version()):
        return saelens_registry(), snapshot_registry()
    if version == snapshot_version():
        return snapshot_registry(), {}
    return snapshot_registry(), saelens_registry()


def get_release(name: str) -> Release | None:
    name = RELEASE_ALIASES.get(name, name)
    preferred, fallback = registries()
    return preferred.get(name) or fallback.get(name)


def all_releases() -> dict[str, Release]:
    """Every known release, the preferred registry's entry where both have one."""
    preferred, fallback = registries()
    return {**fallback, **preferred}


def known_releases() -> list[str]:
    return sorted(set(all_releases()) | set(RELEASE_ALIASES))


# --------------------------------------------------------------------------- search
_WIDTH_RE = re.compile(r"(?<![a-z0-9])(?:width_)?(\d+)([km])?(?![0-9])", re.IGNORECASE)


def parse_width(text: str) -> int:
    """'16k' -> 16384, '1m' -> 1048576, '24576' -> 24576 (SAELens ids write widths these ways)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM])?\s*", str(text))
    if match is None:
        from jsae._errors import ConfigError

        raise ConfigError(f"--width: expected a number such as 16384, 16k or 1m, got {text!r}.")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[(match.group(2) or "").lower()]


def widths_in(text: str) -> set[int]:
    """The widths an id or path names ('width_16k', '65k', '24576', '1m'); small numbers are layers."""
    out = set()
    for number, unit in _WIDTH_RE.findall(text):
        value = int(number) * {"": 1, "k": 1024, "m": 1024**2}[unit.lower()]
        if unit or value >= 256:
            out.add(value)
    return out


def search(
    text: str | None = None,
    *,
    model: str | None = None,
    hook: str | None = None,
    width: str | int | None = None,
    releases: Iterable[Release] | None = None,
) -> list[dict[str, Any]]:
    """Registry rows (one per SAE id) matching every filter given; case-insensitive substrings.

    `text` matches the release, repo_id, model, sae_id, path or neuronpedia id (a release's exact
    name selects that release alone); `model` the
    release's model; `hook` the sae_id or path; `width` a width named in the sae_id or path.
    """
    from jsae.converters import CONVERTERS

    want_width = None if width is None else parse_width(str(width))
    known = all_releases()
    exact = RELEASE_ALIASES.get(text, text) if text is not None else None
    if releases is None and exact in known:  # a release's exact name lists that release alone
        releases, text = [known[exact]], None
    low = [None if v is None else v.lower() for v in (text, model, hook)]
    rows = []
    for rel in releases if releases is not None else known.values():
        if low[1] is not None and low[1] not in str(rel.model).lower():
            continue
        for sae_id, info in rel.saes.items():
            path = str(info["path"])
            haystack = " ".join(map(str, (rel.name, rel.repo_id, rel.model, sae_id, path, info.get("neuronpedia"))))
            if low[0] is not None and low[0] not in haystack.lower():
                continue
            if low[2] is not None and low[2] not in f"{sae_id} {path}".lower():
                continue
            if want_width is not None and want_width not in widths_in(f"{sae_id} {path}"):
                continue
            converter = rel.conversion_func or "sae_lens"
            rows.append(
                {
                    "release": rel.name,
                    "sae_id": sae_id,
                    "repo_id": rel.repo_id,
                    "path": path,
                    "model": rel.model,
                    "conversion_func": converter,
                    "neuronpedia": info.get("neuronpedia"),
                    "l0": info.get("l0"),
                    "norm_scaling_factor": info.get("norm_scaling_factor"),
                    "jsae_loads": converter in CONVERTERS,
                }
            )
    return rows


# --------------------------------------------------------------------------- `jsae pretrained`
def add_cli_arguments(parser: Any) -> None:
    """The arguments of `jsae pretrained` (an argparse parser)."""
    parser.add_argument("search", nargs="?", default=None, help="text in the release, repo_id, model, sae_id, "
                        "path or neuronpedia id (case-insensitive)")
    parser.add_argument("--model", default=None, help="only releases whose model contains this text")
    parser.add_argument("--hook", default=None, help="only SAE ids (or paths) containing this text, e.g. resid_post")
    parser.add_argument("--width", default=None, help="only SAEs whose id or path names this width: 16384, 16k, 1m")
    parser.add_argument("--json", action="store_true", help="print one JSON object per SAE id, one per line")
    parser.add_argument("--dry-run", action="store_true", help="check the filters and count the matches; list nothing")


def cli_command(args: Any) -> int:
    """`jsae pretrained`: list releases (no filter) or matching SAE ids, offline; exit 1 when nothing matches."""
    filters = {"model": args.model, "hook": args.hook, "width": args.width}
    rows = search(args.search, **filters)
    n_releases = len({row["release"] for row in rows})
    preferred, _ = registries()
    source = (f"sae_lens {saelens_version()}'s registry" if preferred is not snapshot_registry()
              else f"jsae's snapshot of the sae_lens {snapshot_version()} registry")
    if args.dry_run:
        print(f"jsae pretrained: {len(rows)} SAE ids in {n_releases} releases match ({source}); nothing listed.")
        return 0
    if args.json:
        for row in rows:
            print(json.dumps(row))
    elif args.search is None and not any(filters.values()):
        by_release: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_release.setdefault(row["release"], []).append(row)
        for name, group in by_release.items():
            first = group[0]
            note = "" if first["jsae_loads"] else "  (jsae cannot load this format)"
            print(f"{name}  model={first['model']}  repo_id={first['repo_id']}  "
                  f"conversion_func={first['conversion_func']}  {len(group)} ids{note}")
    else:
        release = None
        for row in rows:
            if row["release"] != release:
                release = row["release"]
                note = "" if row["jsae_loads"] else "  (jsae cannot load this format)"
                print(f"{release}  model={row['model']}  repo_id={row['repo_id']}  "
                      f"conversion_func={row['conversion_func']}{note}")
            extra = f"  neuronpedia={row['neuronpedia']}" if row["neuronpedia"] else ""
            print(f"  {row['sae_id']}  path={row['path']}{extra}")
    print(f"{len(rows)} SAE ids in {n_releases} releases ({source})", file=sys.stderr)
    return 0 if rows else 1
