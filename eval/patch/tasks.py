"""Registry of the six linear-probing benchmarks of the EXAONEPath paper (Table 1) plus local imagefolders.

A `TaskSpec` pins everything that makes a probing number reproducible: where the data comes from (hub id
and revision, or a local imagefolder written by `exaonepath-convert-dataset`), which source split plays train / val /
test (with the seeded 80:20 train/val split where the field derives one), the label order (never the
alphabetical order `imagefolder` would pick: MSS=0/MSIMUT=1, HP=0/SSA=1), and where slide and patient
identities live. `load_task` turns a spec into `TaskData`: one `datasets.Dataset` per split with the
columns `image` (undecoded, so one bad file cannot stop a job), `label` (pinned int), `slide_id` and
`patient_id` (empty strings when unknown).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from sklearn.model_selection import train_test_split

from ..common.data import SPLIT_ALIASES, SPLIT_NAMES, load_local_dataset, local_fingerprint

__all__ = [
    "SplitPlan",
    "TaskSpec",
    "TaskData",
    "TASKS",
    "PAPER_TASK_ORDER",
    "PAPER_MEAN_TOP1",
    "get_task",
    "load_task",
    "imagefolder_task",
    "derive_validation_split",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitPlan:
    """Which source split feeds each of train / val / test.

    `val=None` derives the validation split from the training split: `val_fraction` of it, drawn with
    sklearn's `train_test_split(random_state=val_seed)`, stratified by label when `val_stratified`.
    """

    train: str
    test: str
    val: str | None = None
    val_fraction: float = 0.2
    val_seed: int = 42
    val_stratified: bool = True


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: data source, pinned label order, split plan and provenance notes."""

    name: str
    display_name: str
    class_names: tuple[str, ...]
    splits: SplitPlan
    hub_id: str | None = None
    hub_revision: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    # Raw label values (bool, str) of the source mapped to `class_names` entries, for sources whose labels
    # are not already these names.
    label_aliases: Mapping[Any, str] = field(default_factory=dict)
    # For local sets: `exaonepath-convert-dataset <converter> SRC OUT` builds the imagefolder.
    converter: str | None = None
    # Source splits whose images the dataset authors already Macenko-normalized.
    stain_normalized_by_source: tuple[str, ...] = ()
    paper_top1: float | None = None
    notes: str = ""

    @property
    def is_local(self) -> bool:
        return self.hub_id is None

    def label_index(self, raw: Any) -> int:
        """Pinned class index of one raw label value (a class name, an alias, or a bool)."""
        name = self.label_aliases.get(raw, raw)
        if isinstance(name, str) and name in self.class_names:
            return self.class_names.index(name)
        raise ValueError(
            f"task {self.name!r}: label {raw!r} is not one of {list(self.class_names)}"
            f"{' or aliases ' + str(list(self.label_aliases)) if self.label_aliases else ''}; "
            "check the dataset's label column or pass --class_names"
        )

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["label_aliases"] = {str(k): v for k, v in self.label_aliases.items()}
        return record


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="pcam",
            display_name="PCAM",
            class_names=("normal", "metastatic"),
            hub_id="1aurent/PatchCamelyon",
            splits=SplitPlan(train="train", val="valid", test="test"),
            label_aliases={False: "normal", True: "metastatic"},  # 0 == False, 1 == True as keys
            paper_top1=0.901,
            notes="official splits, no WSI overlap; slide ids (Zenodo meta CSV `wsi`) are not in the hub copy",
        ),
        TaskSpec(
            name="mhist",
            display_name="MHIST",
            class_names=("HP", "SSA"),
            converter="mhist",
            splits=SplitPlan(train="train", test="test", val_fraction=0.2, val_seed=42, val_stratified=False),
            paper_top1=0.818,
            notes="research-use agreement, no hub copy; val = train_test_split(train_size=0.8, random_state=42)",
        ),
        TaskSpec(
            name="crc100k",
            display_name="CRC-100K",
            class_names=("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"),
            hub_id="1aurent/NCT-CRC-HE",
            splits=SplitPlan(train="NCT_CRC_HE_100K", test="CRC_VAL_HE_7K", val_seed=42),
            stain_normalized_by_source=("NCT_CRC_HE_100K", "CRC_VAL_HE_7K"),
            paper_top1=0.946,
            notes="NCT-CRC-HE-100K and CRC-VAL-HE-7K were Macenko-normalized by their authors "
            "(NCT_CRC_HE_100K_NONORM is the raw copy); val = stratified 80:20 of train",
        ),
        TaskSpec(
            name="til",
            display_name="TIL",
            class_names=("til-negative", "til-positive"),
            converter="til",
            splits=SplitPlan(train="train", val="val", test="test"),
            label_aliases={"0": "til-negative", "1": "til-positive", 0: "til-negative", 1: "til-positive"},
            paper_top1=0.939,
            notes="Zenodo 6604094 partitions; slide id = TCGA barcode",
        ),
        TaskSpec(
            name="msi_crc",
            display_name="MSI-CRC",
            class_names=("MSS", "MSIMUT"),
            converter="msi_crc",
            splits=SplitPlan(train="train", test="test", val_seed=42),
            paper_top1=0.756,
            notes="Zenodo 2530835 CRC_DX; patient-level official train/test; val = stratified 80:20 of train",
        ),
        TaskSpec(
            name="msi_stad",
            display_name="MSI-STAD",
            class_names=("MSS", "MSIMUT"),
            converter="msi_stad",
            splits=SplitPlan(train="train", test="test", val_seed=42),
            paper_top1=0.804,
            notes="Zenodo 2530835 STAD; patient-level official train/test; val = stratified 80:20 of train",
        ),
    )
}
PAPER_TASK_ORDER = ("pcam", "mhist", "crc100k", "til", "msi_crc", "msi_stad")
PAPER_MEAN_TOP1 = 0.861


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} or 'imagefolder'") from None


