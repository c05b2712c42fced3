"""Per-slide feature bags: every tissue patch of a slide through a frozen encoder, one HDF5 file per slide.

    exaonepath-extract TILES_OR_SLIDES... --model MODEL --output_dir DIR [--tokens cls|cls+mean]
    python -m exaonepath_hf.eval.slide.features ...        (same flags)

Inputs are `exaonepath-tile` output folders (their complete slides, as their manifests list them) and slide
files or folders of slides, which are tiled on the way into `DIR/tiles/` (coordinates and thumbnails only; the
pixels are read from the slide) with the tiler's flags. Every patch goes through the encoder's processor
(Macenko on unless `--no_stain_normalization`) and any encoder `load_encoder` takes.

Output folder `DIR`:

    <slide_id>.h5                 the slide's bag (layout below), written atomically: present means complete
    extraction_config.json        encoder, preprocessing, tokens, precision: a rerun into DIR must match them
    extraction_report.json        this run's extracted / skipped / failed slides (the error of each failure);
                                  a rank of a multi-process run writes extraction_report.rank-NNNNN.json
    tiles/                        exaonepath-tile output of the slides given as files (thumbnails for heatmaps)

A rerun skips slides whose file exists; a slide that cannot be read is reported and the others go on. Several
processes (torchrun, `accelerate launch`, srun, or `--rank/--world_size`) split the slides between them
(`exaonepath_hf.tiling.ranks`) and write into one DIR; each runs on its GPU (`LOCAL_RANK`), bf16 on GPU.

File layout (`DIR/<slide_id>.h5`), the one TRIDENT writes and reads, so that feature bags move both ways:

    features   [N, D] float32    one row per patch; attributes: name (the slide id) and, in our files, what
                                 produced them (encoder, tokens, preprocessing, precision) as JSON strings
    coords     [N, 2] int64      level-0 top-left (x, y) of each patch, row-aligned with `features`;
                                 attributes: the patch geometry (see `patch_geometry`)

Verified against TRIDENT (mahmoodlab/TRIDENT, trident/IO.py `save_h5`, `coords_to_h5`, `read_coords`;
trident/wsi_objects/WSI.py `extract_tissue_coords`, `extract_patch_features`): datasets `features` and
`coords`; attributes of `coords`: `patch_size` (side at the target magnification), `patch_size_level0`,
`level0_magnification`, `target_magnification`, `overlap`, `name`, `savetodir`, and in newer versions
`level0_width`, `level0_height`; attributes of `features`: `name`, `savetodir`. TRIDENT stores a dict attribute
as a JSON string and None as the string "None"; we do the same and undo both when reading. We leave out
`savetodir` (an absolute path of the machine that wrote the file) and add `level0_mpp`, `target_mpp`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ...atomic_io import atomic_file, record_folder_settings, write_json
from ...cli import run_command
from ...images import open_rgb
from ...stain_normalization import StainReference
from ...tiling import (
    RankInfo,
    TilingConfig,
    open_slide,
    read_manifest,
    read_patch_at,
    resolve_rank,
    slide_id_from_path,
    split_for_rank,
    tile_slides,
    tiling_output_folder,
)
from ...tiling.cli import (
    add_patch_arguments,
    add_tissue_arguments,
    print_failures,
    slide_paths,
    tissue_config_from_args,
)
from ...tiling.ranks import add_rank_arguments, record_name
from ...tiling.slide_io import SLIDE_SUFFIXES
from ..common.encoders import Encoder, Pooling, Preprocessing, Tokens, load_encoder

__all__ = [
    "SlideExtractionSettings",
    "SlideExtractionSummary",
    "SlideFeatures",
    "build_parser",
    "extract_slide_features",
    "load_slide_features",
    "main",
    "patch_geometry",
    "settings_from_args",
    "write_slide_features",
]

logger = logging.getLogger(__name__)

#: Magnification of a pixel size by the microscopy convention 10 µm/px / mpp (0.25 µm/px = 40x, 0.5 = 20x).
MAGNIFICATION_MICRONS = 10.0


@dataclass
class SlideFeatures:
    """One slide's feature bag: `features[i]` is the patch whose level-0 top-left is `coords[i]`.

    `attributes` holds the patch geometry (the `coords` attributes: patch_size, patch_size_level0,
    level0_magnification, target_magnification, overlap, ...); `feature_attributes` what the `features`
    dataset says about how they were made (encoder, tokens, preprocessing in our files).
    """

    slide_id: str
    features: np.ndarray  # [N, D] float32
    coords: np.ndarray  # [N, 2] int64
    attributes: dict[str, Any] = field(default_factory=dict)
    feature_attributes: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])


def patch_geometry(
    slide_id: str,
    patch_size: int,
    patch_size_level0: int,
    level0_mpp: float,
    target_mpp: float,
    level0_width: int | None = None,
    level0_height: int | None = None,
    overlap: int = 0,
) -> dict[str, Any]:
    """The `coords` attributes of a slide in TRIDENT's names (magnifications as 10 µm/px / mpp) plus the MPPs."""
    return {
        "name": slide_id,
        "patch_size": int(patch_size),
        "patch_size_level0": int(patch_size_level0),
        "level0_magnification": MAGNIFICATION_MICRONS / level0_mpp,
        "target_magnification": MAGNIFICATION_MICRONS / target_mpp,
        "level0_mpp": float(level0_mpp),
        "target_mpp": float(target_mpp),
        "overlap": int(overlap),
        **({"level0_width": int(level0_width)} if level0_width is not None else {}),
        **({"level0_height": int(level0_height)} if level0_height is not None else {}),
    }


