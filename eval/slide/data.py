"""Slide-level datasets: a labels CSV joined to a folder of per-slide feature files, split by patient.

The CSV has one row per slide, with the columns `slide_id`, `patient_id` (or `case_id`, as CLAM and TRIDENT
call it), `label` and optionally `split` (train / val / test; the aliases of `eval.common.data` such as
`validation` or `testing` work too). The
feature folder holds `<slide_id>.h5` files in TRIDENT's layout (exaonepath-extract, TRIDENT, CLAM's `h5_files/`)
or CLAM's `<slide_id>.pt` bags (`eval.slide.bags`); a CLAM feature folder (`h5_files/` and `pt_files/`) is read
through both, an .h5 bag winning over a .pt one of the same slide. Every labelled slide needs a
file; a file without a row is an error too unless `allow_extra_features` (a cohort's folder serving a task that
labels only some of its slides).

Splits are by patient, so no patient's slides are in two splits:

- a `split` column wins: every row names its split, and a patient with slides in two splits is an error;
  when it names only train and test, about `val_fraction` of the train patients become validation.
- without one, scikit-learn's `StratifiedGroupKFold` (groups = patients, stratified by label, seeded)
  holds out about `test_fraction` of the patients for test, then about `val_fraction` of all of them for
  validation; the fractions are met up to whole folds (test: 1 of round(1 / test_fraction) folds).

With `level="patient"` a patient's slides become one bag (their patches concatenated, in slide order);
they must share a label. Otherwise each slide is its own bag.

`load_slide_dataset` returns a `SlideDataset` whose `table` is a `datasets.Dataset` with one row per bag
(`bag_id`, `patient_id`, `slide_ids`, `feature_files`, `label` (pinned int), `split`); `load_bags` reads the
features of some of its rows into memory as `Bag`s, which the MIL heads train on.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

from ...progress import progress_bar
from ..common.data import SPLIT_ALIASES, SPLIT_NAMES
from .bags import FEATURE_SUFFIXES, listing, load_slide_features
from .settings import SlideDataSettings

__all__ = [
    "SlideDataset",
    "SlideSegment",
    "Bag",
    "read_labels_csv",
    "feature_files",
    "patient_splits",
    "load_slide_dataset",
    "load_bags",
]

logger = logging.getLogger(__name__)

_REQUIRED_COLUMNS = ("slide_id", "patient_id", "label")
_PATIENT_ALIAS = "case_id"  # CLAM's and TRIDENT's name for patient_id
_CLAM_BAG_FOLDERS = ("h5_files", "pt_files")  # what CLAM's --feat_dir holds: the same features twice


@dataclass(frozen=True)
class SlideSegment:
    """The rows `start:stop` of a bag that come from one slide, with that slide's coordinates and geometry."""

    slide_id: str
    start: int
    stop: int
    coords: np.ndarray | None  # [stop - start, 2] level-0 top-left (x, y); None from a CLAM .pt bag
    attributes: dict[
        str, Any
    ]  # the feature file's `coords` attributes (patch_size_level0, ...); {} from a .pt


@dataclass
class Bag:
    """One bag in memory: features [N, D] float32, its label, and which slide each row came from."""

    bag_id: str
    label: int
    features: torch.Tensor
    segments: list[SlideSegment] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass
