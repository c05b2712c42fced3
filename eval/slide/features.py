"""Per-slide feature bags: every tissue patch of a slide through a frozen encoder, one HDF5 file per slide.

    exaonepath-extract TILES_OR_SLIDES... --model MODEL --output_dir DIR [--tokens cls|cls+mean]
    python -m exaonepath_hf.eval.slide.features ...        (same flags; the parser: `cli`)

Inputs are `exaonepath-tile` output folders (their complete slides, as their manifests list them) and slide
files or folders of slides, which are tiled on the way into `DIR/tiles/` (coordinates and thumbnails only; the
pixels are read from the slide) with the tiler's flags. Every patch goes through the encoder's processor
(Macenko on unless `--stain_normalization off`) and any encoder `load_encoder` takes.

With `--coords FOLDER` the slides given as files are not tiled: their patches are the ones CLAM or TRIDENT
chose, read from `FOLDER/<slide_id>_patches.h5` (TRIDENT) or `FOLDER/<slide_id>.h5` (CLAM), or the same
names in `FOLDER/patches/` (`bags.read_patch_coords`). Each patch is read from the slide at the file's level
and size and handed to the processor as the tiler's patches are: TRIDENT's `patch_size_level0` level-0 pixels
at native resolution, or with `--resize` read from the coarsest level still fine enough and resized to its
`patch_size`; CLAM's `patch_size` pixels of `patch_level`, as CLAM reads them. A slide without a coordinates
file stops the run before any work (all of them named: add their files or leave those slides out);
coordinates files of no given slide are counted in the report and logged, as a cohort's folder serves any
subset of its slides. Of the tiling flags only `--resize`, `--backend` and `--mpp` (for slides without one)
apply to these slides.

Output folder `DIR`:

    <slide_id>.h5                 the slide's bag (layout below), written atomically: present means complete
    extraction_config.json        encoder, preprocessing, tokens, precision: a rerun into DIR must match them
    extraction_report.json        this run's extracted / skipped / failed slides (the error of each failure);
                                  a rank of a multi-process run writes extraction_report.rank-NNNNN.json
    tiles/                        exaonepath-tile output of the slides given as files (thumbnails for heatmaps;
                                  not with --coords)

A rerun skips slides whose file exists; a slide that cannot be read is reported and the others go on. Several
processes (torchrun, `accelerate launch`, srun, or `--rank/--world_size`) split the slides between them
(`exaonepath_hf.tiling.ranks`) and write into one DIR; each runs on its GPU (`LOCAL_RANK`), bf16 on GPU.

Bags are written as `eval.slide.bags` lays them out (TRIDENT's layout: `features` [N, D], `coords` [N, 2]).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ...atomic_io import record_folder_settings, write_json
from ...stain_normalization import StainReference
from ...tiling import (
    RankInfo,
    ShardPatches,
    SlideReader,
    TiledSlide,
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
from ...tiling.ranks import record_name
from ...tiling.slide_io import MissingMPPError, expand_slide_inputs
from ..common.encoders import Encoder, Pooling, Preprocessing, load_encoder
from ..common.extraction import FeatureBatch, ForwardSettings, ForwardTimes, stream_features
from .bags import (
    MAGNIFICATION_MICRONS,
    PatchCoordsFile,
    listing,
    match_coords_files,
    patch_geometry,
    read_patch_coords,
    write_slide_features,
)

__all__ = [
    "SlideExtractionSettings",
    "SlideExtractionSummary",
    "extract_slide_features",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True)
class SlideExtractionSettings:
    """Everything `extract_slide_features` needs (the `exaonepath-extract` flags).

    `inputs`: `exaonepath-tile` output folders, slide files, and folders of slide files (a folder holding .dcm
    files is one DICOM slide). `tiling` cuts the slides given as files (its `write_images` is ignored: only
    coordinates are stored, the pixels are read from the slide); with `coords`, a folder of CLAM or TRIDENT
    patch-coordinate files, those slides are read at the files' patches instead (module docstring). `forward`:
    batches, loader workers, tokens, precision and where the model's processor runs (`ForwardSettings`).
    `rank`/`world_size` default to the environment (`ranks.resolve_rank`); `device` to this rank's GPU, else
    the CPU.
    """

    inputs: tuple[Path, ...]
    model: str
    output_dir: Path
    pooling: Pooling = "auto"
    revision: str | None = None
    stain_normalize: bool = True
    stain_reference: StainReference | None = None
    tiling: TilingConfig = field(default_factory=TilingConfig)
    coords: Path | None = None
    tiling_workers: int = 1
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    device: str | None = None
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("no input given: pass exaonepath-tile output folders or slide files")
        if self.tiling_workers < 1:
            raise ValueError(f"tiling_workers must be >= 1, got {self.tiling_workers}")


@dataclass
class SlideExtractionSummary:
    """What one process of an `extract_slide_features` run did."""

    output_dir: Path
    rank: RankInfo
    extracted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)  # slide_id, path, stage, error, message
    patch_failures: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # slide_id: patch, error
    num_patches: int = 0  # patches of the slides extracted by this run
    failed_patches: int = 0  # patches left out of their slide's bag (unreadable or rejected; in the report)
    unused_coords_files: list[str] = field(default_factory=list)  # --coords files of no input slide
    seconds: float = 0.0
    forward_seconds: float = 0.0  # preprocessing on the device and the encoder's forward pass
    wait_seconds: float = 0.0  # waiting for the loader workers
    startup_seconds: float | None = None  # from the start to the first batch's features (imports not counted)
    steady_patches_per_second: float | None = None  # after the first batch

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
            "patch_failures": self.patch_failures,
            "num_patches": self.num_patches,
            "failed_patches": self.failed_patches,
            "unused_coords_files": self.unused_coords_files,
            "seconds": round(self.seconds, 3),
            "forward_seconds": round(self.forward_seconds, 3),
            "wait_seconds": round(self.wait_seconds, 3),
            "startup_seconds": None if self.startup_seconds is None else round(self.startup_seconds, 3),
            "steady_patches_per_second": None
            if self.steady_patches_per_second is None
            else round(self.steady_patches_per_second, 2),
            "patches_per_second": round(self.num_patches / self.seconds, 2) if self.seconds > 0 else None,
        }


def _collect_inputs(inputs: Sequence[Path]) -> tuple[list[TiledSlide], list[Path]]:
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
            tiled += [TiledSlide(folder, record, manifest.config) for record in manifest.slides.values()]
        else:
            to_tile += expand_slide_inputs([path])
    ids: dict[str, str] = {}
    for slide_id, where in [(s.slide_id, str(s.out_dir)) for s in tiled] + [
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
) -> tuple[list[TiledSlide], list[dict[str, str]]]:
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
        progress=settings.forward.progress,
        rank=rank.rank,
        world_size=rank.world_size,
    )
    complete = [TiledSlide(tiles_dir, record, config) for record in summary.slides.values()]
    failures = [{**asdict(failure), "stage": "tiling"} for failure in summary.failures]
    return complete, failures


@dataclass(frozen=True)
class _SlideJob:
    """A slide to extract: its patches' coordinates, how they are read, and its bag's `coords` attributes
    (`bags.patch_geometry` and where they came from). `shard_files`: the tiler's image shards, rows in `coords`
    order, read instead of the slide where the tiler wrote them."""

    slide_id: str
    path: str  # the slide file
    coords: np.ndarray  # [N, 2] level-0 top-left (x, y), in bag order
    geometry: tuple[int, int, int]  # `read_patch_at`'s patch_size_level0, read_level, stored size
    attributes: dict[str, Any]
    shard_files: tuple[Path, ...] = ()


def _tiled_job(slide: TiledSlide) -> _SlideJob:
    """A slide of a tiling output folder, its pixels from its shards where the tiler wrote them."""
    record, config = slide.record, slide.config
    if record.num_patches == 0:
        raise ValueError(
            f"the tiler kept no tissue patch of {slide.slide_id} (see {slide.out_dir / 'thumbnails'}); "
            "an empty bag predicts nothing: lower --min_tissue or check the slide"
        )
    width, height = record.dimensions
    geometry = patch_geometry(
        slide.slide_id,
        patch_size=config.patch_size,
        patch_size_level0=record.patch_size_level0,
        level0_mpp=record.slide_mpp,
        target_mpp=config.target_mpp,
        level0_width=width,
        level0_height=height,
    )
    return _SlideJob(
        slide.slide_id,
        record.path,
        slide.coords().xy,
        (record.patch_size_level0, record.read_level, record.stored_patch_size),
        {**geometry, "mpp_source": record.mpp_source, "min_tissue_fraction": config.min_tissue_fraction},
        tuple(slide.shard_files()),
    )


def _level0_mpp(
    reader: SlideReader, coords_file: PatchCoordsFile, fallback: float | None
) -> tuple[float, str]:
    """The slide's level-0 µm/px and its source, for the bag's attributes only (the file's geometry cuts the
    patches): the slide's or `--mpp`, else TRIDENT's recorded level-0 magnification."""
    try:
        return reader.resolve_mpp(fallback=fallback)
    except MissingMPPError:
        magnification = coords_file.attributes.get("level0_magnification")
        if not magnification:
            raise
        return MAGNIFICATION_MICRONS / float(magnification), "coords file"


def _coords_file_job(slide_path: Path, coords_path: Path, tiling: TilingConfig) -> _SlideJob:
    """A slide read at the patches of its CLAM or TRIDENT coordinates file (module docstring)."""
    slide_id = slide_id_from_path(slide_path)
    coords_file = read_patch_coords(coords_path)
    if not len(coords_file.coords):
        raise ValueError(
            f"{coords_path} lists no patch of {slide_id}; an empty bag predicts nothing: check the slide's "
            "tissue segmentation or leave the slide out"
        )
    with open_slide(slide_path, tiling.backend) as reader:
        geometry = coords_file.geometry(reader, tiling.resize_to_target)
        coords_file.check_inside(reader.dimensions)
        level0_mpp, mpp_source = _level0_mpp(reader, coords_file, tiling.mpp)
        width, height = reader.dimensions
    side, size = geometry[0], coords_file.patch_size
    target = coords_file.attributes.get("target_magnification")
    attributes = patch_geometry(
        slide_id,
        patch_size=size,
        patch_size_level0=side,
        level0_mpp=level0_mpp,
        # TRIDENT's nominal magnification, as a tiled bag records the nominal target_mpp; CLAM names none
        target_mpp=MAGNIFICATION_MICRONS / float(target) if target else level0_mpp * side / size,
        level0_width=width,
        level0_height=height,
        overlap=int(coords_file.attributes.get("overlap") or 0),
    )
    provenance = {
        "mpp_source": mpp_source,
        "coords_file": coords_path.name,
        "coords_layout": coords_file.layout,
    }
    path = str(Path(slide_path).resolve())
    return _SlideJob(slide_id, path, coords_file.coords, geometry, {**attributes, **provenance})


def _pair_with_coords(slides: list[Path], folder: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Each slide with its coordinates file in `folder`, and the names of the files of no slide; a slide without
    a file stops the run (module docstring)."""
    if not slides:
        raise ValueError(
            f"--coords {folder} applies to slides given as files or folders of slides, and the inputs hold none"
        )
    ids = [slide_id_from_path(path) for path in slides]
    found, missing, unused = match_coords_files(ids, folder)
    if missing:
        raise ValueError(
            f"slides without a coordinates file (<slide_id>_patches.h5 or <slide_id>.h5) in {folder}: "
            f"{listing(missing)}; add their files, or leave those slides out of the inputs"
        )
    if unused:
        logger.info("%d coordinates files in %s are of no input slide: not used", len(unused), folder)
    pairs = [(path, found[slide_id]) for path, slide_id in zip(slides, ids, strict=True)]
    return pairs, [path.name for path in unused]