def _attribute_value(key: str, value: Any) -> Any:
    """A value h5py stores as an attribute: scalars and numeric lists as they are, dicts (and lists of other
    things) as JSON text, None as "None" (TRIDENT's conventions)."""
    if value is None:
        return "None"
    if isinstance(value, str | bool | int | float | np.generic):
        return value
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, list | tuple | np.ndarray):
        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            return array
        return json.dumps(list(value))
    raise ValueError(f"attribute {key!r}: cannot store a {type(value).__name__} in HDF5 ({value!r})")


def _python_value(value: Any) -> Any:
    """An HDF5 attribute read back as a plain Python value (the inverse of `_attribute_value`)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str):
        if value == "None":
            return None
        if value[:1] in "{[":
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
    return value


def write_slide_features(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    attributes: Mapping[str, Any],
    feature_attributes: Mapping[str, Any] | None = None,
) -> Path:
    """Write one slide's bag to `path` (HDF5, TRIDENT's layout), atomically: a reader sees the whole file or none.

    `attributes` go on `coords` (the patch geometry, see `patch_geometry`); `feature_attributes` on `features`,
    whose `name` defaults to `attributes["name"]`, else the file name.
    """
    import h5py

    path = Path(path)
    features = np.asarray(features)
    coords = np.asarray(coords)
    if features.ndim != 2:
        raise ValueError(f"{path}: features must be [N, D], got shape {features.shape}")
    if coords.shape != (features.shape[0], 2):
        raise ValueError(
            f"{path}: coords must be [N, 2] with N = {features.shape[0]} rows of features, got {coords.shape}"
        )
    if not np.isfinite(features).all():
        raise ValueError(f"{path}: features hold NaN or infinite values; refusing to write them")
    if coords.size and not np.array_equal(coords, np.round(coords)):
        raise ValueError(f"{path}: coords must be whole level-0 pixels")
    name = str(attributes.get("name") or path.stem)
    feature_attributes = {"name": name, **(feature_attributes or {})}
    with atomic_file(path) as temporary, h5py.File(temporary, "w") as handle:
        features_set = handle.create_dataset("features", data=features.astype(np.float32, copy=False))
        coords_set = handle.create_dataset("coords", data=coords.astype(np.int64, copy=False))
        for dataset, values in ((features_set, feature_attributes), (coords_set, attributes)):
            for key, value in values.items():
                dataset.attrs[key] = _attribute_value(key, value)
    return path


def load_slide_features(path: str | Path) -> SlideFeatures:
    """Read a feature bag written by `write_slide_features` or by TRIDENT.

    `features` come back as float32 [N, D], `coords` as int64 [N, 2]; the slide id is the `name` attribute
    (of `features`, else of `coords`), else the file name without `.h5`.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feature file")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 file ({error}); re-extract it") from error
    with handle:
        missing = [key for key in ("features", "coords") if key not in handle]
        if missing:
            raise ValueError(
                f"{path} has no dataset {' or '.join(missing)} (it has {sorted(handle)}); a patch feature file "
                "holds `features` [N, D] and `coords` [N, 2] (TRIDENT / exaonepath-extract layout)"
            )
        features = np.asarray(handle["features"][()], dtype=np.float32)
        coords = np.asarray(handle["coords"][()])
        attributes = {key: _python_value(value) for key, value in handle["coords"].attrs.items()}
        feature_attributes = {key: _python_value(value) for key, value in handle["features"].attrs.items()}
    if features.ndim != 2:
        raise ValueError(
            f"{path}: features have shape {features.shape}, not [N, D]; a slide encoder's output (one vector "
            "per slide) is not a patch feature bag"
        )
    if coords.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise ValueError(
            f"{path}: coords {coords.shape} do not match features {features.shape} (want [N, 2])"
        )
    if coords.dtype.kind == "f":
        if not np.array_equal(coords, np.round(coords)):
            raise ValueError(f"{path}: coords are not whole level-0 pixels")
    coords = coords.astype(np.int64)
    slide_id = feature_attributes.get("name") or attributes.get("name") or path.stem
    return SlideFeatures(
        slide_id=str(slide_id),
        features=features,
        coords=coords,
        attributes=attributes,
        feature_attributes=feature_attributes,
    )


