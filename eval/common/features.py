"""Feature extraction with an on-disk cache: one forward pass per (model, dataset revision, split, preprocessing).

Layout of one cache entry, `ROOT/<digest>/` with `digest = sha256(key.json)[:20]`:

    key.json                      the full key: encoder identity, dataset id/revision/fingerprint, split,
                                  preprocessing (Macenko on/off, reference numbers, resize/crop, mean/std), precision
    chunks/chunk_000012.safetensors   finished chunks of `chunk_size` rows (resume unit)
    features.safetensors          features [N, D] float32, labels [N], indices [N] (row in the split),
                                  stain_normalized [N] bool
    meta.json                     slide_ids, patient_ids, failed rows and their errors, timings; written last,
                                  so its presence means the entry is complete

Every file is written to a temporary name and `os.replace`d. Extraction is resumable (finished chunks are
skipped) and distributed: under `accelerate launch` every process takes every `world_size`-th chunk and
the main process merges. Unreadable images are counted, listed in meta.json with their error and left
out; one bad file never stops a job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from safetensors.torch import load_file
from torch.utils.data import Dataset

from ...atomic_io import atomic_save_tensors, write_json
from ...images import open_rgb, source_name
from .cli import DEFAULT_CHUNK_SIZE
from .encoders import Encoder, Preprocessing
from .extraction import FeatureBatch, ForwardSettings, ForwardTimes, stream_features

__all__ = [
    "DatasetImages",
    "ExtractionSettings",
    "FeatureSet",
    "cache_key",
    "cache_dir_for",
    "load_cached",
    "extract_features",
    "default_cache_root",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1


def distributed_state() -> PartialState:
    """Accelerate's process state; on a machine without CUDA, processes started by `accelerate launch` or
    torchrun join one gloo group (PartialState() alone would leave each process on its own there)."""
    return PartialState(cpu=not torch.cuda.is_available())


def default_cache_root() -> Path:
    """`$EXAONEPATH_FEATURE_CACHE`, else `~/.cache/exaonepath_hf/features`."""
    return Path(
        os.environ.get("EXAONEPATH_FEATURE_CACHE", Path.home() / ".cache" / "exaonepath_hf" / "features")
    )


@dataclass
class FeatureSet:
    """Cached features of one split with their labels and slide/patient ids, row-aligned."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    stain_normalized: torch.Tensor
    slide_ids: list[str]
    patient_ids: list[str]
    failed: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def extraction_record(self, stain_normalize: bool) -> dict[str, Any]:
        """What a run record says about this extraction: timings, counts, images left out, and the images the
        processor passed through without Macenko (no tissue, not H&E) when it was on."""
        return {
            **self.stats,
            "num_features": len(self),
            "failed_images": len(self.failed),
            "stain_fallbacks": int((~self.stain_normalized).sum()) if stain_normalize else 0,
        }


def cache_key(
    encoder: Encoder,
    dataset_id: str,
    dataset_revision: str,
    dataset_fingerprint: str,
    split: str,
    preprocessing: Preprocessing,
    precision: str,
) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT_VERSION,
        "model": encoder.identity(),
        "dataset": {
            "id": dataset_id,
            "revision": dataset_revision,
            "fingerprint": dataset_fingerprint,
            "split": split,
        },
        "preprocessing": preprocessing.to_dict(),
        "precision": precision,
    }