class _SlidePatches(Dataset):
    """A slide's patches read from the slide at its coordinates, as the tiler would store them."""

    def __init__(self, job: _SlideJob, backend: str):
        self.path, self.backend, self.coords, self.geometry = job.path, backend, job.coords, job.geometry
        self._reader = None  # opened on first use, in the process (loader worker) that reads

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


def _patches(job: _SlideJob, backend: str) -> ShardPatches | _SlidePatches:
    """The slide's patches: from its shards, or read from the slide where the tiler wrote no images."""
    if job.shard_files:
        return ShardPatches(job.shard_files)
    return _SlidePatches(job, backend)


class _SlidesAsOneSource(Dataset):
    """The patches of every slide to extract as one source of `stream_features`, slide after slide: one loader
    for the whole run (no start-up per slide), and batches that run on from one slide into the next.

    Items are `((slide, patch, x, y), image, None)`, or `((slide, patch, None, None), None, error)` for a patch
    that cannot be read. A worker reads runs of consecutive patches: it closes a slide it has moved past.
    """

    def __init__(self, slides: Sequence[_SlideJob], backend: str):
        self.readers = [_patches(slide, backend) for slide in slides]
        self.starts = np.cumsum([0] + [len(reader) for reader in self.readers])
        self._open: int | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, position: int):
        slide = int(np.searchsorted(self.starts, position, side="right")) - 1
        if (
            self._open is not None
            and self._open != slide
            and isinstance(self.readers[self._open], _SlidePatches)
        ):
            self.readers[self._open].close()
        self._open = slide
        patch = position - int(self.starts[slide])
        try:
            image, x, y = self.readers[slide][patch]
        except Exception as error:  # counted in the slide's report entry, never fatal to the run
            return (slide, patch, None, None), None, f"{type(error).__name__}: {error}"
        return (slide, patch, x, y), image, None