# --------------------------------------------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True)
class SlideExtractionSettings:
    """Everything `extract_slide_features` needs (the `exaonepath-extract` flags).

    `inputs`: `exaonepath-tile` output folders, slide files, and folders of slide files (a folder holding .dcm
    files is one DICOM slide). `tiling` cuts the slides given as files (its `write_images` is ignored: only
    coordinates are stored, the pixels are read from the slide). `rank`/`world_size` default to the
    environment (`ranks.resolve_rank`); `device` to this rank's GPU, else the CPU; `precision="auto"` is bf16 on
    GPU, fp32 elsewhere.
    """

    inputs: tuple[Path, ...]
    model: str
    output_dir: Path
    tokens: Tokens = "cls"
    pooling: Pooling = "auto"
    revision: str | None = None
    stain_normalize: bool = True
    stain_reference: StainReference | None = None
    tiling: TilingConfig = field(default_factory=TilingConfig)
    tiling_workers: int = 1
    batch_size: int = 64
    num_workers: int = 4
    precision: str = "auto"
    device: str | None = None
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("no input given: pass exaonepath-tile output folders or slide files")
        if self.tokens not in ("cls", "cls+mean"):
            raise ValueError(f"tokens must be 'cls' or 'cls+mean', got {self.tokens!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.batch_size < 1 or self.num_workers < 0 or self.tiling_workers < 1:
            raise ValueError("batch_size and tiling_workers must be >= 1, num_workers >= 0")


@dataclass
class SlideExtractionSummary:
    """What one process of an `extract_slide_features` run did."""

    output_dir: Path
    rank: RankInfo
    extracted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)  # slide_id, path, stage, error, message
    num_patches: int = 0  # patches of the slides extracted by this run
    seconds: float = 0.0
    forward_seconds: float = 0.0  # time in the encoder's forward pass

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def report_path(self) -> Path:
        return self.output_dir / record_name("extraction_report", self.rank.rank, self.rank.world_size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank.rank,
            "world_size": self.rank.world_size,
            "extracted": self.extracted,
            "skipped": self.skipped,
            "failures": self.failures,
            "num_patches": self.num_patches,
            "seconds": round(self.seconds, 3),
            "forward_seconds": round(self.forward_seconds, 3),
            "patches_per_second": round(self.num_patches / self.seconds, 2) if self.seconds > 0 else None,
        }