def cache_dir_for(root: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(root) / digest


def load_cached(entry: Path) -> FeatureSet | None:
    """The finished cache entry at `entry`, or None when it is absent or incomplete."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(entry / "features.safetensors"))
    return FeatureSet(
        features=tensors["features"],
        labels=tensors["labels"],
        indices=tensors["indices"],
        stain_normalized=tensors["stain_normalized"].bool(),
        slide_ids=meta["slide_ids"],
        patient_ids=meta["patient_ids"],
        failed=meta["failed"],
        stats={**meta["stats"], "cache_hit": True, "forward_batches": 0, "cache_dir": str(entry)},
    )


class DatasetImages(Dataset):
    """Rows of a split as `(row index, PIL image or None, error or None)`, decoded in the loader workers: a
    source of `stream_features`."""

    def __init__(self, dataset: datasets.Dataset, rows: Sequence[int]):
        self.dataset = dataset.cast_column("image", datasets.Image(decode=False))
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int):
        row = self.rows[position]
        record = self.dataset[row]["image"]
        try:
            return row, open_rgb(record), None
        except Exception as error:  # any decoder failure: counted and reported, never fatal
            return row, None, f"{source_name(record)}: {type(error).__name__}: {error}"


def _chunk_path(entry: Path, chunk: int) -> Path:
    return entry / "chunks" / f"chunk_{chunk:06d}.safetensors"


def _flush_chunk(entry: Path, chunk: int, parts: list[dict[str, Any]]) -> None:
    rows = [p["rows"] for p in parts if len(p["rows"])]
    has_rows = bool(rows)
    tensors = {
        "rows": torch.cat(rows) if has_rows else torch.zeros(0, dtype=torch.long),
        "features": torch.cat([p["features"] for p in parts if len(p["rows"])])
        if has_rows
        else torch.zeros(0, 0),
        "stain_normalized": torch.cat([p["stain_normalized"] for p in parts if len(p["rows"])])
        if has_rows
        else torch.zeros(0, dtype=torch.bool),
    }
    failed = [f for p in parts for f in p["failed"]]
    write_json(entry / "chunks" / f"chunk_{chunk:06d}.failed.json", failed)
    atomic_save_tensors(_chunk_path(entry, chunk), tensors)


def _merge(entry: Path, dataset: datasets.Dataset, num_chunks: int, stats: dict[str, Any]) -> FeatureSet:
    rows, features, normalized, failed = [], [], [], []
    for chunk in range(num_chunks):
        tensors = load_file(str(_chunk_path(entry, chunk)))
        if len(tensors["rows"]):
            rows.append(tensors["rows"])
            features.append(tensors["features"])
            normalized.append(tensors["stain_normalized"].bool())
        failed.extend(json.loads((entry / "chunks" / f"chunk_{chunk:06d}.failed.json").read_text()))
    if not rows:
        raise RuntimeError(f"no image of {entry} could be read; first errors: {failed[:3]}")
    indices = torch.cat(rows)
    labels = torch.tensor(dataset["label"], dtype=torch.long)[indices]
    slide_ids, patient_ids = dataset["slide_id"], dataset["patient_id"]
    feature_set = FeatureSet(
        features=torch.cat(features).float(),
        labels=labels,
        indices=indices,
        stain_normalized=torch.cat(normalized),
        slide_ids=[slide_ids[i] for i in indices.tolist()],
        patient_ids=[patient_ids[i] for i in indices.tolist()],
        failed=failed,
        stats=stats,
    )
    atomic_save_tensors(
        entry / "features.safetensors",
        {
            "features": feature_set.features,
            "labels": feature_set.labels,
            "indices": feature_set.indices,
            "stain_normalized": feature_set.stain_normalized,
        },
    )
    write_json(
        entry / "meta.json",
        {
            "slide_ids": feature_set.slide_ids,
            "patient_ids": feature_set.patient_ids,
            "failed": failed,
            "stats": stats,
            "num_rows": len(dataset),
            "num_features": len(feature_set),
        },
    )
    if failed:
        logger.warning(
            "%d of %d images could not be read and were left out (see %s)",
            len(failed),
            len(dataset),
            entry / "meta.json",
        )
    return feature_set


@dataclass(frozen=True)
class ExtractionSettings:
    """How features are extracted (`forward`: batches, loader workers, precision, where the processor runs)
    and where they are cached (`cache_dir=None` is `default_cache_root()`)."""

    cache_dir: Path | None = None
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    chunk_size: int = DEFAULT_CHUNK_SIZE

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_root()

    def extract(
        self,
        encoder: Encoder,
        dataset: datasets.Dataset,
        preprocessing: Preprocessing,
        key: dict[str, Any],
        state: PartialState | None = None,
    ) -> FeatureSet:
        return extract_features(
            encoder, dataset, preprocessing, key, self.cache_root, self.forward, self.chunk_size, state
        )


class _ChunkWriter:
    """Collects a run's features per chunk and writes each chunk as soon as all its rows are done."""

    def __init__(self, entry: Path, num_rows: int, chunk_size: int):
        self.entry, self.num_rows, self.chunk_size = entry, num_rows, chunk_size
        self.buffers: dict[int, list[dict[str, Any]]] = {}
        self.seen: dict[int, int] = {}

    def add(self, batch: FeatureBatch) -> None:
        rows = torch.tensor(batch.keys, dtype=torch.long)
        failed = [{"index": row, "error": error} for row, error in batch.failed]
        # a batch may straddle chunks: split it so that no chunk waits for rows it does not own
        chunk_of_row = (rows // self.chunk_size).tolist()
        chunk_of_failed = [f["index"] // self.chunk_size for f in failed]
        for chunk in sorted(set(chunk_of_row) | set(chunk_of_failed)):
            select = torch.tensor([c == chunk for c in chunk_of_row], dtype=torch.bool)
            chunk_failed = [f for f, c in zip(failed, chunk_of_failed, strict=True) if c == chunk]
            self.buffers.setdefault(chunk, []).append(
                {
                    "rows": rows[select],
                    "features": batch.features[select],
                    "stain_normalized": batch.stain_normalized[select],
                    "failed": chunk_failed,
                }
            )
            self.seen[chunk] = self.seen.get(chunk, 0) + int(select.sum()) + len(chunk_failed)
            if self.seen[chunk] == min(self.chunk_size, self.num_rows - chunk * self.chunk_size):
                _flush_chunk(self.entry, chunk, self.buffers.pop(chunk))


def _pending_rows(
    entry: Path, num_rows: int, chunk_size: int, num_chunks: int, state: PartialState
) -> list[int]:
    """Rows of this process's chunks that no earlier run finished (every `num_processes`-th chunk is ours)."""
    mine = [c for c in range(num_chunks) if c % state.num_processes == state.process_index]
    pending = [c for c in mine if not _chunk_path(entry, c).is_file()]
    if len(pending) < len(mine):
        logger.info("resuming %s: %d of %d chunks already done", entry, len(mine) - len(pending), len(mine))
    return [r for c in pending for r in range(c * chunk_size, min((c + 1) * chunk_size, num_rows))]


def extract_features(
    encoder: Encoder,
    dataset: datasets.Dataset,
    preprocessing: Preprocessing,
    key: dict[str, Any],
    cache_root: str | os.PathLike,
    forward: ForwardSettings | None = None,
    chunk_size: int = 4096,
    state: PartialState | None = None,
) -> FeatureSet:
    """Features of every row of `dataset` (columns image, label, slide_id, patient_id), from cache if present."""
    entry = cache_dir_for(Path(cache_root), key)
    cached = load_cached(entry)
    if cached is not None:
        logger.info("feature cache hit: %s (%d rows)", entry, len(cached))
        return cached
    forward = forward or ForwardSettings()
    state = state or distributed_state()
    if state.is_main_process:
        write_json(entry / "key.json", key)
    num_chunks = max(1, math.ceil(len(dataset) / chunk_size))
    rows = _pending_rows(entry, len(dataset), chunk_size, num_chunks, state)

    writer, times = _ChunkWriter(entry, len(dataset), chunk_size), ForwardTimes()
    batches = stream_features(
        encoder,
        preprocessing,
        DatasetImages(dataset, rows),
        forward,
        state.device,
        times,
        desc=f"features {key['dataset']['split']}",
    )
    for batch in batches:
        writer.add(batch)
    stats = {
        "cache_hit": False,
        "forward_batches": times.batches,
        "images_extracted": len(rows),
        **{name: value for name, value in times.to_dict().items() if name not in ("images", "batches")},
        "num_processes": state.num_processes,
        "precision": "bf16" if forward.uses_bf16(state.device) else "fp32",
        "preprocessed_on": "device" if forward.preprocesses_on_device(state.device) else "loader workers",
        "device": str(state.device),
        "batch_size": forward.batch_size,
        "num_workers": forward.num_workers,
        "cache_dir": str(entry),
    }
    state.wait_for_everyone()
    if state.is_main_process:
        feature_set = _merge(entry, dataset, num_chunks, stats)
    state.wait_for_everyone()
    if not state.is_main_process:
        feature_set = load_cached(entry)
        feature_set.stats = stats
    return feature_set
