"""Does the encoder follow the tissue or the site? The field's robustness measures, raw vs Macenko input, model
beside model.

For every model and input setting (raw, Macenko-normalized through the same `Preprocessing` as every other
evaluation) the features of `--data` are extracted (cached) and measured with `robustness_metrics`:

- robustness index (PathoROB, Kömen et al., arXiv 2507.17845): among each query's k nearest samples of other
  cases, the share of "same class, other centre" in "same class, other centre" + "other class, same centre";
- clustering score (PathoROB): ARI(k-means, class) - ARI(k-means, centre);
- paired cosine and top-1 / top-10 retrieval of the same tissue under another condition (PLISM);
- within- minus cross-slide kNN class accuracy and the own slide's share of the 50 nearest neighbours
  (PANDA-PLUS-Bench, arXiv 2512.14922);
- secondary, the package's earlier collapse measures (they do not condition on the class): kNN slide
  identity, silhouette by slide, the share of variance between slides and between centres.

A metric the data cannot define (no labels, one centre, no pairs) is null, with its reason in the report.

    exaonepath-robustness --model A --model B --data crc-samples --virtual_labs --output_dir OUT
    exaonepath-robustness --model A --task pathorob-camelyon --output_dir OUT --save_features
    exaonepath-robustness --model A --data my-tiles --output_dir OUT      # folder with a metadata.csv

`--data` is a folder with a `metadata.csv` (`file_name`, `label`, `center`, `slide_id` or `case_id`,
optional `pair_id`), an `exaonepath-tile` output or parquet shards (`slide_id`; `label`, `center`, `case_id`,
`pair_id` when present), a registered task name (`pathorob-camelyon`, `plism`), or with `--task` a local copy
of that task's data. `--virtual_labs` takes labelled images (class subfolders, or a metadata.csv with `label`)
and first re-stains each of them as several virtual labs would (HED perturbations and Reinhard transfers, not
Macenko: see `virtual_labs`), giving centres and pairs with known truth; it tests stain only, not scanner
or tissue-processing differences.

Writes `OUT/robustness.json` (one record per model and setting: `{"model", "setting", "metrics", "reasons",
"results", "details"}`), `OUT/robustness.md`, `OUT/tsne_by_center.png` and `OUT/tsne_by_class.png`, `OUT/run.json`
(data, settings, environment), and with `--save_features` `OUT/features.safetensors` (one [N, D] tensor per
model and setting, named `<model>/<setting>`) with `OUT/samples.csv` (its rows' `file_name`, `label`,
`center`, `case_id`, `pair_id`, `slide_id`), so that anyone can recompute the numbers. In Python:
`run_robustness(RobustnessSettings(...))`, or `assess_robustness` on features you already have.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import matplotlib
import numpy as np
import torch
from accelerate import PartialState
from threadpoolctl import threadpool_limits

from ...atomic_io import atomic_save_tensors, atomic_write_bytes, atomic_write_text, write_json
from ...cli import run_command
from ...images import decode_rgb, image_files
from ..common.encoders import Pooling, load_encoder
from ..common.features import (
    ExtractionSettings,
    FeatureSet,
    add_extraction_arguments,
    cache_key,
    distributed_state,
    extraction_settings,
)
from ..common.records import environment
from .grouped_images import load_grouped_images, parquet_files
from .metrics import (
    between_group_variance_share,
    clustering_score,
    paired_retrieval,
    robustness_index,
    slide_identity_knn,
    within_cross_gap,
)
from .tasks import ROBUSTNESS_TASKS, get_robustness_task, load_robustness_task
from .virtual_labs import (
    _HED_LABS,
    HedPerturbation,
    ReinhardTransfer,
    VirtualLab,
    default_virtual_labs,
    make_virtual_lab_dataset,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

__all__ = [
    "SETTINGS",
    "SampleTable",
    "RobustnessSamples",
    "load_robustness_samples",
    "virtual_labs_for",
    "labelled_images",
    "build_virtual_labs",
    "as_virtual_slides",
    "MetricOptions",
    "measure",
    "RobustnessInput",
    "RobustnessOutputs",
    "assess_robustness",
    "render_markdown",
    "RobustnessSettings",
    "run_robustness",
    "build_parser",
    "main",
]

logger = logging.getLogger(__name__)

#: Input settings: the name in the outputs -> Macenko on or off.
SETTINGS = {"raw": False, "macenko": True}
SAMPLE_COLUMNS = ("file_name", "label", "center", "case_id", "pair_id", "slide_id")


# ----------------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class SampleTable:
    """What is known of each sample, row-aligned with a feature matrix.

    `case_id` is the unit a query never gets as neighbour (a patient, a slide, or the source image of
    re-stained copies), `slide_id` the slide (the case when unknown). `label`, `center` and `pair_id` are None
    when the data has no such column; an empty `pair_id` means "not paired".
    """

    file_name: tuple[str, ...]
    case_id: tuple[str, ...]
    slide_id: tuple[str, ...]
    label: tuple[str, ...] | None = None
    center: tuple[str, ...] | None = None
    pair_id: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.file_name)
        for name in ("case_id", "slide_id", "label", "center", "pair_id"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"sample table: {name} has {len(values)} values for {n} samples")

    def __len__(self) -> int:
        return len(self.file_name)

    def select(self, rows: Sequence[int]) -> SampleTable:
        def pick(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if values is None else tuple(values[row] for row in rows)

        return SampleTable(
            **{name: pick(getattr(self, name)) for name in ("file_name", "case_id", "slide_id")},
            label=pick(self.label),
            center=pick(self.center),
            pair_id=pick(self.pair_id),
        )

    def to_csv(self) -> str:
        """`samples.csv`: one row per sample, the columns of `SAMPLE_COLUMNS` ("" where unknown)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(SAMPLE_COLUMNS)
        empty = ("",) * len(self)
        columns = [getattr(self, name) or empty for name in SAMPLE_COLUMNS]
        writer.writerows(zip(*columns, strict=True))
        return buffer.getvalue()

    def summary(self) -> dict[str, Any]:
        def count(values: tuple[str, ...] | None) -> int | None:
            return None if values is None else len(set(values))

        pairs = [p for p in self.pair_id or () if p]
        return {
            "samples": len(self),
            "classes": count(self.label),
            "centers": count(self.center),
            "cases": count(self.case_id),
            "slides": count(self.slide_id),
            "paired_samples": len(pairs) if self.pair_id is not None else None,
        }