@dataclass
class _PendingBag:
    features: list[np.ndarray] = field(default_factory=list)  # [n, D] runs, in stream order
    coords: list[np.ndarray] = field(default_factory=list)  # [n, 2] runs
    fallbacks: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    seen: int = 0


class _BagWriter:
    """Collects the stream's features per slide and writes a slide's bag as soon as its last patch is in."""

    def __init__(self, slides: Sequence[_SlideJob], output_dir: Path, produced_by: dict[str, Any], summary):
        self.slides, self.output_dir, self.produced_by, self.summary = (
            slides,
            output_dir,
            produced_by,
            summary,
        )
        self.pending: dict[int, _PendingBag] = {}
        self.stain_normalize = produced_by["preprocessing"]["stain_normalize"]

    def add(self, batch: FeatureBatch) -> None:
        """A batch's rows go to their slides as whole runs (a batch spans a few slides, not one per row)."""
        slides = np.fromiter((key[0] for key in batch.keys), dtype=np.int64, count=len(batch.keys))
        coords = np.array([key[2:] for key in batch.keys], dtype=np.int64).reshape(-1, 2)
        features = batch.features.numpy()
        fallbacks = ~batch.stain_normalized.numpy() if self.stain_normalize else np.zeros(len(slides), bool)
        touched = dict.fromkeys(slides.tolist())
        for slide in touched:
            rows = slides == slide
            bag = self.pending.setdefault(slide, _PendingBag())
            bag.features.append(features[rows])
            bag.coords.append(coords[rows])
            bag.fallbacks += int(fallbacks[rows].sum())
            bag.seen += int(rows.sum())
        for (slide, patch, _, _), error in batch.failed:
            bag = self.pending.setdefault(slide, _PendingBag())
            bag.failed.append({"patch": patch, "error": error})
            bag.seen += 1
            touched[slide] = None
        for slide in touched:
            if self.pending[slide].seen == len(self.slides[slide].coords):
                self._finish(self.slides[slide], self.pending.pop(slide))

    def _finish(self, slide: _SlideJob, bag: _PendingBag) -> None:
        try:
            kept = sum(len(run) for run in bag.features)
            if not kept:
                raise ValueError(
                    f"no patch of {slide.slide_id} could be read; first error: {bag.failed[0]['error']}"
                )
            if bag.failed:
                logger.warning(
                    "%s: %d of %d patches left out (%s)",
                    slide.slide_id,
                    len(bag.failed),
                    bag.seen,
                    bag.failed[0],
                )
            write_slide_features(
                self.output_dir / f"{slide.slide_id}.h5",
                np.concatenate(bag.features),
                np.concatenate(bag.coords),
                slide.attributes,
                {
                    **self.produced_by,
                    "slide_path": slide.path,
                    "stain_fallbacks": bag.fallbacks,
                    "failed_patches": len(bag.failed),
                },
            )
        except Exception as error:  # one bad slide is reported, never stops the others
            self.summary.failures.append(_failure(slide.slide_id, slide.path, "extraction", error))
            return
        self.summary.extracted.append(slide.slide_id)
        self.summary.num_patches += kept
        self.summary.failed_patches += len(bag.failed)
        if bag.failed:
            self.summary.patch_failures[slide.slide_id] = bag.failed