def imagefolder_task(
    data_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    val_seed: int = 42,
    name: str = "imagefolder",
) -> TaskSpec:
    """A spec for any local imagefolder (class subfolders, or a metadata.csv with `file_name,label[,split,...]`).

    Without `class_names` the label order is the sorted set of labels found, which is what imagefolder
    itself does; pass it to pin another order.
    """
    return TaskSpec(
        name=name,
        display_name=Path(data_dir).name,
        class_names=tuple(class_names or ()),
        splits=SplitPlan(train="train", test="test", val_fraction=val_fraction, val_seed=val_seed),
        converter="imagefolder",
        notes=f"local imagefolder {Path(data_dir).resolve()}",
    )


@dataclass
class TaskData:
    """A loaded task: per-split datasets with `image`, `label`, `slide_id`, `patient_id` columns."""

    spec: TaskSpec
    splits: dict[str, datasets.Dataset]
    class_names: tuple[str, ...]
    dataset_id: str
    dataset_revision: str
    provenance: dict[str, Any]

    def fingerprint(self, split: str) -> str:
        return self.splits[split]._fingerprint


def derive_validation_split(
    labels: Sequence[int], fraction: float, seed: int, stratified: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of the field's seeded 80:20-style split, via sklearn's train_test_split."""
    indices = np.arange(len(labels))
    try:
        train_idx, val_idx = train_test_split(
            indices,
            test_size=fraction,
            random_state=seed,
            stratify=np.asarray(labels) if stratified else None,
        )
    except ValueError as error:  # e.g. too few images per class for a stratified split
        raise ValueError(
            f"cannot hold out {fraction:.0%} of {len(labels)} images"
            f"{' stratified by class' if stratified else ''}: {error}; use a larger fraction or more images"
        ) from error
    return np.sort(train_idx), np.sort(val_idx)


def _load_local(root: Path, cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """All images of a local imagefolder as one dataset with a `split` column ("" when the layout has none)."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"data directory {root} does not exist; build it with `exaonepath-convert-dataset` or pass --data_dir"
        )
    loaded = load_local_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
    parts = []
    for source_split, part in loaded.items():
        if "label" not in part.column_names:
            raise ValueError(
                f"{root}: no labels found; use class subfolders (optionally under train/ val/ test/) or a "
                "metadata.csv with columns file_name,label[,split,slide_id,patient_id]"
            )
        if isinstance(part.features["label"], datasets.ClassLabel):
            names = part.features["label"].names
            folder_labels = [names[i] for i in part["label"]]
            part = part.remove_columns("label").add_column("label", folder_labels)
        if "split" not in part.column_names:
            split_name = source_split if len(loaded) > 1 else ""
            part = part.add_column("split", [split_name] * len(part))
        parts.append(part)
    combined = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return combined.cast_column("image", datasets.Image(decode=False))


def _standardize(ds: datasets.Dataset, spec: TaskSpec, class_names: tuple[str, ...]) -> datasets.Dataset:
    """Rename and map columns to image / label (pinned int) / slide_id / patient_id."""
    if spec.image_column != "image":
        ds = ds.rename_column(spec.image_column, "image")
    if spec.label_column != "label":
        ds = ds.rename_column(spec.label_column, "label")
    raw = ds["label"]
    label_feature = ds.features["label"]
    if isinstance(label_feature, datasets.ClassLabel):
        raw = [label_feature.names[i] for i in raw]
    pinned = dataclasses.replace(spec, class_names=class_names)
    index_of = {value: pinned.label_index(value) for value in set(raw)}
    ds = ds.remove_columns("label").add_column("label", [index_of[v] for v in raw])
    for column in ("slide_id", "patient_id"):
        if column not in ds.column_names:
            ds = ds.add_column(column, [""] * len(ds))
        else:
            values = ["" if v is None else str(v) for v in ds[column]]
            ds = ds.remove_columns(column).add_column(column, values)
    keep = ["image", "label", "slide_id", "patient_id"]
    ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
    return ds.cast_column("image", datasets.Image(decode=False))


