"""Parquet patch shards that `datasets` streams: their schema, and how a slide's patches are written into them.

A shard is a parquet file with the columns `image` (datasets `Image` feature: encoded PNG/JPEG bytes),
`slide_id`, `x`, `y` (level-0 top-left), `level` (level the pixels were read from), `size` (patch side in
level-0 pixels), `mpp` (microns per stored pixel) and `tissue_fraction`. The `datasets` feature types travel
in the file's schema metadata, so `load_dataset("parquet", ...)` decodes `image` to PIL without being told.

Shards are the unit of distribution in streaming training: `split_dataset_by_node` hands whole shards to ranks
when their count is a multiple of the world size (otherwise every rank reads every shard and keeps 1 example
in world_size), and a DataLoader's workers share a rank's shards. Aim for a number of shards that is a
multiple of world_size and at least world_size x num_workers; `IterableDataset.reshard()` can further split
each shard into its row groups. Which shards of a tiling output are complete, and how they are read: `output`.
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

__all__ = [
    "PATCH_COLUMNS",
    "PatchRecord",
    "encode_patch",
    "patch_schema",
    "write_shard",
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
