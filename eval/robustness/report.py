"""The report of a robustness run: every (model, setting) measured (`measures`) into `robustness.json`,
`robustness.md` (the table and the reasons for null metrics), the t-SNE PNGs and optionally the features with
their sample table (`assess_robustness`)."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

from ...atomic_io import atomic_save_tensors, atomic_write_bytes, atomic_write_text, write_json
from .measures import MetricOptions, measure, scikit_learn_threads
from .samples import SampleTable

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

__all__ = ["COLUMNS", "RobustnessInput", "RobustnessOutputs", "assess_robustness", "render_markdown"]

logger = logging.getLogger(__name__)


@dataclass
class RobustnessInput:
    """Features of one (model, input setting) with the table of their rows; `details` (model identity,
    preprocessing, extraction statistics, ...) are recorded as they are."""

    model: str
    setting: str
    features: torch.Tensor
    samples: SampleTable
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RobustnessOutputs:
    """What `assess_robustness` wrote: the records of `robustness.json` and the files' paths."""

    records: list[dict[str, Any]]
    json: Path
    markdown: Path
    tsne: list[Path]
    features: Path | None = None
    samples: Path | None = None


def _tsne(features: torch.Tensor, rows: np.ndarray, seed: int, threads: int | None) -> np.ndarray:
    from sklearn.manifold import TSNE

    unit = torch.nn.functional.normalize(features[torch.as_tensor(rows)].float(), dim=1).cpu().numpy()
    perplexity = float(max(2.0, min(30.0, (len(unit) - 1) / 3)))
    with scikit_learn_threads(threads):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(unit)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _panel_title(record: dict[str, Any]) -> str:
    metrics = record["metrics"]
    parts = []
    if metrics.get("robustness_index") is not None:
        parts.append(f"RI {metrics['robustness_index']:.2f}")
    if metrics.get("paired_top10") is not None:
        parts.append(f"paired top-10 {metrics['paired_top10']:.2f}")
    if metrics.get("slide_identity_knn") is not None:
        parts.append(f"slide kNN {metrics['slide_identity_knn']:.2f}")
    return f"{record['model']} | {record['setting']}\n" + ", ".join(parts)