@dataclass
class RobustnessSamples:
    """Images to extract features from (`dataset`: the columns `extract_features` reads) and their table."""

    dataset: datasets.Dataset
    table: SampleTable
    fingerprint: str
    source: str
    provenance: dict[str, Any] = field(default_factory=dict)


def _extraction_dataset(images: datasets.Dataset, table: SampleTable) -> datasets.Dataset:
    """The `image` column of `images` with `label` (int), `slide_id` (the case) and `patient_id`, the columns
    `extract_features` reads; the images stay in the source's arrow table."""
    index_of = {name: i for i, name in enumerate(sorted(set(table.label or ())))}
    columns = {
        "label": [index_of[v] for v in table.label] if table.label is not None else [-1] * len(table),
        "slide_id": list(table.case_id),
        "patient_id": [""] * len(table),
    }
    dataset = images.select_columns(["image"])
    if dataset.features["image"].decode:  # a no-op cast breaks later add_column calls (datasets 5.2)
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    for name, values in columns.items():
        dataset = dataset.add_column(name, values)
    return dataset


def _header(metadata: Path) -> list[str]:
    with open(metadata, newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), [])


def _require_columns(metadata: Path) -> str:
    """Checks `metadata.csv` for the columns the robustness measures need; returns the case column."""
    header = _header(metadata)
    for column, why in (
        ("file_name", "the image's path relative to the folder"),
        ("label", "the biological class of each image"),
        ("center", "the site, lab or scanner each image comes from"),
    ):
        if column not in header:
            raise ValueError(f"{metadata} has no column {column!r} ({why}); it has {header}")
    if "case_id" not in header and "slide_id" not in header:
        raise ValueError(
            f"{metadata} has neither a 'case_id' nor a 'slide_id' column (the patient or slide of each "
            f"image, left out of its own neighbours); it has {header}"
        )
    return "case_id" if "case_id" in header else "slide_id"


