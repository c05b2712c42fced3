"""The output folder of `exaonepath-tile` as its readers see it: slide records, manifests, coordinate files,
which shards are complete, and a slide's patches.

The folder's layout is described in `pipeline`. Training, evaluation and the demo read tiling output through
this module only, never by file names or JSON keys of their own, so that the format has one owner.

Shards are listed with `resolve_shards` (or read with `load_patch_dataset`), never with a glob over
`shards/*.parquet`: a run killed while publishing a slide's shards can leave some of them in place until the
slide is re-tiled, and only the shards the manifests list are complete.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ..atomic_io import atomic_write_bytes
from ..images import open_rgb
from .config import TilingConfig
from .ranks import record_files

__all__ = [
    "COORDS_COLUMNS",
    "PatchCoords",
    "ShardPatches",
    "SlideFailure",
    "SlideRecord",
    "TiledSlide",
    "TilingManifest",
    "load_patch_dataset",
    "read_coords_csv",
    "read_manifest",
    "resolve_shards",
    "tiling_output_folder",
    "write_coords_csv",
]

MANIFEST_VERSION = 1

#: The header of coords/<slide_id>.csv.
COORDS_COLUMNS = ("x", "y", "level", "size", "mpp", "tissue_fraction")

_SEQUENCE_FIELDS = ("dimensions", "shards", "shard_rows")


@dataclass(frozen=True)
class SlideRecord:
    """A complete slide: `slides/<slide_id>.json`, and the slide's entry in the manifests."""

    slide_id: str
    path: str  # the slide file, absolute
    reader: str  # the slide reader class that read it
    dimensions: tuple[int, int]  # level-0 width, height
    level_count: int
    slide_mpp: float  # level-0 µm/px
    mpp_source: str  # "metadata" or "fallback"
    patch_size_level0: int  # patch side in level-0 pixels
    read_level: int  # pyramid level the patch pixels are read from
    stored_patch_size: int  # side of a stored patch in pixels
    stored_mpp: float  # µm per stored pixel
    num_candidates: int  # whole grid patches inside the slide
    num_patches: int  # patches kept (rows of the shards and of the coordinates file)
    tissue_threshold: int  # saturation threshold of the tissue mask
    tissue_area_fraction: float  # tissue share of the detection view
    shards: tuple[str, ...]  # file names in shards/, in part order; empty when images are not written
    shard_rows: tuple[int, ...]  # rows of each shard
    coords: str  # coordinates file, relative to the output folder (posix)
    thumbnail: str  # thumbnail PNG, relative to the output folder (posix)
    seconds: float  # time the slide took to tile

    def to_dict(self) -> dict[str, Any]:
        """The record as its JSON file holds it."""
        values = asdict(self)
        for name in _SEQUENCE_FIELDS:
            values[name] = list(values[name])
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SlideRecord:
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(values)), sorted(set(values) - names)
        if missing or unknown:
            raise ValueError(
                f"slide record {values.get('slide_id')!r} lacks {missing} and has unknown {unknown}: it was "
                "written by another version of exaonepath-tile; re-tile the slide into a new folder"
            )
        return cls(**{**values, **{name: tuple(values[name]) for name in _SEQUENCE_FIELDS}})


@dataclass(frozen=True)
class SlideFailure:
    """A slide a run could not tile, and why (an entry of failures.json and of the manifests)."""

    slide_id: str
    path: str
    error: str
    message: str


@dataclass(frozen=True)
class TilingManifest:
    """The settings a folder was tiled with, its complete slides (by id, sorted) and the slides that failed."""

    config: TilingConfig
    slides: dict[str, SlideRecord]
    failures: list[SlideFailure]

    @property
    def num_patches(self) -> int:
        return sum(record.num_patches for record in self.slides.values())

    @property
    def num_shards(self) -> int:
        return sum(len(record.shards) for record in self.slides.values())

    def to_dict(self) -> dict[str, Any]:
        """The manifest as its JSON file holds it (the run that writes it adds its rank and world size)."""
        return {
            "format_version": MANIFEST_VERSION,
            "config": self.config.to_dict(),
            "num_slides": len(self.slides),
            "num_patches": self.num_patches,
            "num_shards": self.num_shards,
            "slides": {slide_id: record.to_dict() for slide_id, record in self.slides.items()},
            "failures": [asdict(failure) for failure in self.failures],
        }


