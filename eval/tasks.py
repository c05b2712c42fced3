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
import glob
import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from sklearn.model_selection import train_test_split

__all__ = [
    "SPLIT_NAMES",
    "SPLIT_ALIASES",
    "SplitPlan",
    "TaskSpec",
    "TaskData",
    "TASKS",
    "PAPER_TASK_ORDER",
    "PAPER_MEAN_TOP1",
    "get_task",
    "load_task",
    "imagefolder_task",
    "parse_tcga_ids",
    "derive_validation_split",
    "local_fingerprint",
    "RobustnessTaskSpec",
    "RobustnessTaskData",
    "ROBUSTNESS_TASKS",
    "get_robustness_task",
    "load_robustness_task",
]

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
# Split names a local metadata.csv or folder layout may use, mapped to ours.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
_TCGA_SLIDE = re.compile(r"(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(-[0-9]{2}[A-Z]?-[0-9]{2}-[A-Z0-9]{2,4})?")


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


def parse_tcga_ids(text: str) -> tuple[str, str]:
    """(slide id, patient id) from a TCGA barcode anywhere in `text`; ("", "") when there is none.

    `blk-ABCD-TCGA-AA-3516-01Z-00-DX1.png` -> ("TCGA-AA-3516-01Z-00-DX1", "TCGA-AA-3516").
    """
    match = _TCGA_SLIDE.search(text)
    if match is None:
        return "", ""
    return match.group(0), match.group(1)


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


def local_fingerprint(root: Path) -> str:
    """Content identity of a local imagefolder: relative paths, sizes and mtimes of every file."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _load_local(root: Path, cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """All images of a local imagefolder as one dataset with a `split` column ("" when the layout has none)."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"data directory {root} does not exist; build it with `exaonepath-convert-dataset` or pass --data_dir"
        )
    loaded = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
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


# ---------------------------------------------------------------------------------------------------------
# Robustness tasks (`exaonepath-robustness --task NAME`): images with a biological class, a centre (site,
# lab, scanner, staining) and a case, so that "does the encoder follow the site or the tissue" is measurable.


@dataclass(frozen=True)
class RobustnessTaskSpec:
    """A data set of `exaonepath-robustness`: where it lives and which source column plays which role.

    `label_column` is the biological class (None: the set has none, and the robustness index and clustering
    score are undefined on it), `center_column` the non-biological source, `case_column` the unit whose
    samples a query never gets as neighbours, `slide_column` the slide (default: the case), `pair_column`
    the identity of the same tissue under several conditions (`pair_pattern`, a regular expression with one
    group, extracts it from the column's values). Rows whose column in `exclude` holds one of the listed
    values are left out when the source has that column. `k` is the field's robustness-index k for the set.
    """

    name: str
    display_name: str
    hub_id: str
    license: str
    center_column: str
    case_column: str
    split: str = "train"
    hub_revision: str | None = None
    image_column: str = "image"
    label_column: str | None = None
    slide_column: str | None = None
    pair_column: str | None = None
    pair_pattern: str | None = None
    exclude: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    k: int = 11
    notes: str = ""


ROBUSTNESS_TASKS: dict[str, RobustnessTaskSpec] = {
    spec.name: spec
    for spec in (
        # Verified (search tool) in bifold-pathomics/PathoROB: features/extract_features.py loads
        # `load_dataset("bifold-pathomics/PathoROB-camelyon", split="train")` (one split; one shard
        # data/train-00000-of-00001.parquet, ~467 MB) and keeps every non-image column as metadata; the
        # metadata columns are subset, slide_id, patch_id, biological_class, medical_center
        # (features/data_manager.py METADATA_COLUMNS, data/metadata/camelyon.csv); other users of the hub
        # parquet read image, slide_id, patch_id, biological_class and medical_center from it directly.
        # Classes normal/tumor; `subset` is ID for RUMC and UMCU and OOD for the other Camelyon17 centres
        # (CWZ, RST, LPON), and robustness_index.get_meta drops the OOD rows before scoring; PathoROB
        # leaves the query's own slide out of its neighbours and uses k = 11 on this set.
        RobustnessTaskSpec(
            name="pathorob-camelyon",
            display_name="PathoROB Camelyon",
            hub_id="bifold-pathomics/PathoROB-camelyon",
            license="CC0-1.0",
            label_column="biological_class",
            center_column="medical_center",
            case_column="slide_id",
            exclude={"subset": ("OOD",)},
            k=11,
            notes="PathoROB (Kömen et al., arXiv 2507.17845) camelyon subset from CAMELYON16/17; "
            "in-domain centres only when the copy has PathoROB's `subset` column",
        ),
        # Verified (search tool) in owkin/plism-benchmark: engine/extract/extract_from_png.py streams
        # `load_dataset("owkin/plism-dataset-tiles", split="train")` whose rows are {"slide_id", "tile_id",
        # "png"}: 91 slides (13 stainings x 7 scanners, slide_id "<staining>_<scanner>_..._to_GMH_S60.tif")
        # x 16,278 registered tiles, sorted by slide; tile_id ends in "_<level>_<x>_<y>", the same location
        # on every slide (extract/utils.py reads tile_id.split("_")[1:] as the coordinates). CC-BY-4.0.
        # No class labels: the robustness index is undefined, paired retrieval is the point.
        RobustnessTaskSpec(
            name="plism",
            display_name="PLISM",
            hub_id="owkin/plism-dataset-tiles",
            license="CC-BY-4.0",
            image_column="png",
            center_column="slide_id",
            case_column="slide_id",
            pair_column="tile_id",
            pair_pattern=r"_(\d+_\d+_\d+)$",
            notes="PLISM (Ochi et al., 2024) as registered by owkin's plism-benchmark; 1.48M tiles "
            "(every slide is one staining x scanner condition); no class labels",
        ),
    )
}


