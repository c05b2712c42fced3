"""The samples of a robustness run: what is known of each image (`SampleTable`, row-aligned with a feature
matrix) and the images to extract features from (`RobustnessSamples`), from a folder with a `metadata.csv`,
an `exaonepath-tile` output or parquet shards, or a registered task (see `run` for the layouts)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from .grouped_images import load_grouped_images, parquet_files
from .tasks import ROBUSTNESS_TASKS, get_robustness_task, load_robustness_task

__all__ = ["SAMPLE_COLUMNS", "RobustnessSamples", "SampleTable", "load_robustness_samples"]

#: The columns of `samples.csv`, in order.
SAMPLE_COLUMNS = ("file_name", "label", "center", "case_id", "pair_id", "slide_id")


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