@dataclass(frozen=True)
class _TiledSlide:
    """A complete slide of a tiling output folder: its record (slides/<id>.json) and the folder's config."""

    slide_id: str
    tiles_dir: Path
    record: dict[str, Any]
    config: dict[str, Any]

    @property
    def path(self) -> str:
        return str(self.record["path"])


def _is_slide_folder(path: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def _collect_inputs(inputs: Sequence[Path]) -> tuple[list[_TiledSlide], list[Path]]:
    """The complete slides of the tiling folders among `inputs`, and the slide files to tile."""
    tiled, to_tile = [], []
    for path in map(Path, inputs):
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: no such slide, folder of slides or exaonepath-tile output folder"
            )
        folder = tiling_output_folder(path) if path.is_dir() else None
        if folder is not None:
            manifest = read_manifest(folder)
            tiled += [
                _TiledSlide(slide_id, folder, record, manifest.get("config") or {})
                for slide_id, record in manifest["slides"].items()
            ]
        elif path.is_dir() and not _is_slide_folder(path):
            slides = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
            if not slides:
                raise ValueError(
                    f"{path} is neither an exaonepath-tile output folder nor a folder of slides "
                    f"({', '.join(SLIDE_SUFFIXES)}) nor a DICOM slide (.dcm files)"
                )
            to_tile += slides
        else:
            to_tile.append(path)
    ids: dict[str, str] = {}
    for slide_id, where in [(s.slide_id, str(s.tiles_dir)) for s in tiled] + [
        (slide_id_from_path(p), str(p)) for p in to_tile
    ]:
        if slide_id in ids:
            raise ValueError(
                f"two inputs hold the slide id {slide_id!r} ({ids[slide_id]} and {where}); a slide's file in "
                "the output folder is named by its id, so ids must be unique: extract them into separate folders"
            )
        ids[slide_id] = where
    return tiled, to_tile


def _tile_share(
    slides: list[Path], settings: SlideExtractionSettings, rank: RankInfo
) -> tuple[list[_TiledSlide], list[dict[str, str]]]:
    """Tile this rank's share of `slides` into DIR/tiles (coordinates only); its complete slides and failures."""
    if not slides:
        return [], []
    tiles_dir = settings.output_dir / "tiles"
    config = dataclasses.replace(settings.tiling, write_images=False)
    summary = tile_slides(
        slides,
        tiles_dir,
        config,
        num_workers=settings.tiling_workers,
        progress=settings.progress,
        rank=rank.rank,
        world_size=rank.world_size,
    )
    manifest = json.loads(summary.manifest_path.read_text())
    complete = [
        _TiledSlide(slide_id, tiles_dir, record, manifest["config"])
        for slide_id, record in manifest["slides"].items()
    ]
    failures = [{**asdict(failure), "stage": "tiling"} for failure in summary.failures]
    return complete, failures


class _ShardPatches(Dataset):
    """A slide's patches from its parquet shards, in shard and row order: (RGB image, x, y).

    A row group is read whole and kept until the next is needed: a DataLoader worker's batches are runs of
    consecutive rows.
    """

    def __init__(self, files: Sequence[Path]):
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

    def __getitem__(self, position: int):
        number, group, row = self.index[position]
        if self._cached is None or self._cached[0] != (number, group):
            table = pq.ParquetFile(self.files[number]).read_row_group(group, columns=["image", "x", "y"])
            self._cached = ((number, group), table.to_pydict())
        columns = self._cached[1]
        return open_rgb(columns["image"][row]), columns["x"][row], columns["y"][row]


