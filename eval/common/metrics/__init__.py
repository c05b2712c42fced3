"""The project's `evaluate` metric module (top-1, balanced accuracy, macro-F1, AUROC), loaded by path so that
it works offline; `pathology_metrics.py` stays free of the project's imports (evaluate copies and parses it)."""

from __future__ import annotations

from pathlib import Path

import evaluate

__all__ = ["METRIC_PATH", "METRIC_KEYS", "load_metric"]

METRIC_PATH = Path(__file__).resolve().parent / "pathology_metrics.py"
METRIC_KEYS = ("top1", "balanced_accuracy", "macro_f1", "auroc")


def load_metric() -> evaluate.EvaluationModule:
    """The project's metric module, loaded by path (works offline)."""
    return evaluate.load(str(METRIC_PATH))