@dataclass
class _RawSplits:
    """What the local and hub loaders hand to `load_task`: source splits before standardization."""

    splits: dict[str, datasets.Dataset]
    class_names: tuple[str, ...]
    dataset_id: str
    dataset_revision: str
    provenance: dict[str, Any]


def _local_splits(
    spec: TaskSpec,
    data_dir: str | os.PathLike | None,
    test_fraction: float | None,
    cache_dir: str | os.PathLike | None,
) -> _RawSplits:
    if data_dir is None:
        raise ValueError(
            f"task {spec.name!r} has no hub copy: pass --data_dir with the imagefolder built by "
            f"`exaonepath-convert-dataset {spec.converter} SRC OUT`"
        )
    root = Path(data_dir)
    everything = _load_local(root, cache_dir)
    provenance: dict[str, Any] = {}
    raw_labels = everything["label"]
    class_names = spec.class_names or tuple(sorted(set(raw_labels)))
    split_of = [SPLIT_ALIASES.get(str(s).lower(), "") for s in everything["split"]]
    sources = {name: [i for i, s in enumerate(split_of) if s == name] for name in SPLIT_NAMES}
    if not sources["test"]:
        if not test_fraction:
            raise ValueError(
                f"{root}: no test split (a `split` column or a test/ folder); pass --test_fraction to "
                "hold out a stratified share of the images"
            )
        pool = sources["train"] or [i for i, s in enumerate(split_of) if s in ("", "train")]
        train_part, test_part = derive_validation_split(
            [raw_labels[i] for i in pool], test_fraction, spec.splits.val_seed, stratified=True
        )
        sources["train"], sources["test"] = [pool[i] for i in train_part], [pool[i] for i in test_part]
        provenance["derived_test"] = {"fraction": test_fraction, "seed": spec.splits.val_seed}
    elif not sources["train"]:
        raise ValueError(f"{root}: no training images (split column / train folder) found")
    return _RawSplits(
        splits={name: everything.select(idx) for name, idx in sources.items() if idx},
        class_names=class_names,
        dataset_id=str(root.resolve()),
        dataset_revision=local_fingerprint(root),
        provenance=provenance,
    )


def _hub_splits(spec: TaskSpec, revision: str | None, cache_dir: str | os.PathLike | None) -> _RawSplits:
    loaded = datasets.load_dataset(spec.hub_id, revision=revision or spec.hub_revision, cache_dir=cache_dir)
    plan = spec.splits
    wanted = {"train": plan.train, "test": plan.test, **({"val": plan.val} if plan.val else {})}
    missing = [source for source in wanted.values() if source not in loaded]
    if missing:
        raise ValueError(f"{spec.hub_id}: splits {missing} not found (has {list(loaded)})")
    return _RawSplits(
        splits={ours: loaded[source] for ours, source in wanted.items()},
        class_names=spec.class_names,
        dataset_id=spec.hub_id,
        dataset_revision=revision or spec.hub_revision or "main",
        provenance={
            "stain_normalized_by_source": {
                ours: source in spec.stain_normalized_by_source for ours, source in wanted.items()
            }
        },
    )


def load_task(
    spec: TaskSpec,
    data_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    test_fraction: float | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> TaskData:
    """Load a task's train / val / test splits with pinned labels (see the module docstring).

    `cache_dir` is the `datasets` cache (default: `HF_DATASETS_CACHE`).
    """
    raw = (
        _local_splits(spec, data_dir, test_fraction, cache_dir)
        if spec.is_local
        else _hub_splits(spec, revision, cache_dir)
    )
    provenance = raw.provenance
    splits = {name: _standardize(ds, spec, raw.class_names) for name, ds in raw.splits.items()}
    provenance["derived_val"] = "val" not in splits
    if "val" not in splits:
        plan = spec.splits
        train_idx, val_idx = derive_validation_split(
            splits["train"]["label"], plan.val_fraction, plan.val_seed, plan.val_stratified
        )
        splits["val"] = splits["train"].select(val_idx)
        splits["train"] = splits["train"].select(train_idx)
        provenance["val_split"] = {
            "fraction": plan.val_fraction,
            "seed": plan.val_seed,
            "stratified": plan.val_stratified,
            "how": "sklearn.model_selection.train_test_split",
        }
    provenance["sizes"] = {name: len(ds) for name, ds in splits.items()}
    return TaskData(
        spec=spec,
        splits={name: splits[name] for name in SPLIT_NAMES},
        class_names=raw.class_names,
        dataset_id=raw.dataset_id,
        dataset_revision=raw.dataset_revision,
        provenance=provenance,
    )
