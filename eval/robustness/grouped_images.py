"""Images with a group id and their metadata, from any layout the evaluations read.

`load_grouped_images(data, group_by)` accepts:
- a folder of images: a `metadata.csv` imagefolder (`file_name` plus any columns: `label`, `slide_id`,
  `center`, ...), or plain files / one subfolder per group (`group_by="folder"` or `"file"`);
- an `exaonepath-tile` output folder or its `shards/`, a parquet file or a parquet glob (of a tiling output, only
  the shards of its complete slides: `tiling.resolve_shards`).

`tile=SIZE` cuts every image into a grid of SIZE x SIZE tiles first (for a few large images per slide). The
result's `dataset` has the columns `extract_features` reads (`image` undecoded, `label` as an int, -1 when
unknown, `slide_id` holding the group, `patient_id`); `columns` keeps every metadata column of the source as
strings, row-aligned, so that an evaluation can check for and read the ones it needs.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from ...images import image_files, open_rgb
from ...tiling.output import resolve_shards
from ..common.data import load_local_dataset, local_fingerprint

__all__ = ["GroupedImages", "files_fingerprint", "parquet_files", "load_grouped_images"]

logger = logging.getLogger(__name__)

#: The parquet files `--data` names, or None (a folder of images): tiling's one resolver, which keeps only the
#: shards of the slides a tiling run completed.
parquet_files = resolve_shards


@dataclass
class GroupedImages:
    """Images with a group id in `slide_id` (and `label`, -1 when unknown), ready for `extract_features`.

    `columns` holds every metadata column of the source (`label` as its original names), `file_names` a
    name per row (its path relative to the folder, or a shard row's slide and position), both row-aligned
    with `dataset`.
    """

    dataset: datasets.Dataset
    fingerprint: str
    has_labels: bool
    source: str
    columns: dict[str, list[str]]
    file_names: list[str]


def _group_of(path: Path, root: Path, group_by: str) -> str:
    if group_by == "file":
        return path.stem
    # tiles at the top level have no folder of their own: each is its own group (then left out as a singleton)
    return path.parent.name if path.parent != root else path.stem


def _tiles(image: dict[str, Any], size: int) -> list[bytes]:
    rgb = open_rgb(image)
    width, height = rgb.size
    tiles = []
    for top in range(0, height - size + 1, size):
        for left in range(0, width - size + 1, size):
            buffer = io.BytesIO()
            rgb.crop((left, top, left + size, top + size)).save(buffer, format="PNG")
            tiles.append(buffer.getvalue())
    return tiles


@dataclass
class _Images:
    """Undecoded images with their group, metadata columns and names, before tiling."""

    images: list[dict[str, Any]]
    groups: list[str]
    columns: dict[str, list[str]]
    file_names: list[str]
    fingerprint: str


def _as_strings(values: list[Any]) -> list[str]:
    return ["" if value is None else str(value) for value in values]


def files_fingerprint(files: list[str]) -> str:
    """A short digest of the names and sizes of `files`: it changes when the set of files or one of them does."""
    return hashlib.sha256("".join(f"{f}:{os.stat(f).st_size}" for f in files).encode()).hexdigest()[:16]


def _parquet_images(files: list[str], group_by: str, data: str | os.PathLike) -> _Images:
    if not files:
        raise ValueError(f"no parquet shards found for {data}")
    table = load_local_dataset("parquet", data_files=files, split="train")
    fingerprint = files_fingerprint(files)
    if group_by not in table.column_names:
        raise ValueError(f"{data}: no column {group_by!r} (has {table.column_names})")
    images = table.cast_column("image", datasets.Image(decode=False))["image"]
    columns = {name: _as_strings(table[name]) for name in table.column_names if name != "image"}
    groups = columns[group_by]
    names = [
        image.get("path") or f"{group}#{index}"
        for index, (image, group) in enumerate(zip(images, groups, strict=True))
    ]
    return _Images(images, groups, columns, names, fingerprint)


def _folder_images(root: Path, group_by: str) -> _Images:
    fingerprint = local_fingerprint(root)
    if not (root / "metadata.csv").is_file():
        if group_by not in ("folder", "file"):
            raise ValueError(f"{root} has no metadata.csv: group by 'folder' or 'file', not {group_by!r}")
        paths = image_files(root)
        return _Images(
            images=[{"bytes": None, "path": str(p)} for p in paths],
            groups=[_group_of(p, root, group_by) for p in paths],
            columns={},
            file_names=[str(p.relative_to(root)) for p in paths],
            fingerprint=fingerprint,
        )
    table = load_local_dataset("imagefolder", data_dir=str(root), split="train")
    images = table.cast_column("image", datasets.Image(decode=False))["image"]
    columns = {}
    for name in table.column_names:
        if name == "image":
            continue
        feature = table.features[name]
        values = table[name]
        columns[name] = (
            [feature.names[v] for v in values]
            if isinstance(feature, datasets.ClassLabel)
            else _as_strings(values)
        )
    if group_by in ("folder", "file"):
        groups = [_group_of(Path(i["path"]), root, group_by) for i in images]
    elif group_by in columns:
        groups = columns[group_by]
    else:
        raise ValueError(f"{root}/metadata.csv has no column {group_by!r} (has {sorted(columns)})")
    names = [str(Path(i["path"]).resolve().relative_to(root.resolve())) for i in images]
    return _Images(images, groups, columns, names, fingerprint)


def _tile_images(found: _Images, tile: int) -> _Images:
    images, groups, names, rows = [], [], [], []
    for index, image in enumerate(found.images):
        pieces = _tiles(image, tile)
        if not pieces:
            logger.warning("%s is smaller than --tile %d; left out", image.get("path") or index, tile)
        images += [{"bytes": piece, "path": None} for piece in pieces]
        groups += [found.groups[index]] * len(pieces)
        names += [f"{found.file_names[index]}#tile{piece}" for piece in range(len(pieces))]
        rows += [index] * len(pieces)
    columns = {name: [values[row] for row in rows] for name, values in found.columns.items()}
    return _Images(images, groups, columns, names, f"{found.fingerprint}-tile{tile}")


def load_grouped_images(data: str | os.PathLike, group_by: str, tile: int | None = None) -> GroupedImages:
    """Images of `data` with their group (see the module docstring for the accepted layouts)."""
    files = resolve_shards(data)
    if files is not None:
        found = _parquet_images(files, group_by, data)
    elif Path(data).is_dir():
        found = _folder_images(Path(data), group_by)
    else:
        raise FileNotFoundError(f"--data {data} is neither a folder of images nor parquet shards")
    if not found.images:
        raise ValueError(f"no images found in {data}")
    if tile:
        found = _tile_images(found, tile)
    labels = found.columns.get("label")
    index_of = {name: index for index, name in enumerate(sorted(set(labels or ())))}
    label_index = [index_of[v] for v in labels] if labels is not None else [-1] * len(found.images)
    dataset = datasets.Dataset.from_dict(
        {
            "image": found.images,
            "label": label_index,
            "slide_id": found.groups,
            "patient_id": [""] * len(found.images),
        },
        features=datasets.Features(
            {
                "image": datasets.Image(decode=False),
                "label": datasets.Value("int64"),
                "slide_id": datasets.Value("string"),
                "patient_id": datasets.Value("string"),
            }
        ),
    )
    source = str(Path(data).resolve()) if not glob.has_magic(str(data)) else os.path.abspath(str(data))
    return GroupedImages(
        dataset,
        f"{found.fingerprint}-{group_by}",
        labels is not None,
        source,
        found.columns,
        found.file_names,
    )
