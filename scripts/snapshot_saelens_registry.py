"""Regenerate jsae/saelens_registry.json.gz from the installed sae_lens' pretrained_saes.yaml.

Usage: .venv/bin/python scripts/snapshot_saelens_registry.py [--out PATH]

The snapshot holds the registry exactly as SAELens parses it (every release and SAE entry, with
its fields), plus the sae_lens version it came from; the output is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jsae import releases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=releases.SNAPSHOT_PATH, help="snapshot file to write")
    args = parser.parse_args(argv)
    path, version = releases.saelens_registry_path(), releases.saelens_version()
    if path is None or version is None:
        print("sae_lens is not installed (pip install sae-lens): nothing to snapshot.", file=sys.stderr)
        return 1
    data = releases.read_saelens_yaml(path)
    releases.write_snapshot(args.out, version, data)
    n_ids = sum(len(entry.get("saes", [])) for entry in data.values())
    print(f"{args.out}: sae_lens {version}, {len(data)} releases, {n_ids} SAE ids, {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
