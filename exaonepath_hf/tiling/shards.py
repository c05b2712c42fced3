"""Parquet patch shards that `datasets` streams, and helpers to load them for distributed training.

A shard is a parquet file with the columns `image` (datasets `Image` feature: encoded PNG/JPEG bytes),
`slide_id`, `x`, `y` (level-0 top-left), `level` (level the pixels were read from), `size` (patch side in
level-0 pixels), `mpp` (microns per stored pixel) and `tissue_fraction`. The `datasets` feature types travel
in the file's schema metadata, so `load_dataset("parquet", ...)` decodes `image` to PIL without being told.

Shards are the unit of distribution in streaming training: `split_dataset_by_node` hands whole shards to ranks
when their count is a multiple of the world size (otherwise every rank reads every shard and keeps 1 example
in world_size), and a DataLoader's workers share a rank's shards. Aim for a number of shards that is a
multiple of world_size and at least world_size x num_workers; `IterableDataset.reshard()` can further split
each shard into its row groups.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..atomic_io import atomic_file
from .ranks import record_files

__all__ = [
    "PATCH_COLUMNS",
    "PatchRecord",
    "encode_patch",
    "patch_schema",
    "write_shard",
    "complete_shards_only",
    "completed_shard_files",
    "load_patch_dataset",
    "read_manifest",
    "tiling_output_folder",
]

ImageFormat = Literal["png", "jpeg"]

_FEATURES = {
    "image": {"_type": "Image"},
    "slide_id": {"dtype": "string", "_type": "Value"},
    "x": {"dtype": "int64", "_type": "Value"},
    "y": {"dtype": "int64", "_type": "Value"},
    "level": {"dtype": "int64", "_type": "Value"},
    "size": {"dtype": "int64", "_type": "Value"},
    "mpp": {"dtype": "float64", "_type": "Value"},
    "tissue_fraction": {"dtype": "float32", "_type": "Value"},
}
PATCH_COLUMNS = tuple(_FEATURES)


def patch_schema() -> pa.Schema:
    """Arrow schema of a shard, carrying the `datasets` features (as `datasets.Features.arrow_schema` does)."""
    fields = [
        pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        pa.field("slide_id", pa.string()),
        pa.field("x", pa.int64()),
        pa.field("y", pa.int64()),
        pa.field("level", pa.int64()),
        pa.field("size", pa.int64()),
        pa.field("mpp", pa.float64()),
        pa.field("tissue_fraction", pa.float32()),
    ]
    metadata = {"huggingface": json.dumps({"info": {"features": _FEATURES}})}
    return pa.schema(fields, metadata=metadata)


@dataclass(frozen=True)
class PatchRecord:
    """One row of a shard (the pixels already encoded)."""

    image: bytes
    slide_id: str
    x: int
    y: int
    level: int
    size: int
    mpp: float
    tissue_fraction: float


def encode_patch(pixels: np.ndarray, image_format: ImageFormat = "png", jpeg_quality: int = 90) -> bytes:
    """PNG (lossless) or JPEG bytes of an RGB uint8 patch."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if image_format == "png":
        image.save(buffer, format="PNG")
    elif image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    return buffer.getvalue()


def _table(records: Sequence[PatchRecord], schema: pa.Schema) -> pa.Table:
    columns = {
        "image": [{"bytes": r.image, "path": None} for r in records],
        "slide_id": [r.slide_id for r in records],
        "x": [r.x for r in records],
        "y": [r.y for r in records],
        "level": [r.level for r in records],
        "size": [r.size for r in records],
        "mpp": [r.mpp for r in records],
        "tissue_fraction": [r.tissue_fraction for r in records],
    }
    return pa.Table.from_pydict(columns, schema=schema)


def write_shard(path: Path, records: Iterable[PatchRecord], row_group_size: int) -> int:
    """Stream `records` into the parquet file `path`, one row group at a time, atomically.

    A reader (or a resumed run) never sees a half-written shard. Memory holds one row group. Returns the number
    of rows written.
    """
    schema = patch_schema()
    rows = 0
    buffer: list[PatchRecord] = []
    with atomic_file(path) as temporary, pq.ParquetWriter(temporary, schema, compression="none") as writer:
        # Encoded PNG/JPEG does not compress further; skipping parquet compression saves CPU on both ends.
        for record in records:
            buffer.append(record)
            if len(buffer) == row_group_size:
                writer.write_table(_table(buffer, schema), row_group_size=row_group_size)
                rows += len(buffer)
                buffer.clear()
        if buffer:
            writer.write_table(_table(buffer, schema), row_group_size=row_group_size)
            rows += len(buffer)
    return rows