def _plot_tsne(panels: list[dict[str, Any]], colour_by: str, title: str, path: Path) -> Path:
    """One t-SNE panel per (model row, setting column), points coloured by `colour_by` of each panel."""
    models = list(dict.fromkeys(panel["model"] for panel in panels))
    settings = list(dict.fromkeys(panel["setting"] for panel in panels))
    figure, axes = plt.subplots(
        len(models), len(settings), figsize=(5 * len(settings), 4.6 * len(models)), squeeze=False
    )
    groups_all = sorted({g for panel in panels for g in panel[colour_by]})
    colours = plt.get_cmap("tab20" if len(groups_all) > 10 else "tab10")
    colour_of = {g: colours(i % colours.N) for i, g in enumerate(groups_all)}
    for panel in panels:
        axis = axes[models.index(panel["model"])][settings.index(panel["setting"])]
        embedding, groups = panel["embedding"], np.asarray(panel[colour_by])
        for group in sorted(set(groups.tolist())):
            chosen = groups == group
            axis.scatter(
                embedding[chosen, 0], embedding[chosen, 1], s=12, color=colour_of[group], label=group
            )
        axis.set_title(panel["title"], fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    if len(groups_all) <= 20:
        handles, labels = axes[0][0].get_legend_handles_labels()
        figure.legend(
            handles, labels, loc="lower center", ncol=min(5, len(groups_all)), fontsize=7, frameon=False
        )
        figure.subplots_adjust(bottom=0.08 + 0.03 * ((len(groups_all) + 4) // 5))
    figure.suptitle(title, fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


COLUMNS = (
    ("Robustness index (k) [95% CI] ↑", None),
    ("Clustering score ↑", "clustering_score"),
    ("Paired cosine ↑", "paired_cosine"),
    ("Unpaired cosine (baseline)", "paired_unpaired_cosine"),
    ("Paired top-1 ↑", "paired_top1"),
    ("Paired top-10 ↑", "paired_top10"),
    ("Within − cross-slide gap ↓", "within_cross_gap"),
    ("Same-slide share ↓", "same_slide_share"),
    ("Slide-ID kNN (chance)", None),
    ("Var. between centres ↓", "variance_between_centers"),
)


def _ri_cell(metrics: dict[str, Any]) -> str:
    if metrics["robustness_index"] is None:
        return "–"
    ci = metrics["robustness_index_ci"]
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{metrics['robustness_index']:.3f} ({metrics['robustness_index_k']}){interval}"


def render_markdown(
    records: Sequence[dict[str, Any]], data: dict[str, Any], notes: Sequence[str] = ()
) -> str:
    """`robustness.md`: the table model x setting, what the data holds, and why a metric is null."""
    counts = data.get("counts", {})
    described = ", ".join(f"{value} {name}" for name, value in counts.items() if value is not None)
    lines = [
        "# Robustness: does the encoder follow the tissue or the site?",
        "",
        f"Data: {data.get('source', '?')} ({described}).",
        "",
        "| Model | Input | " + " | ".join(title for title, _ in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for record in records:
        metrics = record["metrics"]
        cells = []
        for title, key in COLUMNS:
            if title.startswith("Robustness index"):
                cells.append(_ri_cell(metrics))
            elif title.startswith("Slide-ID"):
                cells.append(
                    f"{_fmt(metrics['slide_identity_knn'])} ({_fmt(metrics['slide_identity_chance'])})"
                    if metrics["slide_identity_knn"] is not None
                    else "–"
                )
            else:
                cells.append(_fmt(metrics[key]))
        lines.append(f"| {record['model']} | {record['setting']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "↑ higher = features follow the tissue; ↓ lower = they carry less of the slide or site. The robustness "
        "index (PathoROB) counts, among each sample's k nearest neighbours from other cases, same-class-other-"
        "centre against other-class-same-centre neighbours; paired figures (PLISM) retrieve the same tissue "
        "under another condition; the gap (PANDA-PLUS-Bench) is within-slide minus leave-one-slide-out kNN "
        "class accuracy. Slide-ID kNN and the variance share do not condition on the class: where classes "
        "differ by slide a good encoder scores high on them too.",
    ]
    undefined: dict[tuple[str, str], list[str]] = {}
    for record in records:
        for name, reason in record["reasons"].items():
            undefined.setdefault((name, reason), []).append(f"{record['model']} {record['setting']}")
    if undefined:
        lines += ["", "## Null metrics", ""]
        everyone = len(records)
        for (name, reason), where in undefined.items():
            scope = "all runs" if len(where) == everyone else ", ".join(where)
            lines.append(f"- `{name}` ({scope}): {reason}")
    if notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def _save_features(inputs: Sequence[RobustnessInput], out: Path) -> tuple[Path, Path]:
    table = inputs[0].samples
    if any(item.samples != table for item in inputs[1:]):
        raise ValueError("save_features needs every input on the same samples in the same order")
    tensors = {f"{item.model}/{item.setting}": item.features.float().cpu() for item in inputs}
    features_path, samples_path = out / "features.safetensors", out / "samples.csv"
    atomic_save_tensors(
        features_path,
        tensors,
        metadata={
            "rows": "samples.csv",
            "names": json.dumps(list(tensors)),
            "format": "one [N, D] tensor per model/setting",
        },
    )
    atomic_write_text(samples_path, table.to_csv())
    return features_path, samples_path


def _record(item: RobustnessInput, options: MetricOptions) -> dict[str, Any]:
    logger.info("measuring %s %s (%d samples)", item.model, item.setting, len(item.samples))
    metrics, reasons, results = measure(item.features, item.samples, options)
    return {
        "model": item.model,
        "setting": item.setting,
        "metrics": metrics,
        "reasons": reasons,
        "results": results,
        "details": item.details,
    }


def _panel(
    item: RobustnessInput, record: dict[str, Any], subsets: dict[int, np.ndarray], options: MetricOptions
) -> dict[str, Any]:
    """The t-SNE panel of one input; inputs of one sample count share one seeded subset of rows."""
    n = len(item.samples)
    if n not in subsets:
        rng = np.random.default_rng(options.seed)
        subsets[n] = (
            np.sort(rng.choice(n, options.tsne_samples, replace=False))
            if n > options.tsne_samples
            else np.arange(n)
        )
    rows = subsets[n]
    logger.info("t-SNE of %s %s (%d samples)", item.model, item.setting, len(rows))
    samples = item.samples
    return {
        "model": item.model,
        "setting": item.setting,
        "embedding": _tsne(item.features, rows, options.seed, options.threads),
        "center": [samples.center[r] for r in rows] if samples.center is not None else ["?"] * len(rows),
        "label": [samples.label[r] for r in rows] if samples.label is not None else None,
        "title": _panel_title(record),
    }


def assess_robustness(
    inputs: Sequence[RobustnessInput],
    output_dir: str | os.PathLike,
    options: MetricOptions | None = None,
    save_features: bool = False,
    data: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> RobustnessOutputs:
    """Measure every input; write `robustness.json`, `robustness.md`, the t-SNE PNGs (by centre, and by class
    when there are labels) and with `save_features` `features.safetensors` + `samples.csv` under `output_dir`.

    `options` None takes the defaults of `MetricOptions`. `data` describes the data in the report (`source`,
    ...); `notes` are added to it as they are.
    """
    options = options or MetricOptions()
    if not inputs:
        raise ValueError("nothing to assess: no (model, setting) inputs")
    names = [(item.model, item.setting) for item in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"each (model, setting) may occur once; got {names}")
    out = Path(output_dir)
    records, panels, subsets = [], [], {}
    for item in inputs:
        records.append(_record(item, options))
        panels.append(_panel(item, records[-1], subsets, options))
    data = {"counts": inputs[0].samples.summary(), **(data or {})}
    write_json(out / "robustness.json", records)
    markdown = render_markdown(records, data, notes)
    atomic_write_text(out / "robustness.md", markdown)
    tsne = [
        _plot_tsne(panels, "center", "t-SNE of the features coloured by centre", out / "tsne_by_center.png")
    ]
    if all(panel["label"] is not None for panel in panels):
        tsne.append(
            _plot_tsne(panels, "label", "t-SNE of the features coloured by class", out / "tsne_by_class.png")
        )
    outputs = RobustnessOutputs(records, out / "robustness.json", out / "robustness.md", tsne)
    if save_features:
        outputs.features, outputs.samples = _save_features(inputs, out)
    return outputs