def get_robustness_task(name: str) -> RobustnessTaskSpec:
    try:
        return ROBUSTNESS_TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown robustness task {name!r}; choose one of {sorted(ROBUSTNESS_TASKS)}"
        ) from None


@dataclass
class RobustnessTaskData:
    """A loaded robustness task: one dataset with `image` (undecoded) and the string columns `label`,
    `center`, `case_id`, `slide_id`, `pair_id` ("" where the task has no such role)."""

    spec: RobustnessTaskSpec
    dataset: datasets.Dataset
    dataset_id: str
    dataset_revision: str
    provenance: dict[str, Any]


def _robustness_source(
    spec: RobustnessTaskSpec, data_dir: str | os.PathLike | None, revision: str | None, cache_dir
) -> tuple[datasets.Dataset, str, str]:
    """The task's rows (hub, or a local copy: a folder laid out like the hub repo, or parquet files)."""
    if data_dir is None:
        revision = revision or spec.hub_revision
        loaded = datasets.load_dataset(spec.hub_id, split=spec.split, revision=revision, cache_dir=cache_dir)
        return loaded, spec.hub_id, revision or "main"
    text = str(data_dir)
    if text.endswith(".parquet") or glob.has_magic(text):
        files = sorted(glob.glob(text))
        if not files:
            raise FileNotFoundError(f"no parquet files match {text}")
        loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
        digest = hashlib.sha256("".join(f"{f}:{os.stat(f).st_size}" for f in files).encode()).hexdigest()[:16]
        return loaded, os.path.abspath(text), digest
    root = Path(text)
    if not root.is_dir():
        raise FileNotFoundError(f"local copy of {spec.hub_id} not found: {root}")
    loaded = datasets.load_dataset(str(root), split=spec.split, cache_dir=cache_dir)
    return loaded, str(root.resolve()), local_fingerprint(root)


def load_robustness_task(
    spec: RobustnessTaskSpec,
    data_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> RobustnessTaskData:
    """Load a robustness task from the hub, or from a local copy with the same columns (`data_dir`)."""
    loaded, dataset_id, dataset_revision = _robustness_source(spec, data_dir, revision, cache_dir)
    roles = {
        "image": spec.image_column,
        "label": spec.label_column,
        "center": spec.center_column,
        "case_id": spec.case_column,
        "slide_id": spec.slide_column,
        "pair_id": spec.pair_column,
    }
    missing = [column for column in roles.values() if column and column not in loaded.column_names]
    if missing:
        raise ValueError(
            f"{dataset_id} ({spec.name}): no column(s) {missing} (has {loaded.column_names}); a local copy "
            f"needs the hub copy's columns"
        )
    provenance: dict[str, Any] = {"license": spec.license, "rows_in_source": len(loaded), "excluded": {}}
    for column, values in spec.exclude.items():
        if column not in loaded.column_names:
            logger.warning(
                "%s has no %r column: no rows with %s %s left out", dataset_id, column, column, values
            )
            continue
        before = len(loaded)
        loaded = loaded.filter(
            lambda value, dropped: str(value) not in dropped,
            input_columns=column,
            fn_kwargs={"dropped": values},
        )
        provenance["excluded"][column] = {"values": list(values), "rows": before - len(loaded)}
    if len(loaded) == 0:
        raise ValueError(f"{dataset_id} ({spec.name}): no rows left")
    text = {
        role: ["" if value is None else str(value) for value in loaded[column]]
        for role, column in roles.items()
        if column and role != "image"
    }
    if spec.pair_pattern and "pair_id" in text:
        pattern = re.compile(spec.pair_pattern)
        matches = [pattern.search(value) for value in text["pair_id"]]
        unmatched = next((v for v, m in zip(text["pair_id"], matches, strict=True) if m is None), None)
        if unmatched is not None:
            raise ValueError(
                f"{dataset_id} ({spec.name}): {spec.pair_column} value {unmatched!r} does not match "
                f"{spec.pair_pattern!r}"
            )
        text["pair_id"] = [m.group(1) for m in matches]
    text.setdefault("slide_id", text["case_id"])
    # the images stay in the source's arrow table (PLISM does not fit in memory); only the roles are rebuilt
    dataset = loaded.cast_column(spec.image_column, datasets.Image(decode=False))
    dataset = dataset.remove_columns([c for c in dataset.column_names if c != spec.image_column])
    if spec.image_column != "image":
        dataset = dataset.rename_column(spec.image_column, "image")
    for role in ("label", "center", "case_id", "slide_id", "pair_id"):
        dataset = dataset.add_column(role, text.get(role, [""] * len(dataset)))
    provenance["rows"] = len(dataset)
    return RobustnessTaskData(spec, dataset, dataset_id, dataset_revision, provenance)
