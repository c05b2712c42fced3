"""Run records and the Table 1 report (the paper's numbers beside ours, with the difference).

Each probing run writes one JSON record (`exaonepath-probe`); `write_report` renders a directory of them
(`exaonepath-report`, whose command line is in `cli`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...atomic_io import atomic_write_bytes
from ..common.records import summary_cell
from .tasks import PAPER_MEAN_TOP1, PAPER_TASK_ORDER, TASKS

__all__ = ["load_records", "render_table1", "render_details", "write_report"]

RECORD_SUFFIX = ".record.json"


def load_records(root: str | Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(root).rglob(f"*{RECORD_SUFFIX}"))]


def render_table1(records: Iterable[dict[str, Any]], protocol: str = "paper", metric: str = "top1") -> str:
    """Markdown in the paper's Table 1 layout: one row per model, the paper's EXAONEPath row and the differences."""
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        if record["probe"]["name"] != protocol:
            continue
        label = record["model"]["label"]
        by_model.setdefault(label, {})[record["task"]["name"]] = record["results"]["summary"][metric]
    header = ["Model"] + [TASKS[t].display_name for t in PAPER_TASK_ORDER] + ["Mean"]
    lines = [
        f"Linear probing, {metric} ({protocol} protocol); mean over the six tasks only when all six ran.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    paper = [TASKS[t].paper_top1 for t in PAPER_TASK_ORDER]
    if metric == "top1":
        lines.append(
            "| EXAONEPath (paper) | " + " | ".join(f"{v:.3f}" for v in paper) + f" | {PAPER_MEAN_TOP1:.3f} |"
        )
    for label, results in by_model.items():
        if not any(t in results for t in PAPER_TASK_ORDER):
            continue  # local imagefolder runs only: listed under "All runs"
        means = [results.get(t, {}).get("mean") if results.get(t) else None for t in PAPER_TASK_ORDER]
        complete = all(v is not None for v in means)
        mean_cell = f"{sum(means) / len(means):.3f}" if complete else "–"
        lines.append(
            f"| {label} | "
            + " | ".join(summary_cell(results.get(t)) for t in PAPER_TASK_ORDER)
            + f" | {mean_cell} |"
        )
        if metric == "top1":
            diffs = [f"{m - p:+.3f}" if m is not None else "–" for m, p in zip(means, paper, strict=True)]
            mean_diff = f"{sum(means) / len(means) - PAPER_MEAN_TOP1:+.3f}" if complete else "–"
            lines.append(f"| Δ {label} − paper | " + " | ".join(diffs) + f" | {mean_diff} |")
    return "\n".join(lines) + "\n"


def render_details(records: Iterable[dict[str, Any]]) -> str:
    """Every run: all four metrics, protocol, preprocessing and where the features came from."""
    lines = [
        "| Model | Task | Protocol | Seeds | Top-1 | Balanced acc. | Macro-F1 | AUROC | Macenko | Features |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        summary = record["results"]["summary"]
        stain = "on" if record["preprocessing"]["stain_normalize"] else "off"
        cached = "cached" if all(s["cache_hit"] for s in record["extraction"].values()) else "extracted"
        lines.append(
            f"| {record['model']['label']} | {record['task']['display_name']} | {record['probe']['name']} | "
            f"{len(record['probe']['seeds'])} | "
            + " | ".join(summary_cell(summary[k]) for k in ("top1", "balanced_accuracy", "macro_f1", "auroc"))
            + f" | {stain} | {cached} |"
        )
    return "\n".join(lines) + "\n"


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    records = load_records(root)
    if not records:
        raise FileNotFoundError(f"no run records (*{RECORD_SUFFIX}) under {root}; run exaonepath-probe first")
    protocols = sorted({r["probe"]["name"] for r in records})
    parts = ["# Linear probing results", ""]
    for protocol in protocols:
        parts += [f"## {protocol} protocol", "", render_table1(records, protocol), ""]
    parts += ["## All runs", "", render_details(records)]
    target = Path(out) if out else Path(root) / "report.md"
    atomic_write_bytes(target, "\n".join(parts).encode())
    return target


if __name__ == "__main__":
    from .cli import report_main

    raise SystemExit(report_main())