def tiling_output_folder(path: str | Path) -> Path | None:
    """The `exaonepath-tile` output folder that `path` is, or whose `shards/` folder it is; else None."""
    path = Path(path)
    for folder in (path, path.parent) if path.name == "shards" else (path,):
        if record_files(folder, "manifest") and (folder / "shards").is_dir():
            return folder
    return None


def read_manifest(out_dir: str | Path) -> dict:
    """The tiling manifest of `out_dir` (or of the folder whose `shards/` it is): manifest.json merged with the
    manifest.rank-NNNNN.json of every rank that tiled into the folder.

    `slides` is the union of the complete slides the files list; `failures` the failed slides none of them
    lists as complete. Every reader of tiling output goes through this, so each sees the slides of all ranks.
    """
    out_dir = tiling_output_folder(out_dir) or Path(out_dir)
    paths = record_files(out_dir, "manifest")
    if not paths:
        raise FileNotFoundError(
            f"{out_dir / 'manifest.json'} not found: run exaonepath-tile with --out {out_dir} first"
        )
    slides: dict[str, dict] = {}
    failures: dict[str, dict] = {}
    config = None
    for path in paths:
        manifest = json.loads(path.read_text())
        slides.update(manifest["slides"])
        failures.update({failure["slide_id"]: failure for failure in manifest.get("failures", [])})
        config = config or manifest.get("config")
    slides = dict(sorted(slides.items()))
    return {
        "config": config,
        "num_slides": len(slides),
        "num_patches": sum(r.get("num_patches", 0) for r in slides.values()),
        "num_shards": sum(len(r["shards"]) for r in slides.values()),
        "slides": slides,
        "failures": [failures[k] for k in sorted(failures) if k not in slides],
        "manifest_files": [path.name for path in paths],
    }


def completed_shard_files(out_dir: str | Path) -> list[str]:
    """The shard files of every slide a tiling run completed, from its manifests, in a stable order.

    Every reader of tiling output (training, evaluation, feature collapse) lists shards with this, never with
    a glob over `shards/*.parquet`: a run killed while publishing a slide's shards can leave some of them in
    place until the slide is re-tiled, and only the manifests' shards are complete. `out_dir` may also be the
    run's `shards/` folder. The manifests of all ranks that tiled into the folder count (`read_manifest`).
    """
    out_dir = tiling_output_folder(out_dir) or Path(out_dir)
    manifest = read_manifest(out_dir)
    files = [
        str(out_dir / "shards" / name) for slide in manifest["slides"].values() for name in slide["shards"]
    ]
    return sorted(files)


def complete_shards_only(files: Sequence[str]) -> list[str]:
    """`files` (e.g. a glob's matches) without the shards of a tiling output that its manifest does not list as
    complete; files elsewhere are kept as given. Order is kept."""
    complete: dict[Path, set[str]] = {}
    kept = []
    for file in files:
        folder = tiling_output_folder(Path(file).parent)
        if folder is not None and folder not in complete:
            complete[folder] = {str(Path(f).resolve()) for f in completed_shard_files(folder)}
        if folder is None or str(Path(file).resolve()) in complete[folder]:
            kept.append(file)
    return kept


def load_patch_dataset(
    out_dir: str | Path,
    rank: int | None = None,
    world_size: int | None = None,
    streaming: bool = True,
):
    """The tiled patches as a `datasets` dataset (streaming by default), optionally this rank's share.

    With `rank`/`world_size` the stream is split with `datasets.distributed.split_dataset_by_node`: ranks get
    disjoint shards that together cover every patch. Do not also pass the DataLoader through
    `accelerator.prepare`, which would shard a second time.
    """
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    files = completed_shard_files(out_dir)
    if not files:
        raise ValueError(f"{out_dir}: the manifest lists no shards (no slide had tissue patches?)")
    dataset = load_dataset("parquet", data_files={"train": files}, split="train", streaming=streaming)
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    if rank is not None:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return dataset
