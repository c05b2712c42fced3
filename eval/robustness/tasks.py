"""Robustness tasks (`exaonepath-robustness --task NAME`): images with a biological class, a centre (site,
lab, scanner, staining) and a case, so that "does the encoder follow the site or the tissue" is measurable."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from ...tiling.output import resolve_shards
from ..common.data import load_local_dataset, local_fingerprint
from .grouped_images import files_fingerprint

__all__ = [
    "RobustnessTaskSpec",
    "RobustnessTaskData",
    "ROBUSTNESS_TASKS",
    "get_robustness_task",
    "load_robustness_task",
]

logger = logging.getLogger(__name__)


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
    """The task's rows (hub, or a local copy: a folder laid out like the hub repo, parquet files, or an
    `exaonepath-tile` output folder)."""
    if data_dir is None:
        revision = revision or spec.hub_revision
        loaded = datasets.load_dataset(spec.hub_id, split=spec.split, revision=revision, cache_dir=cache_dir)
        return loaded, spec.hub_id, revision or "main"
    text = str(data_dir)
    files = resolve_shards(text)  # a tiling output (or a glob into one): only the shards of complete slides
    if files is not None:
        if not files:
            raise FileNotFoundError(f"no parquet files match {text}")
        loaded = load_local_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)
        return loaded, os.path.abspath(text), files_fingerprint(files)
    root = Path(text)
    if not root.is_dir():
        raise FileNotFoundError(f"local copy of {spec.hub_id} not found: {root}")
    loaded = load_local_dataset(str(root), split=spec.split, cache_dir=cache_dir)
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