class _SlidePatches(Dataset):
    """A slide's patches read from the slide at the tiler's coordinates, as the tiler would store them."""

    def __init__(self, slide: _TiledSlide, coords: np.ndarray, backend: str):
        self.path, self.backend, self.coords = slide.record["path"], backend, coords
        self.geometry = (
            int(slide.record["patch_size_level0"]),
            int(slide.record["read_level"]),
            int(slide.record["stored_patch_size"]),
        )
        self._reader = None  # opened on first use, in the process (DataLoader worker) that reads

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, position: int):
        if self._reader is None:
            self._reader = open_slide(self.path, self.backend)
        x, y = (int(v) for v in self.coords[position])
        return Image.fromarray(read_patch_at(self._reader, x, y, *self.geometry)), x, y

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class _Collate:
    """Runs the image processor on a batch (in the DataLoader worker)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items):
        images, xs, ys = zip(*items, strict=True)
        out = self.processor(list(images), return_tensors="pt")
        coords = torch.tensor(list(zip(xs, ys, strict=True)), dtype=torch.long)
        return out["pixel_values"], out["stain_normalized"].bool(), coords


def _coords_csv(slide: _TiledSlide) -> np.ndarray:
    with open(slide.tiles_dir / slide.record["coords"], newline="") as handle:
        rows = [(int(row["x"]), int(row["y"])) for row in csv.DictReader(handle)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _patches(slide: _TiledSlide, backend: str) -> Dataset:
    if slide.record["shards"]:
        return _ShardPatches([slide.tiles_dir / "shards" / name for name in slide.record["shards"]])
    return _SlidePatches(slide, _coords_csv(slide), backend)


@dataclass
class _Extractor:
    """The loaded encoder and how patches reach it; `run(slide)` is one slide's bag."""

    encoder: Encoder
    preprocessing: Preprocessing
    settings: SlideExtractionSettings
    device: torch.device
    use_bf16: bool
    forward_seconds: float = 0.0

    def run(self, slide: _TiledSlide) -> tuple[np.ndarray, np.ndarray, int]:
        """(features [N, D], coords [N, 2], patches Macenko fell back on) of `slide`."""
        expected = int(slide.record["num_patches"])
        if expected == 0:
            raise ValueError(
                f"the tiler kept no tissue patch of {slide.slide_id} (see {slide.tiles_dir / 'thumbnails'}); "
                "an empty bag predicts nothing: lower --min_tissue or check the slide"
            )
        patches = _patches(slide, self.settings.tiling.backend)
        loader = DataLoader(
            patches,
            batch_size=self.settings.batch_size,
            num_workers=self.settings.num_workers,
            collate_fn=_Collate(self.preprocessing.processor()),
            pin_memory=self.device.type == "cuda",
        )
        features, coords, fallbacks = [], [], 0
        try:
            with tqdm(
                total=len(patches),
                desc=slide.slide_id,
                unit="patch",
                leave=False,
                disable=not self.settings.progress,
            ) as bar:
                for pixel_values, stain_normalized, batch_coords in loader:
                    started = time.perf_counter()
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                        output = self.encoder.features(
                            pixel_values.to(self.device, non_blocking=True), tokens=self.settings.tokens
                        )
                    features.append(output.float().cpu().numpy())  # .cpu() also synchronizes
                    self.forward_seconds += time.perf_counter() - started
                    coords.append(batch_coords.numpy())
                    fallbacks += int((~stain_normalized).sum()) if self.preprocessing.stain_normalize else 0
                    bar.update(len(batch_coords))
        finally:
            if isinstance(patches, _SlidePatches):
                patches.close()
        features_array, coords_array = np.concatenate(features), np.concatenate(coords)
        if len(features_array) != expected:
            raise ValueError(
                f"{slide.slide_id}: read {len(features_array)} patches, the tiling record lists {expected}; "
                f"re-tile the slide into {slide.tiles_dir}"
            )
        return features_array, coords_array, fallbacks


def _slide_attributes(slide: _TiledSlide) -> dict[str, Any]:
    record, config = slide.record, slide.config
    width, height = record["dimensions"]
    geometry = patch_geometry(
        slide.slide_id,
        patch_size=config["patch_size"],
        patch_size_level0=record["patch_size_level0"],
        level0_mpp=record["slide_mpp"],
        target_mpp=config["target_mpp"],
        level0_width=width,
        level0_height=height,
    )
    return {
        **geometry,
        "mpp_source": record.get("mpp_source"),
        "min_tissue_fraction": config.get("min_tissue_fraction"),
    }