def tiling_output_folder(path: str | os.PathLike) -> Path | None:
    """The `exaonepath-tile` output folder that `path` is, or whose `shards/` folder it is; else None."""
    path = Path(path)
    for folder in (path, path.parent) if path.name == "shards" else (path,):
        if record_files(folder, "manifest") and (folder / "shards").is_dir():
            return folder
    return None


def _manifest_files(out_dir: str | os.PathLike) -> tuple[Path, list[dict[str, Any]]]:
    """The output folder `out_dir` is (or whose `shards/` it is) and the JSON of each of its manifests."""
    out_dir = tiling_output_folder(out_dir) or Path(out_dir)
    paths = record_files(out_dir, "manifest")
    if not paths:
        raise FileNotFoundError(
            f"{out_dir / 'manifest.json'} not found: run exaonepath-tile with --out {out_dir} first"
        )
    return out_dir, [json.loads(path.read_text()) for path in paths]


def _merged_slides(manifests: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {slide_id: record for manifest in manifests for slide_id, record in manifest["slides"].items()}


def read_manifest(out_dir: str | os.PathLike) -> TilingManifest:
    """The tiling manifest of `out_dir` (or of the folder whose `shards/` it is): manifest.json merged with the
    manifest.rank-NNNNN.json of every rank that tiled into the folder.

    `slides` is the union of the complete slides the files list; `failures` the failed slides none of them
    lists as complete. Every reader of tiling output goes through this, so each sees the slides of all ranks.
    """
    out_dir, manifests = _manifest_files(out_dir)
    slides = _merged_slides(manifests)
    failures = {failure["slide_id"]: failure for manifest in manifests for failure in manifest["failures"]}
    config = next((manifest["config"] for manifest in manifests if manifest.get("config")), None)
    if config is None:
        raise ValueError(f"no manifest of {out_dir} records the tiling settings: re-tile into a new folder")
    return TilingManifest(
        config=TilingConfig.from_dict(config),
        slides={slide_id: SlideRecord.from_dict(slides[slide_id]) for slide_id in sorted(slides)},
        failures=[SlideFailure(**failures[key]) for key in sorted(failures) if key not in slides],
    )


def _complete_shards(out_dir: str | os.PathLike) -> list[str]:
    """The shard files of every slide the manifests of a tiling output list as complete, sorted."""
    out_dir, manifests = _manifest_files(out_dir)
    # Only the shard lists are read: which shards are complete depends on no other field of a record.
    slides = _merged_slides(manifests).values()
    return sorted(str(out_dir / "shards" / name) for record in slides for name in record["shards"])


def _complete_only(files: Sequence[str]) -> list[str]:
    """`files` without the shards of a tiling output that its manifests do not list; order kept."""
    complete: dict[Path, set[str]] = {}
    kept = []
    for file in files:
        folder = tiling_output_folder(Path(file).parent)
        if folder is not None and folder not in complete:
            complete[folder] = {str(Path(f).resolve()) for f in _complete_shards(folder)}
        if folder is None or str(Path(file).resolve()) in complete[folder]:
            kept.append(file)
    return kept


def resolve_shards(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str] | None:
    """The parquet files `source` names, never a shard of a slide its tiling run did not complete; None when it
    names no parquet file (a folder of images, a hub id, ...).

    `source` is an `exaonepath-tile` output folder or its `shards/` (the shards its manifests list, sorted), a
    glob or a `.parquet` path (the matching `.parquet` files, sorted), or a list of parquet files (order
    kept). Of the files inside a tiling output's `shards/`, only those its manifests list are returned; other
    files are returned as given.
    """
    if not isinstance(source, str | os.PathLike):
        return _complete_only([str(file) for file in source])
    text = str(source)
    if tiling_output_folder(text) is not None:
        return _complete_shards(text)
    if glob.has_magic(text) or text.endswith(".parquet"):
        return _complete_only(sorted(f for f in glob.glob(text, recursive=True) if f.endswith(".parquet")))
    return None


def load_patch_dataset(
    out_dir: str | os.PathLike,
    rank: int | None = None,
    world_size: int | None = None,
    streaming: bool = True,
):
    """The tiled patches of `out_dir` as a `datasets` dataset (streaming by default), optionally a rank's share.

    With `rank`/`world_size` the stream is split with `datasets.distributed.split_dataset_by_node`: ranks get
    disjoint shards that together cover every patch. Do not also pass the DataLoader through
    `accelerator.prepare`, which would shard a second time.
    """
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    files = _complete_shards(out_dir)
    if not files:
        raise ValueError(f"{out_dir}: the manifest lists no shards (no slide had tissue patches?)")
    dataset = load_dataset("parquet", data_files={"train": files}, split="train", streaming=streaming)
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    if rank is not None:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return dataset


@dataclass(frozen=True)
class PatchCoords:
    """A coordinates file (coords/<slide_id>.csv) column by column: one entry per kept patch, in the order of
    the slide's shard rows."""

    x: np.ndarray  # int64, level-0 left
    y: np.ndarray  # int64, level-0 top
    level: np.ndarray  # int64, pyramid level the pixels are read from
    size: np.ndarray  # int64, patch side in level-0 pixels
    mpp: np.ndarray  # float64, µm per stored pixel
    tissue_fraction: np.ndarray  # float64, rounded to 4 decimals

    def __len__(self) -> int:
        return len(self.x)

    @property
    def xy(self) -> np.ndarray:
        """[N, 2] int64: the level-0 top-left (x, y) of each patch."""
        return np.stack([self.x, self.y], axis=1)


def write_coords_csv(
    path: str | os.PathLike,
    xy: np.ndarray,
    tissue_fractions: np.ndarray,
    level: int,
    size: int,
    mpp: float,
) -> None:
    """Write a slide's coordinates file atomically: a row per patch at level-0 top-left `xy[i]`, with the
    slide's read level, level-0 patch side and stored µm/px, and the patch's tissue fraction."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COORDS_COLUMNS)
    for (x, y), fraction in zip(xy, tissue_fractions, strict=True):
        writer.writerow([int(x), int(y), int(level), int(size), repr(float(mpp)), f"{fraction:.4f}"])
    atomic_write_bytes(path, text.getvalue().encode())


def read_coords_csv(path: str | os.PathLike) -> PatchCoords:
    """A coordinates file as `write_coords_csv` wrote it."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or tuple(rows[0]) != COORDS_COLUMNS:
        raise ValueError(
            f"{path} is not a coordinates file of exaonepath-tile (header {','.join(COORDS_COLUMNS)})"
        )
    columns = [[row[index] for row in rows[1:]] for index in range(len(COORDS_COLUMNS))]
    x, y, level, size = (np.array(column, dtype=np.int64) for column in columns[:4])
    mpp, tissue_fraction = (np.array(column, dtype=np.float64) for column in columns[4:])
    return PatchCoords(x, y, level, size, mpp, tissue_fraction)


@dataclass(frozen=True)
class TiledSlide:
    """A complete slide of a tiling output folder: its record and the settings the folder was tiled with."""

    out_dir: Path
    record: SlideRecord
    config: TilingConfig

    @property
    def slide_id(self) -> str:
        return self.record.slide_id

    def shard_files(self) -> list[Path]:
        return [self.out_dir / "shards" / name for name in self.record.shards]

    def coords(self) -> PatchCoords:
        return read_coords_csv(self.out_dir / self.record.coords)


class ShardPatches:
    """A slide's patches from its shard files, in shard and row order: `patches[i]` is (RGB image, x, y).

    A sequence, so a torch DataLoader takes it as a map-style dataset. A row group is read whole and kept until
    the next is needed: a DataLoader worker's batches are runs of consecutive rows.
    """

    def __init__(self, files: Sequence[str | os.PathLike]):
        self.files = [str(f) for f in files]
        self.index: list[tuple[int, int, int]] = []  # (file, row group, row in group)
        for number, file in enumerate(self.files):
            metadata = pq.ParquetFile(file).metadata
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                self.index += [(number, group, row) for row in range(rows)]
        self._cached: tuple[tuple[int, int], dict[str, list]] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, position: int) -> tuple[Image.Image, int, int]:
        number, group, row = self.index[position]
        if self._cached is None or self._cached[0] != (number, group):
            table = pq.ParquetFile(self.files[number]).read_row_group(group, columns=["image", "x", "y"])
            self._cached = ((number, group), table.to_pydict())
        columns = self._cached[1]
        return open_rgb(columns["image"][row]), columns["x"][row], columns["y"][row]