class SlideDataset:
    """The joined table (one row per bag) with its label order and how the splits were made."""

    table: datasets.Dataset
    class_names: tuple[str, ...]
    settings: SlideDataSettings
    split_source: Literal["column", "column+derived val", "derived"]
    features_dir: Path
    labels_csv: Path

    def split(self, name: str) -> datasets.Dataset:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLIT_NAMES}")
        return self.table.select([i for i, split in enumerate(self.table["split"]) if split == name])

    def sizes(self) -> dict[str, dict[str, int]]:
        """Bags, slides and patients of each split."""
        columns = self.table.select_columns(["split", "slide_ids", "patient_id"]).to_dict()
        sizes = {}
        for name in SPLIT_NAMES:
            rows = [i for i, split in enumerate(columns["split"]) if split == name]
            sizes[name] = {
                "bags": len(rows),
                "slides": sum(len(columns["slide_ids"][i]) for i in rows),
                "patients": len({columns["patient_id"][i] for i in rows}),
            }
        return sizes

    def provenance(self) -> dict[str, Any]:
        return {
            "features_dir": str(self.features_dir.resolve()),
            "labels_csv": str(self.labels_csv.resolve()),
            "class_names": list(self.class_names),
            "split_source": self.split_source,
            "split_method": "given"
            if self.split_source == "column"
            else "sklearn.model_selection.StratifiedGroupKFold (groups = patients, stratified by label, "
            "shuffled with split_seed); first fold held out",
            "sizes": self.sizes(),
            **self.settings.to_dict(),
        }


def read_labels_csv(path: str | Path) -> list[dict[str, str]]:
    """The CSV's rows as dicts of stripped strings; checks the columns, empty values and duplicate slides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        found = [c.strip() for c in reader.fieldnames or []]
        if "patient_id" in found and _PATIENT_ALIAS in found:
            raise ValueError(
                f"{path}: has both patient_id and {_PATIENT_ALIAS}, which name the same column; keep one"
            )
        renamed = {_PATIENT_ALIAS: "patient_id"}
        columns = [renamed.get(c, c) for c in found]
        missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing} (has {found}); the labels CSV needs slide_id, "
                f"patient_id (or {_PATIENT_ALIAS}), label and optionally split"
            )
        rows = [
            {renamed.get(k.strip(), k.strip()): (v or "").strip() for k, v in row.items() if k is not None}
            for row in reader
        ]
    if not rows:
        raise ValueError(f"{path}: no rows")
    for column in _REQUIRED_COLUMNS:
        empty = [str(i + 2) for i, row in enumerate(rows) if not row[column]]
        if empty:
            raise ValueError(f"{path}: empty {column} on line(s) {listing(empty)}")
    seen: dict[str, int] = defaultdict(int)
    for row in rows:
        seen[row["slide_id"]] += 1
    duplicated = [slide for slide, count in seen.items() if count > 1]
    if duplicated:
        raise ValueError(f"{path}: slide_id repeated in {listing(duplicated)} rows; one row per slide")
    return rows


def _bags_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in FEATURE_SUFFIXES and p.is_file())


def feature_files(features_dir: str | Path) -> dict[str, Path]:
    """The feature bags of `features_dir` by slide id: `<slide_id>.h5` and `<slide_id>.pt` files, the .h5 one
    where a slide has both (it has coordinates). A folder with no bag but CLAM's `h5_files/` or `pt_files/`
    (CLAM's `--feat_dir`) is read through them, likewise."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise FileNotFoundError(
            f"feature folder not found: {features_dir}; extract features with exaonepath-extract (or TRIDENT, "
            "CLAM)"
        )
    folders = [features_dir]
    if not _bags_in(features_dir):
        folders = [features_dir / name for name in _CLAM_BAG_FOLDERS if (features_dir / name).is_dir()]
    preference = {suffix: rank for rank, suffix in enumerate(FEATURE_SUFFIXES)}
    files: dict[str, Path] = {}
    for path in (p for folder in folders for p in _bags_in(folder)):
        slide_id = path.stem
        known = files.get(slide_id)
        if known is None or preference[path.suffix] < preference[known.suffix]:
            files[slide_id] = path
    return dict(sorted(files.items()))


def _class_order(labels: Sequence[str], class_names: Sequence[str] | None, source: Path) -> tuple[str, ...]:
    found = sorted(set(labels))
    if class_names is None:
        try:
            return tuple(sorted(found, key=int))
        except ValueError:
            return tuple(found)
    unknown = [label for label in found if label not in class_names]
    if unknown:
        raise ValueError(f"{source}: label(s) {unknown} are not among the class names {list(class_names)}")
    return tuple(class_names)


