"""What every evaluation run records beside its numbers: the environment it ran in, and metrics summarised
over seeds (mean ± sample standard deviation) with the one way they are printed in tables."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
from datetime import datetime, timezone
from typing import Any

import numpy as np

__all__ = ["environment", "slugify", "summarize_seeds", "summary_cell"]

_PACKAGES = (
    "exaonepath-hf",
    "torch",
    "torchvision",
    "transformers",
    "timm",
    "datasets",
    "evaluate",
    "accelerate",
    "safetensors",
    "scikit-learn",
    "numpy",
)


def environment() -> dict[str, Any]:
    """Package versions, Python and platform, for the run record."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "packages": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
    }


def summarize_seeds(per_seed: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (0 for one seed) of each metric over seeds; None stays None."""
    summary = {}
    for key in keys:
        values = [m[key] for m in per_seed if m.get(key) is not None]
        if not values:
            summary[key] = {"mean": None, "sd": None, "n": 0}
            continue
        array = np.asarray(values, dtype=np.float64)
        sd = float(array.std(ddof=1)) if len(array) > 1 else 0.0
        summary[key] = {"mean": float(array.mean()), "sd": sd, "n": len(array)}
    return summary


def summary_cell(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    if summary.get("n", 1) > 1:
        return f"{summary['mean']:.3f} ± {summary['sd']:.3f}"
    return f"{summary['mean']:.3f}"


def slugify(text: str) -> str:
    """`text` as a file or folder name of a run record (a model label, a task name): safe characters only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_")[-80:] or "model"
