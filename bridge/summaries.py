"""What a run reports about its SAEs: one summary per SAE, and the table of a run with several."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY_COLUMNS = (("l0", "L0", ".1f"), ("explained_variance", "explained variance", ".3f"),
                   ("dead_features", "dead", "d"), ("ce_loss_score", "CE loss score", ".3f"))


def sae_summary(sae) -> dict[str, Any]:
    """The SAE's final eval metrics (none with evals off) and its dead features."""
    summary = dict(sae.cfg.metadata.eval_metrics or {})
    summary["dead_features"] = int(sae.cfg.metadata.num_dead_features or 0)
    summary["dead_fraction"] = summary["dead_features"] / sae.cfg.d_sae
    return summary


def field_value(train_cfg, field: str):
    """The value of a sweep axis ("sae.k", "lr") in one member's TrainConfig."""
    return getattr(train_cfg.sae, field[4:]) if field.startswith("sae.") else getattr(train_cfg, field)


def summary_row(name: str, member, sae, axes: list[str]) -> dict[str, Any]:
    """One SAE of a run with several: its name, hook, swept values and `sae_summary`."""
    row = {"name": name, "hook_name": sae.cfg.metadata.hook_name}
    row |= {field: field_value(member, field) for field in axes}
    return row | sae_summary(sae)


def summary_table(rows: list[dict], axes: list[str]) -> str:
    """A markdown table of the run's SAEs: name, hook, swept fields, L0, explained variance, dead, CE loss score."""
    header = ["SAE", "hook", *axes, *(title for _, title, _ in SUMMARY_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"], row["hook_name"], *(str(row[a]) for a in axes)]
        cells += [format(row[key], fmt) if row.get(key) is not None else "—" for key, _, fmt in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary_table(output_path: str, rows: list[dict], axes: list[str]) -> Path:
    """<output_path>/summary.md (the table) and summary.json (every metric of every SAE)."""
    folder = Path(output_path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(rows, indent=1))
    (folder / "summary.md").write_text(summary_table(rows, axes))
    return folder / "summary.md"