def _stratified_group_holdout(
    labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int, what: str
) -> np.ndarray:
    """Boolean mask of the rows in the first fold of round(1 / fraction) stratified group folds."""
    folds = max(2, round(1 / fraction))
    patients = len(set(groups.tolist()))
    if patients < folds:
        raise ValueError(
            f"{patients} patients cannot be split into {folds} folds to hold out {fraction:.0%} for {what}; "
            "label more patients, raise the fraction or give a split column"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    _, held_out = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held_out] = True
    return mask


def patient_splits(
    patients: Sequence[str],
    labels: Sequence[int],
    val_fraction: float,
    test_fraction: float | None,
    seed: int,
    given: Sequence[str] | None = None,
) -> list[str]:
    """Split name of each row ("train", "val", "test"), whole patients at a time, stratified by label.

    `given` (one of train / val / test per row, or None) keeps its test rows and, when it has val rows, its
    whole split; otherwise val is drawn from the rows not in test. Without `given`, test is drawn first
    (`test_fraction` of the patients), then val (`val_fraction` of all patients).
    """
    patients_array = np.asarray(patients, dtype=object)
    labels_array = np.asarray(labels)
    if given is not None:
        splits = np.asarray(given, dtype=object)
        if "val" in set(given):
            return splits.tolist()
        pool = splits == "train"
        share = val_fraction
    else:
        splits = np.full(len(patients), "train", dtype=object)
        test = _stratified_group_holdout(labels_array, patients_array, test_fraction, seed, "test")
        splits[test] = "test"
        pool = ~test
        share = val_fraction / (1 - test_fraction)
    held = _stratified_group_holdout(labels_array[pool], patients_array[pool], share, seed + 1, "validation")
    pool_rows = np.flatnonzero(pool)
    splits[pool_rows[held]] = "val"
    return splits.tolist()


def _given_splits(rows: list[dict[str, str]], source: Path) -> list[str] | None:
    if not any(row.get("split") for row in rows):
        return None
    names = [SPLIT_ALIASES.get(row.get("split", "").lower(), "") for row in rows]
    unknown = [
        f"{row['slide_id']}={row.get('split', '')!r}"
        for row, name in zip(rows, names, strict=True)
        if not name
    ]
    if unknown:
        raise ValueError(
            f"{source}: split must be train, val or test on every row when the column is used; "
            f"{listing(unknown)} are not"
        )
    if "test" not in names or "train" not in names:
        raise ValueError(
            f"{source}: the split column names no {'test' if 'train' in names else 'train'} slides"
        )
    split_of_patient: dict[str, set[str]] = defaultdict(set)
    for row, name in zip(rows, names, strict=True):
        split_of_patient[row["patient_id"]].add(name)
    shared = [patient for patient, splits in split_of_patient.items() if len(splits) > 1]
    if shared:
        raise ValueError(
            f"{source}: patients with slides in two splits: {listing(shared)}; a patient's slides must "
            "share one split (otherwise the test set leaks into training)"
        )
    return names


def _pooled(rows: list[dict[str, Any]], source: Path) -> list[dict[str, Any]]:
    """One row per (patient, split): the patient's slides in CSV order, their common label."""
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], []).append(row)
    mixed = [p for p, slides in by_patient.items() if len({s["label"] for s in slides}) > 1]
    if mixed:
        raise ValueError(
            f"{source}: patients whose slides have different labels: {listing(mixed)}; patient-level bags "
            "need one label per patient (use --level slide)"
        )
    return [
        {
            "bag_id": patient,
            "patient_id": patient,
            "slide_ids": [s["slide_ids"][0] for s in slides],
            "feature_files": [s["feature_files"][0] for s in slides],
            "label": slides[0]["label"],
            "split": slides[0]["split"],
        }
        for patient, slides in by_patient.items()
    ]