def _table_from_columns(
    columns: dict[str, list[str]], file_names: list[str], case_column: str
) -> SampleTable:
    def optional(name: str) -> tuple[str, ...] | None:
        return tuple(columns[name]) if name in columns else None

    case_id = tuple(columns[case_column])
    return SampleTable(
        file_name=tuple(file_names),
        case_id=case_id,
        slide_id=tuple(columns["slide_id"]) if "slide_id" in columns else case_id,
        label=optional("label"),
        center=optional("center"),
        pair_id=optional("pair_id"),
    )


def load_robustness_samples(
    data: str | os.PathLike | None,
    task: str | None = None,
    tile: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> RobustnessSamples:
    """The images and sample table of `data` (see the module docstring for the accepted layouts).

    `task` names a registered robustness task; `data` is then a local copy of it (default: the hub).
    """
    if task is None and data is not None and str(data) in ROBUSTNESS_TASKS:
        task, data = str(data), None
    if task is not None:
        if tile:
            raise ValueError("--tile applies to folders and shards, not to a registered task")
        loaded = load_robustness_task(get_robustness_task(task), data_dir=data, cache_dir=cache_dir)
        rows = loaded.dataset
        spec = loaded.spec
        case_id = tuple(rows["case_id"])
        table = SampleTable(
            file_name=tuple(f"{s}#{i}" for i, s in enumerate(rows["slide_id"])),
            case_id=case_id,
            slide_id=tuple(rows["slide_id"]),
            label=tuple(rows["label"]) if spec.label_column else None,
            center=tuple(rows["center"]),
            pair_id=tuple(rows["pair_id"]) if spec.pair_column else None,
        )
        return RobustnessSamples(
            dataset=_extraction_dataset(rows, table),
            table=table,
            fingerprint=rows._fingerprint,
            source=f"{loaded.dataset_id}@{loaded.dataset_revision}",
            provenance={"task": spec.name, **loaded.provenance},
        )
    if data is None:
        raise ValueError("give --data (a folder, tiling output, parquet or task name) or --task")
    if parquet_files(data) is not None:
        grouped = load_grouped_images(data, "slide_id", tile)
        case_column = "case_id" if "case_id" in grouped.columns else "slide_id"
    elif Path(data).is_dir():
        metadata = Path(data) / "metadata.csv"
        if not metadata.is_file():
            raise FileNotFoundError(
                f"{data} has no metadata.csv: the robustness measures need file_name,label,center and "
                "slide_id or case_id per image (for class subfolders of one lab, add --virtual_labs)"
            )
        case_column = _require_columns(metadata)
        grouped = load_grouped_images(data, case_column, tile)
    else:
        raise FileNotFoundError(
            f"--data {data} is neither a folder, parquet shards nor a registered task ({sorted(ROBUSTNESS_TASKS)})"
        )
    table = _table_from_columns(grouped.columns, grouped.file_names, case_column)
    return RobustnessSamples(
        dataset=grouped.dataset,  # already image, label (int), slide_id, patient_id
        table=table,
        fingerprint=grouped.fingerprint,
        source=grouped.source,
    )


# ------------------------------------------------------------------------------------------ virtual labs

VIRTUAL_LABS_NOTE = (
    "Virtual labs: every labelled source image re-stained once per lab (fixed HED perturbations after Ruifrok-"
    "Johnston and Tellez et al., Reinhard transfers toward real images of other labs; never Macenko, which would "
    "undo its own re-staining). They differ in stain colour only: scanner, tissue processing and patient biology "
    "are the same across labs, so this bounds from above the site robustness an encoder shows on real centres. "
    "Each lab's copy of the set is one virtual slide; the case is the source image."
)


# The Reinhard labs of `default_virtual_labs` as numbers: the lαβ mean and standard deviation over the tissue
# pixels of HistoQC's stain-templates/template3.png and template4.png (the shared real H&E data; Clear BSD), so
# that the protocol runs from the installed package without the images (tests check them against a fit).
REINHARD_TEMPLATE_STATISTICS = {
    "reinhard-template3": ((-0.700872, -0.0899515, 0.0264820), (0.300913, 0.0617455, 0.00889486)),
    "reinhard-template4": ((-0.282683, -0.0375351, 0.00550753), (0.212567, 0.0416930, 0.00434812)),
}


def virtual_labs_for(lab_data: str | os.PathLike | None = None) -> list[VirtualLab]:
    """The labs of the virtual-labs protocol: the images as they are ("as-scanned", the identity) and the four
    labs of `default_virtual_labs` (two fixed HED perturbations, two Reinhard transfers toward real images of
    other labs). The Reinhard targets are fitted on `lab_data/stain-templates/` when given, else taken from
    `REINHARD_TEMPLATE_STATISTICS` (the same fit on the shared data)."""
    as_scanned = HedPerturbation("as-scanned", scale=(1.0, 1.0, 1.0), bias=(0.0, 0.0, 0.0))
    if lab_data is not None:
        return [as_scanned, *default_virtual_labs(lab_data)]
    reinhard = [
        ReinhardTransfer(name, mean, std) for name, (mean, std) in REINHARD_TEMPLATE_STATISTICS.items()
    ]
    return [as_scanned, *_HED_LABS, *reinhard]


def labelled_images(source: str | os.PathLike) -> list[tuple[str, np.ndarray, str, str]]:
    """`(name, uint8 RGB, label, case_id)` of every image of `source`: class subfolders (the case is the image),
    or a `metadata.csv` with `file_name` and `label` (and `case_id` when known)."""
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--data {source}: the virtual-labs protocol needs a folder of labelled images"
        )
    metadata = root / "metadata.csv"
    if metadata.is_file():
        with open(metadata, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        header = list(rows[0]) if rows else _header(metadata)
        for column in ("file_name", "label"):
            if column not in header:
                raise ValueError(f"{metadata} has no column {column!r}; it has {header}")
        entries = [(row["file_name"], row["label"], row.get("case_id") or None) for row in rows]
    else:
        paths = [p.relative_to(root) for p in image_files(root)]
        loose = [str(p) for p in paths if len(p.parts) < 2]
        if loose:
            raise ValueError(
                f"{root}: images outside a class subfolder ({loose[:3]}); use class subfolders or a metadata.csv "
                "with file_name,label"
            )
        entries = [(str(p), p.parts[0], None) for p in paths]
    if not entries:
        raise ValueError(f"no images found in {root}")
    images = []
    for file_name, label, case_id in entries:
        name = str(Path(file_name).with_suffix("")).replace("/", "__").replace(os.sep, "__")
        images.append((name, decode_rgb(root / file_name), str(label), str(case_id or name)))
    return images


def as_virtual_slides(table: SampleTable) -> SampleTable:
    """Each lab's re-stained copy of the set as one virtual slide: the slide-level measures (within- vs
    cross-slide gap, same-slide share, slide identity) then ask whether a lab's stain shapes the features. The
    case stays the source image, which the robustness index leaves out of its own neighbours."""
    return replace(table, slide_id=table.center)


def build_virtual_labs(
    source: str | os.PathLike, output_dir: str | os.PathLike, lab_data: str | os.PathLike | None = None
) -> tuple[Path, list[VirtualLab]]:
    """The labelled images of `source` re-stained by every lab of `virtual_labs_for(lab_data)`, as a folder
    with a `metadata.csv` (`file_name,label,center,case_id,pair_id`) under `output_dir` (replaced)."""
    labs = virtual_labs_for(lab_data)
    images = labelled_images(source)
    logger.info("re-staining %d images as %d virtual labs into %s", len(images), len(labs), output_dir)
    return make_virtual_lab_dataset(images, labs, output_dir, overwrite=True), labs


# ----------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class MetricOptions:
    """Parameters of the measures: `k` of the robustness index (PathoROB: 11 on camelyon), its `bootstrap`
    replicates, `neighbours` of the within/cross-slide gap and slide-identity kNN, `share_neighbours` of the
    same-slide share, k-means `max_clusters` and `restarts` of the clustering score, the `seed`, and at most
    `tsne_samples` samples per t-SNE panel (a seeded subset above that). `threads` caps the OpenMP threads of
    scikit-learn's k-means and t-SNE: their spin-waiting threads slow down tenfold on shared, busy cores, and
    one thread loses little on the sizes measured here; None leaves the libraries' default. The neighbour
    searches keep torch's threads."""

    k: int = 11
    bootstrap: int = 1000
    neighbours: int = 5
    share_neighbours: int = 50
    max_clusters: int = 30
    restarts: int = 10
    seed: int = 0
    tsne_samples: int = 5000
    threads: int | None = 1


NO_LABELS = "the data has no biological class labels (`label` column)"
NO_CENTERS = "the data has no centres (`center` column)"
NO_PAIRS = (
    "the data has no pairs (`pair_id` column): paired retrieval needs the same tissue under 2+ conditions"
)


def measure(
    features: torch.Tensor, samples: SampleTable, options: MetricOptions = MetricOptions()
) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Every measure on one feature matrix: (flat metrics, reason per null metric, full metric results).

    The flat names are those of `robustness.json`; the full results are the metric functions' `to_dict()`.
    """
    from sklearn.metrics import silhouette_score

    if features.shape[0] != len(samples):
        raise ValueError(f"{features.shape[0]} feature rows for {len(samples)} samples")
    labels, centers, slides = samples.label, samples.center, np.asarray(samples.slide_id)
    metrics: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    results: dict[str, Any] = {}

    def undefined(names: Sequence[str], reason: str) -> None:
        for name in names:
            metrics[name] = None
            reasons[name] = reason

    ri_names = ("robustness_index", "robustness_index_k", "robustness_index_ci")
    if labels is None or centers is None:
        undefined(ri_names, NO_LABELS if labels is None else NO_CENTERS)
    else:
        ri = robustness_index(
            features,
            labels,
            centers,
            samples.case_id,
            k=options.k,
            bootstrap=options.bootstrap,
            seed=options.seed,
        )
        results["robustness_index"] = ri.to_dict()
        metrics["robustness_index"] = ri.value
        metrics["robustness_index_k"] = ri.k
        metrics["robustness_index_ci"] = [ri.ci_low, ri.ci_high] if ri.ci_low is not None else None
        if ri.value is None:
            reasons["robustness_index"] = ri.reason
        if metrics["robustness_index_ci"] is None:
            reasons["robustness_index_ci"] = ri.reason or "no bootstrap (--bootstrap 0)"

    cs_names = ("clustering_score", "clustering_num_clusters")
    if labels is None or centers is None:
        undefined(cs_names, NO_LABELS if labels is None else NO_CENTERS)
    else:
        with _scikit_learn_threads(options.threads):
            cs = clustering_score(
                features,
                labels,
                centers,
                max_clusters=options.max_clusters,
                restarts=options.restarts,
                seed=options.seed,
            )
        results["clustering_score"] = cs.to_dict()
        metrics["clustering_score"], metrics["clustering_num_clusters"] = cs.value, cs.num_clusters
        if cs.value is None:
            undefined(cs_names, cs.reason)

    paired_names = (
        "paired_cosine",
        "paired_unpaired_cosine",
        "paired_top1",
        "paired_top10",
        "paired_num_pairs",
    )
    if samples.pair_id is None or centers is None:
        undefined(paired_names, NO_PAIRS if samples.pair_id is None else NO_CENTERS)
    else:
        paired = paired_retrieval(features, samples.pair_id, centers)
        results["paired_retrieval"] = paired.to_dict()
        metrics.update(
            paired_cosine=paired.cosine,
            paired_unpaired_cosine=paired.unpaired_cosine,
            paired_top1=paired.top1,
            paired_top10=paired.top10,
            paired_num_pairs=paired.num_pairs,
        )
        if paired.reason is not None:
            undefined(paired_names[:4], paired.reason)
        elif paired.unpaired_cosine is None:
            undefined(
                ("paired_unpaired_cosine",),
                "no condition pair shares 2 tiles: no two different tiles to compare",
            )

    gap_names = ("within_cross_gap", "within_slide_accuracy", "cross_slide_accuracy")
    # the same-slide share does not depend on the class: without labels it comes from constant ones
    gap = within_cross_gap(
        features,
        labels if labels is not None else np.zeros(len(samples), dtype=np.int64),
        slides,
        k=options.neighbours,
        neighbours_for_share=options.share_neighbours,
    )
    metrics["same_slide_share"] = gap.same_slide_share
    slides_of_case: dict[str, set[str]] = {}
    for case, slide in zip(samples.case_id, samples.slide_id, strict=True):
        slides_of_case.setdefault(case, set()).add(slide)
    if labels is None:
        undefined(gap_names, NO_LABELS)
    elif any(len(found) > 1 for found in slides_of_case.values()):
        # leave-one-slide-out would then find the query's own case (e.g. its re-stainings) on the other slides
        undefined(gap_names, "a case spans several slides (e.g. virtual labs: one image re-stained per lab)")
    else:
        results["within_cross_gap"] = gap.to_dict()
        metrics.update(
            within_cross_gap=gap.gap,
            within_slide_accuracy=gap.within_slide_accuracy,
            cross_slide_accuracy=gap.cross_slide_accuracy,
        )
        for name in gap_names:
            if metrics[name] is None:
                reasons[name] = gap.reason

    slide_names = (
        "slide_identity_knn",
        "slide_identity_chance",
        "silhouette_by_slide",
        "variance_between_slides",
    )
    num_slides = len(set(samples.slide_id))
    if num_slides < 2:
        undefined(slide_names, "a single slide")
    else:
        prevalence = np.unique(slides, return_counts=True)[1] / len(slides)
        metrics["slide_identity_knn"] = slide_identity_knn(features, slides, k=options.neighbours)
        metrics["slide_identity_chance"] = float((prevalence**2).sum())
        metrics["variance_between_slides"] = between_group_variance_share(features, slides)
        if num_slides < len(slides):
            unit = torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()
            metrics["silhouette_by_slide"] = float(
                silhouette_score(
                    unit,
                    slides,
                    metric="cosine",
                    sample_size=min(len(slides), 10_000),
                    random_state=options.seed,
                )
            )
        else:
            undefined(["silhouette_by_slide"], "every slide has a single sample")
    if centers is None or len(set(centers)) < 2:
        undefined(["variance_between_centers"], NO_CENTERS if centers is None else "a single centre")
    else:
        metrics["variance_between_centers"] = between_group_variance_share(features, np.asarray(centers))
    return metrics, reasons, results


# ------------------------------------------------------------------------------------------------ report


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
    with _scikit_learn_threads(threads):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(unit)


def _scikit_learn_threads(threads: int | None):
    """Caps the OpenMP threads around scikit-learn's k-means and t-SNE only: the cap is process-wide while it
    lasts and would also hold torch's own OpenMP pool, which the neighbour searches use."""
    return (
        contextlib.nullcontext() if threads is None else threadpool_limits(limits=threads, user_api="openmp")
    )


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
    options: MetricOptions = MetricOptions(),
    save_features: bool = False,
    data: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> RobustnessOutputs:
    """Measure every input; write `robustness.json`, `robustness.md`, the t-SNE PNGs (by centre, and by class
    when there are labels) and with `save_features` `features.safetensors` + `samples.csv` under `output_dir`.

    `data` describes the data in the report (`source`, ...); `notes` are added to it as they are.
    """
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


# ---------------------------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class RobustnessSettings:
    """One `exaonepath-robustness` run (see the module docstring); `names` label the models in the outputs.

    `k=None` takes the task's robustness-index k (PathoROB's), else 11.
    """

    models: tuple[str, ...]
    data: str | os.PathLike | None = None
    task: str | None = None
    names: tuple[str, ...] | None = None
    virtual_labs: bool = False
    lab_data: str | os.PathLike | None = None
    tile: int | None = None
    input_settings: tuple[str, ...] = ("raw", "macenko")
    k: int | None = None
    bootstrap: int = 1000
    neighbours: int = 5
    restarts: int = 10
    pooling: Pooling = "auto"
    output_dir: Path = Path("results/robustness")
    save_features: bool = False
    seed: int = 0
    extraction: ExtractionSettings = field(default_factory=lambda: ExtractionSettings(num_workers=2))

    def validate(self) -> None:
        if not self.models:
            raise ValueError("give at least one --model")
        if self.names is not None and len(self.names) != len(self.models):
            raise ValueError("give one --name per --model")
        unknown = [name for name in self.input_settings if name not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown input setting(s) {unknown}; choose from {sorted(SETTINGS)}")
        if self.task is not None:
            get_robustness_task(self.task)
        if self.virtual_labs and (self.task is not None or self.data is None):
            raise ValueError("--virtual_labs re-stains the labelled images of --data; it takes no --task")
        if self.lab_data is not None and not self.virtual_labs:
            raise ValueError("--lab_data holds the Reinhard targets of --virtual_labs; add --virtual_labs")

    def model_names(self) -> list[str]:
        names = list(self.names) if self.names else [Path(m).name or str(m) for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models {duplicates} share a name in the outputs; tell them apart with --name")
        return names

    def metric_options(self, task_k: int | None) -> MetricOptions:
        return MetricOptions(
            k=self.k or task_k or MetricOptions.k,
            bootstrap=self.bootstrap,
            neighbours=self.neighbours,
            restarts=self.restarts,
            seed=self.seed,
        )


def _extract_all(
    settings: RobustnessSettings, samples: RobustnessSamples, names: Sequence[str], state: PartialState
) -> list[tuple[str, str, dict[str, Any], FeatureSet]]:
    extracted = []
    for source, name in zip(settings.models, names, strict=True):
        logger.info("loading %s", source)
        encoder = load_encoder(source, pooling=settings.pooling, device=state.device)
        for setting in settings.input_settings:
            preprocessing = encoder.default_preprocessing(stain_normalize=SETTINGS[setting])
            key = cache_key(
                encoder, samples.source, "local", samples.fingerprint, "robustness", preprocessing,
                settings.extraction.precision,
            )  # fmt: skip
            logger.info("features of %s, %s input", name, setting)
            features = settings.extraction.extract(encoder, samples.dataset, preprocessing, key, state=state)
            details = {
                "model_source": str(source),
                "model_identity": encoder.identity(),
                "preprocessing": preprocessing.to_dict(),
                "extraction": {**features.stats, "failed_images": len(features.failed)},
            }
            extracted.append((name, setting, details, features))
    return extracted


def _common_rows(extracted: Sequence[tuple[str, str, dict[str, Any], FeatureSet]]) -> list[int]:
    """Dataset rows every (model, setting) could read: all measures compare the same samples."""
    common = set(extracted[0][3].indices.tolist())
    for *_, features in extracted[1:]:
        common &= set(features.indices.tolist())
    return sorted(common)


def _aligned(features: FeatureSet, rows: Sequence[int]) -> torch.Tensor:
    position = {int(row): i for i, row in enumerate(features.indices.tolist())}
    return features.features[torch.as_tensor([position[row] for row in rows], dtype=torch.long)]


def run_robustness(
    settings: RobustnessSettings, state: PartialState | None = None
) -> RobustnessOutputs | None:
    """Extract, measure and report (see the module docstring); returns the outputs (None on the other
    processes under `accelerate launch`)."""
    settings.validate()
    names = settings.model_names()
    state = state or distributed_state()
    out = Path(settings.output_dir)
    notes, labs = [], []
    data, task = settings.data, settings.task
    if settings.virtual_labs:
        data, labs = out / "virtual-labs", virtual_labs_for(settings.lab_data)
        if state.is_main_process:  # one writer; the other processes read the finished folder
            build_virtual_labs(settings.data, data, settings.lab_data)
        state.wait_for_everyone()
        notes.append(VIRTUAL_LABS_NOTE)
    samples = load_robustness_samples(data, task, settings.tile)
    if settings.virtual_labs:
        samples.table = as_virtual_slides(samples.table)
    task_name = samples.provenance.get("task")
    options = settings.metric_options(ROBUSTNESS_TASKS[task_name].k if task_name else None)
    logger.info("%s: %s", samples.source, samples.table.summary())
    # every process extracts; the measures (k-means, t-SNE) run afterwards on the main process only
    extracted = _extract_all(settings, samples, names, state)
    if not state.is_main_process:
        return None
    rows = _common_rows(extracted)
    left_out = len(samples.table) - len(rows)
    if left_out:
        logger.warning(
            "%d images unreadable by some model or setting are left out of every measure", left_out
        )
        notes.append(f"{left_out} unreadable images left out of every measure (see the extraction details)")
    table = samples.table.select(rows)
    inputs = [
        RobustnessInput(name, setting, _aligned(features, rows), table, details)
        for name, setting, details, features in extracted
    ]
    described = {"source": samples.source, "fingerprint": samples.fingerprint, **samples.provenance}
    outputs = assess_robustness(inputs, out, options, settings.save_features, described, notes)
    write_json(
        out / "run.json",
        {
            "data": {**described, "counts": table.summary(), "virtual_labs": [lab.to_dict() for lab in labs]},
            "models": dict(zip(names, map(str, settings.models), strict=True)),
            "options": options.__dict__,
            "input_settings": list(settings.input_settings),
            "environment": environment(),
        },
    )
    print(outputs.markdown.read_text(encoding="utf-8"))
    print(f"records: {outputs.json}; t-SNE: {', '.join(map(str, outputs.tsne))}")
    return outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-robustness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", action="append", required=True, help="repeat to compare models side by side"
    )
    parser.add_argument("--name", action="append", default=None, help="display name per --model")
    parser.add_argument(
        "--data",
        default=None,
        help="folder with metadata.csv, exaonepath-tile output, parquet, or a task name",
    )
    parser.add_argument(
        "--task",
        choices=sorted(ROBUSTNESS_TASKS),
        default=None,
        help="registered task (--data: a local copy)",
    )
    parser.add_argument(
        "--virtual_labs",
        action="store_true",
        help="re-stain the labelled images of --data as virtual labs first",
    )
    parser.add_argument(
        "--lab_data",
        default=None,
        help="folder with stain-templates/: adds the Reinhard labs of --virtual_labs",
    )
    parser.add_argument("--tile", type=int, default=None, help="cut each image into SIZE x SIZE tiles first")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["raw", "macenko"])
    parser.add_argument(
        "--k", type=int, default=None, help="robustness-index k (default: the task's, else 11)"
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of the RI interval")
    parser.add_argument("--neighbours", type=int, default=5, help="kNN k of the slide gap and slide identity")
    parser.add_argument("--restarts", type=int, default=10, help="k-means restarts of the clustering score")
    parser.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto")
    parser.add_argument("--output_dir", type=Path, default=Path("results/robustness"))
    parser.add_argument(
        "--save_features", action="store_true", help="also write features.safetensors and samples.csv"
    )
    add_extraction_arguments(parser, num_workers=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def settings_from_args(args: argparse.Namespace) -> RobustnessSettings:
    return RobustnessSettings(
        models=tuple(args.model),
        data=args.data,
        task=args.task,
        names=tuple(args.name) if args.name else None,
        virtual_labs=args.virtual_labs,
        lab_data=args.lab_data,
        tile=args.tile,
        input_settings=tuple(args.settings),
        k=args.k,
        bootstrap=args.bootstrap,
        neighbours=args.neighbours,
        restarts=args.restarts,
        pooling=args.pooling,
        output_dir=args.output_dir,
        save_features=args.save_features,
        seed=args.seed,
        extraction=extraction_settings(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("exaonepath-robustness", lambda: run_robustness(settings_from_args(args)))


if __name__ == "__main__":
    raise SystemExit(main())