def _failure(slide_id: str, path: str, stage: str, error: Exception) -> dict[str, str]:
    logger.warning("slide %s failed: %s: %s", slide_id, type(error).__name__, error)
    logger.debug("slide %s failed", slide_id, exc_info=True)
    return {
        "slide_id": slide_id,
        "path": path,
        "stage": stage,
        "error": type(error).__name__,
        "message": str(error),
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
    report with its error, and the others go on; a patch that cannot be read or preprocessed is left out of its
    bag and listed under `patch_failures`. Raises (before any slide) on bad input: a missing input, duplicate
    slide ids, settings that differ from the ones `output_dir` was filled with.
    """
    started = time.perf_counter()
    rank = resolve_rank(settings.rank, settings.world_size)
    tiled, to_tile = _collect_inputs(settings.inputs)
    paired: list[tuple[Path, Path]] = []
    unused_coords: list[str] = []
    if settings.coords is not None:  # the slides given as files are read at these coordinates, not tiled
        paired, unused_coords = _pair_with_coords(to_tile, Path(settings.coords))
        to_tile = []
    device = _device(settings, rank)
    encoder = load_encoder(
        settings.model, pooling=settings.pooling, revision=settings.revision, device=device
    )
    preprocessing = encoder.default_preprocessing(
        stain_normalize=settings.stain_normalize, stain_reference=settings.stain_reference
    )
    produced_by = _produced_by(encoder, preprocessing, settings.forward, device)
    record_folder_settings(  # what decides the features: a rerun into output_dir must match it
        settings.output_dir / "extraction_config.json",
        produced_by,
        "holds features made with other settings",
        "rerun with the same model and settings to resume, or choose a new --output_dir",
    )
    summary = SlideExtractionSummary(
        output_dir=Path(settings.output_dir), rank=rank, unused_coords_files=unused_coords
    )
    if rank.is_distributed:
        logger.info("%s on %s", rank, device)
    todo = _slides_to_extract(tiled, to_tile, paired, settings, rank, summary)
    times = ForwardTimes()
    try:
        if todo:
            writer = _BagWriter(todo, summary.output_dir, produced_by, summary)
            source = _SlidesAsOneSource(todo, settings.tiling.backend)
            desc = f"{len(todo)} slides"
            for batch in stream_features(
                encoder, preprocessing, source, settings.forward, device, times, desc
            ):
                writer.add(batch)
    finally:
        summary.seconds = time.perf_counter() - started
        summary.forward_seconds, summary.wait_seconds = times.compute_seconds, times.wait_seconds
        if times.first_batch_at is not None:
            summary.startup_seconds = times.first_batch_at - started
        summary.steady_patches_per_second = times.steady_images_per_second()
        write_json(summary.report_path, {**summary.to_dict(), "settings": _settings_record(settings)})
    return summary


def _produced_by(encoder: Encoder, preprocessing: Preprocessing, forward: ForwardSettings, device) -> dict:
    """What decides the features of a bag: recorded in every bag and checked against the output folder."""
    return {
        "encoder": encoder.identity(),
        "tokens": forward.tokens,
        "feature_dim": encoder.feature_dim * (2 if forward.tokens == "cls+mean" else 1),
        "preprocessing": preprocessing.to_dict(),
        "precision": "bf16" if forward.uses_bf16(device) else "fp32",
    }


def _slides_to_extract(
    tiled: list[TiledSlide],
    to_tile: list[Path],
    paired: list[tuple[Path, Path]],
    settings: SlideExtractionSettings,
    rank: RankInfo,
    summary: SlideExtractionSummary,
) -> list[_SlideJob]:
    """This rank's share of the slides (tiling the ones given as files, or pairing them with `--coords` files),
    less the ones already extracted; a slide that cannot be prepared (no patch: an empty bag predicts nothing,
    an unreadable coordinates file) is reported and the others go on."""
    share = split_for_rank(tiled, rank.rank, rank.world_size, key=lambda slide: slide.slide_id)
    pairs = split_for_rank(paired, rank.rank, rank.world_size, key=lambda pair: slide_id_from_path(pair[0]))
    newly_tiled, summary.failures = _tile_share(to_tile, settings, rank)
    candidates: list[tuple[str, str, str, Callable[[], _SlideJob]]] = [
        (slide.slide_id, slide.record.path, "extraction", partial(_tiled_job, slide))
        for slide in share + newly_tiled
    ]
    for path, coords in pairs:
        job = partial(_coords_file_job, path, coords, settings.tiling)
        candidates.append((slide_id_from_path(path), str(path), "coords", job))
    todo = []
    for slide_id, path, stage, prepare in sorted(candidates, key=lambda candidate: candidate[0]):
        if (summary.output_dir / f"{slide_id}.h5").is_file():
            summary.skipped.append(slide_id)
            continue
        try:
            todo.append(prepare())
        except Exception as error:  # one bad slide is reported, never stops the others
            summary.failures.append(_failure(slide_id, path, stage, error))
    if summary.skipped:
        logger.info("%d slides already extracted in %s: skipped", len(summary.skipped), summary.output_dir)
    return todo


def _settings_record(settings: SlideExtractionSettings) -> dict[str, Any]:
    record = asdict(settings)
    record["inputs"] = [str(p) for p in settings.inputs]
    record["output_dir"] = str(settings.output_dir)
    record["coords"] = None if settings.coords is None else str(settings.coords)
    record["stain_reference"] = settings.stain_reference.to_dict() if settings.stain_reference else None
    return record


if __name__ == "__main__":
    from .cli import extract_main

    raise SystemExit(extract_main())