def _device(settings: SlideExtractionSettings, rank: RankInfo) -> torch.device:
    if settings.device is not None:
        return torch.device(settings.device)
    if torch.cuda.is_available():
        return torch.device("cuda", rank.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def extract_slide_features(settings: SlideExtractionSettings) -> SlideExtractionSummary:
    """Write `output_dir/<slide_id>.h5` for this process's share of the slides (see the module docstring).

    Slides whose file exists are skipped; a slide that fails (unreadable, no tissue) is logged, listed in the
    report with its error, and the others go on. Raises (before any slide) on bad input: a missing input,
    duplicate slide ids, settings that differ from the ones `output_dir` was filled with.
    """
    started = time.perf_counter()
    rank = resolve_rank(settings.rank, settings.world_size)
    output_dir = Path(settings.output_dir)
    tiled, to_tile = _collect_inputs(settings.inputs)

    device = _device(settings, rank)
    use_bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device.type == "cuda")
    encoder = load_encoder(
        settings.model, pooling=settings.pooling, revision=settings.revision, device=device
    )
    preprocessing = encoder.default_preprocessing(
        stain_normalize=settings.stain_normalize, stain_reference=settings.stain_reference
    )
    produced_by = {
        "encoder": encoder.identity(),
        "tokens": settings.tokens,
        "feature_dim": encoder.feature_dim * (2 if settings.tokens == "cls+mean" else 1),
        "preprocessing": preprocessing.to_dict(),
        "precision": "bf16" if use_bf16 else "fp32",
    }
    record_folder_settings(  # what decides the features: a rerun into output_dir must match it
        output_dir / "extraction_config.json",
        produced_by,
        "holds features made with other settings",
        "rerun with the same model and settings to resume, or choose a new --output_dir",
    )

    summary = SlideExtractionSummary(output_dir=output_dir, rank=rank)
    if rank.is_distributed:
        logger.info("%s on %s", rank, device)
    share = split_for_rank(tiled, rank.rank, rank.world_size, key=lambda slide: slide.slide_id)
    newly_tiled, summary.failures = _tile_share(to_tile, settings, rank)
    share = sorted(share + newly_tiled, key=lambda slide: slide.slide_id)
    todo = []
    for slide in share:
        if (output_dir / f"{slide.slide_id}.h5").is_file():
            summary.skipped.append(slide.slide_id)
        else:
            todo.append(slide)
    if summary.skipped:
        logger.info(
            "%d of %d slides already extracted in %s: skipped", len(summary.skipped), len(share), output_dir
        )

    extractor = _Extractor(encoder, preprocessing, settings, device, use_bf16)
    try:
        for slide in tqdm(todo, desc="slides", unit="slide", disable=not settings.progress or not todo):
            try:
                features, coords, fallbacks = extractor.run(slide)
                write_slide_features(
                    output_dir / f"{slide.slide_id}.h5",
                    features,
                    coords,
                    _slide_attributes(slide),
                    {**produced_by, "slide_path": slide.path, "stain_fallbacks": fallbacks},
                )
            except Exception as error:  # one bad slide is reported, never stops the others
                logger.warning("slide %s failed: %s: %s", slide.slide_id, type(error).__name__, error)
                logger.debug("slide %s failed", slide.slide_id, exc_info=True)
                summary.failures.append(
                    {
                        "slide_id": slide.slide_id,
                        "path": slide.path,
                        "stage": "extraction",
                        "error": type(error).__name__,
                        "message": str(error),
                    }
                )
                continue
            summary.extracted.append(slide.slide_id)
            summary.num_patches += len(features)
    finally:
        summary.seconds = time.perf_counter() - started
        summary.forward_seconds = extractor.forward_seconds
        write_json(summary.report_path, {**summary.to_dict(), "settings": _settings_record(settings)})
    return summary


def _settings_record(settings: SlideExtractionSettings) -> dict[str, Any]:
    record = asdict(settings)
    record["inputs"] = [str(p) for p in settings.inputs]
    record["output_dir"] = str(settings.output_dir)
    record["stain_reference"] = settings.stain_reference.to_dict() if settings.stain_reference else None
    return record