def load_slide_dataset(
    features_dir: str | Path, labels_csv: str | Path, settings: SlideDataSettings | None = None
) -> SlideDataset:
    """Join `labels_csv` to the feature files in `features_dir`, split by patient (module docstring)."""
    settings = settings or SlideDataSettings()
    features_dir, labels_csv = Path(features_dir), Path(labels_csv)
    rows = read_labels_csv(labels_csv)
    files = feature_files(features_dir)
    labelled = {row["slide_id"] for row in rows}
    without_file = sorted(labelled - set(files))
    without_row = sorted(set(files) - labelled)
    problems = []
    if without_file:
        problems.append(
            f"slides in {labels_csv} without a feature file in {features_dir}: {listing(without_file)}"
        )
    if without_row and not settings.allow_extra_features:
        problems.append(
            f"feature files in {features_dir} without a row in {labels_csv}: {listing(without_row)} "
            "(pass --allow_extra_features to ignore them)"
        )
    if problems:
        raise ValueError("; ".join(problems))
    if without_row:
        logger.info("ignoring %d feature files without a labels row", len(without_row))

    class_names = _class_order([row["label"] for row in rows], settings.class_names, labels_csv)
    labels = [class_names.index(row["label"]) for row in rows]
    given = _given_splits(rows, labels_csv)
    splits = patient_splits(
        [row["patient_id"] for row in rows],
        labels,
        settings.val_fraction,
        settings.test_fraction,
        settings.split_seed,
        given=given,
    )
    split_source = "derived" if given is None else ("column" if "val" in given else "column+derived val")
    bags = [
        {
            "bag_id": row["slide_id"],
            "patient_id": row["patient_id"],
            "slide_ids": [row["slide_id"]],
            "feature_files": [str(files[row["slide_id"]])],
            "label": label,
            "split": split,
        }
        for row, label, split in zip(rows, labels, splits, strict=True)
    ]
    if settings.level == "patient":
        bags = _pooled(bags, labels_csv)
    features = datasets.Features(
        {
            "bag_id": datasets.Value("string"),
            "patient_id": datasets.Value("string"),
            "slide_ids": datasets.Sequence(datasets.Value("string")),
            "feature_files": datasets.Sequence(datasets.Value("string")),
            "label": datasets.ClassLabel(names=list(class_names)),
            "split": datasets.Value("string"),
        }
    )
    table = datasets.Dataset.from_list(bags, features=features)
    for name in SPLIT_NAMES:
        present = {class_names[b["label"]] for b in bags if b["split"] == name}
        if len(present) < len(class_names):
            logger.warning("%s split lacks class(es) %s", name, sorted(set(class_names) - present))
    return SlideDataset(table, class_names, settings, split_source, features_dir, labels_csv)


def load_bags(table: datasets.Dataset, desc: str = "bags") -> list[Bag]:
    """The feature bags of `table`'s rows in memory (float32), each with its slides' coordinates."""
    bags, dim = [], None
    for row in progress_bar(iterable=table, desc=desc, unit="bag", enabled=len(table) > 1):
        parts, segments, start = [], [], 0
        for slide_id, path in zip(row["slide_ids"], row["feature_files"], strict=True):
            slide = load_slide_features(path)
            if len(slide) == 0:
                raise ValueError(
                    f"{path}: the feature file has no patches; drop {slide_id} from the labels CSV"
                )
            if not np.isfinite(slide.features).all():
                raise ValueError(f"{path}: features hold NaN or infinite values; re-extract {slide_id}")
            if dim is not None and slide.feature_dim != dim:
                raise ValueError(
                    f"{path}: {slide.feature_dim}-d features, but other files hold {dim}-d ones; all bags "
                    "must come from one encoder"
                )
            dim = slide.feature_dim
            parts.append(slide.features)
            segments.append(SlideSegment(slide_id, start, start + len(slide), slide.coords, slide.attributes))
            start += len(slide)
        features = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])
        bags.append(Bag(row["bag_id"], int(row["label"]), features, segments))
    return bags