# --------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-extract",
        description=(
            "Per-slide patch features (HDF5, TRIDENT's layout: features [N, D], coords [N, 2]) from exaonepath-tile "
            "output folders or from slides (tiled on the way). Reruns resume; failed slides are listed in "
            "DIR/extraction_report.json and make the exit code 1."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        help="exaonepath-tile output folders, slide files or folders of slides",
    )
    parser.add_argument(
        "--slide_list", action="store_true", help="treat each input as a text file of slide paths"
    )
    parser.add_argument(
        "--model", required=True, help="folder, hub id, .ckpt/state-dict file, timm:NAME or hf-hub:ORG/NAME"
    )
    parser.add_argument("--revision", default=None, help="model revision on the hub")
    parser.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto")
    parser.add_argument("--output_dir", "--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--tokens",
        choices=("cls", "cls+mean"),
        default="cls",
        help="a patch's feature: the CLS feature, or it concatenated with the mean of the patch tokens (2 x D)",
    )
    parser.add_argument(
        "--no_stain_normalization", action="store_true", help="skip Macenko (the default normalizes)"
    )
    parser.add_argument(
        "--stain_reference", type=Path, default=None, help="JSON with stain_matrix, max_concentrations"
    )
    run = parser.add_argument_group("running")
    run.add_argument("--batch_size", type=int, default=SlideExtractionSettings.batch_size)
    run.add_argument(
        "--num_workers", type=int, default=SlideExtractionSettings.num_workers, help="DataLoader"
    )
    run.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto = bf16 on GPU"
    )
    run.add_argument("--device", default=None, help="default: this rank's GPU (LOCAL_RANK), else the CPU")
    run.add_argument(
        "--tiling_workers", type=int, default=1, help="processes tiling the slides given as files"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    add_patch_arguments(parser.add_argument_group("tiling of the slides given as files (as exaonepath-tile)"))
    add_tissue_arguments(parser.add_argument_group("tissue detection (as exaonepath-tile)"))
    add_rank_arguments(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> SlideExtractionSettings:
    """The parsed command line as typed settings (reads `--slide_list` files and the `--stain_reference` JSON)."""
    reference = None
    if args.stain_reference is not None:
        reference = StainReference.from_dict(json.loads(args.stain_reference.read_text()))
    tiling = TilingConfig(
        patch_size=args.patch_size,
        target_mpp=args.target_mpp,
        min_tissue_fraction=args.min_tissue,
        resize_to_target=args.resize,
        write_images=False,
        backend=args.backend,
        mpp=args.mpp,
        tissue=tissue_config_from_args(args),
    )
    return SlideExtractionSettings(
        inputs=tuple(slide_paths(args.inputs, args.slide_list)),
        model=args.model,
        output_dir=args.output_dir,
        tokens=args.tokens,
        pooling=args.pooling,
        revision=args.revision,
        stain_normalize=not args.no_stain_normalization,
        stain_reference=reference,
        tiling=tiling,
        tiling_workers=args.tiling_workers,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        precision=args.precision,
        device=args.device,
        rank=args.rank,
        world_size=args.world_size,
        progress=not args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when every slide of this process is done, 1 when some failed (the others are written),
    2 on bad input."""
    args = build_parser().parse_args(argv)
    summaries: list[SlideExtractionSummary] = []

    def command() -> None:
        summary = extract_slide_features(settings_from_args(args))
        summaries.append(summary)
        share = f"{summary.rank}: " if summary.rank.is_distributed else ""
        print(
            f"{share}{len(summary.extracted)} slides extracted, {len(summary.skipped)} already done, "
            f"{len(summary.failures)} failed; {summary.num_patches} patches in {summary.seconds:.1f} s "
            f"-> {summary.output_dir}"
        )
        if summary.failures:
            print_failures(summary.report_path, summary.failures)

    code = run_command("exaonepath-extract", command)
    if code:
        return code
    return 1 if summaries[0].failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
