"""Tile whole slides into MPP-correct tissue patches: plan, extract, write shards, resume, run in parallel.

Output folder layout (`out_dir`):

    shards/<slide_id>-<part>.parquet   patches (see `shards.py`), at most `patches_per_shard` rows each
    coords/<slide_id>.csv              kept patches: x, y, level, size, mpp, tissue_fraction
    thumbnails/<slide_id>.png          thumbnail, tissue mask tinted green, kept patches outlined in blue
    slides/<slide_id>.json             a slide's record, written last: its presence marks the slide complete
    manifest.json                      the settings, and the records of every complete slide
    failures.json                      slides the latest run could not tile, with the reason
    tiling_config.json                 the settings the folder was tiled with (a rerun must match them)

Several processes may tile one slide list into one folder (`rank`/`world_size`, see `ranks.py`): each tiles its
share and writes `manifest.rank-00003.json` / `failures.rank-00003.json` (rank 3) instead of the shared files,
so no two processes write one file; readers merge them (`output.read_manifest`).

Every file is written to a temporary name and renamed into place. A slide's shards are written to
`.staging/<slide_id>/` and published only once all of them are complete, then its record is written; a rerun
skips slides with a record and redoes any other slide from scratch, so a killed run (or rank) resumes with no
duplicated and no missing patch.

The types of the records and the readers of this folder are in `output`.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic_io import atomic_write_bytes, move_files_into, record_folder_settings, write_json
from ..progress import progress_bar
from .config import TilingConfig
from .grid import grid_coordinates, level0_patch_size, tissue_fractions
from .output import SlideFailure, SlideRecord, TilingManifest, write_coords_csv
from .ranks import record_name, split_for_rank
from .shards import PatchRecord, encode_patch, write_shard
from .slide_io import SlideReader, open_slide, read_downsampled, read_downsampled_views
from .thumbnail import render_thumbnail
from .tissue import TissueMask, detect_tissue

__all__ = [
    "PatchPlan",
    "TilingSummary",
    "plan_patches",
    "read_patch",
    "read_patch_at",
    "slide_id_from_path",
    "tile_slide",
    "tile_slides",
    "worker_process_context",
]

logger = logging.getLogger(__name__)


@dataclass
class PatchPlan:
    """Where a slide's patches are and how they are read: the grid, the tissue mask, the kept patches."""

    slide_mpp: float
    mpp_source: str  # "metadata" or "fallback"
    patch_size_level0: int
    read_level: int  # pyramid level the patch pixels are read from
    stored_size: int  # side of a stored patch in pixels
    stored_mpp: float  # µm per stored pixel
    coordinates: np.ndarray  # (N, 2) level-0 top-left (x, y) of kept patches, row-major
    tissue_fractions: np.ndarray  # (N,) tissue fraction of each kept patch
    num_candidates: int  # whole grid patches inside the slide
    tissue: TissueMask
    view_scale: float  # level-0 pixels per tissue-mask pixel
    thumbnail_view: np.ndarray  # low-resolution RGB view the thumbnail is drawn on
    thumbnail_scale: float  # level-0 pixels per thumbnail_view pixel


@dataclass
class TilingSummary:
    """What a `tile_slides` run did."""

    out_dir: Path
    tiled: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[SlideFailure] = field(default_factory=list)
    num_patches: int = 0  # patches of the slides tiled or skipped by this run
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1
    # the complete slides the run's manifest lists (every slide of the folder; for a rank, of its share)
    slides: dict[str, SlideRecord] = field(default_factory=dict)

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / record_name("manifest", self.rank, self.world_size)

    @property
    def failures_path(self) -> Path:
        return self.out_dir / record_name("failures", self.rank, self.world_size)

    @property
    def ok(self) -> bool:
        return not self.failures


def slide_id_from_path(path: str | Path) -> str:
    """The file name without its extension(s): `TCGA-XX.svs` -> `TCGA-XX`, `a.ome.tiff` -> `a`."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix else name


def plan_patches(reader: SlideReader, config: TilingConfig) -> PatchPlan:
    """Detect tissue on a low-resolution view and keep the grid patches with enough tissue."""
    slide_mpp, mpp_source = reader.resolve_mpp(fallback=config.mpp)
    patch_size = level0_patch_size(config.patch_size, config.target_mpp, slide_mpp)
    if config.resize_to_target:
        # The coarsest level still at least as fine as the target; pixels are resized from there.
        read_level = reader.best_level_for_downsample(patch_size / config.patch_size)
        stored_size, stored_mpp = config.patch_size, patch_size * slide_mpp / config.patch_size
    else:
        read_level, stored_size, stored_mpp = 0, patch_size, slide_mpp
    detection_downsample = max(1.0, config.tissue.detection_mpp / slide_mpp)
    thumbnail_downsample = max(1.0, max(reader.dimensions) / config.thumbnail_size)
    if thumbnail_downsample < detection_downsample:  # a small slide: the thumbnail needs a finer view
        (view, view_scale), (thumbnail, thumbnail_scale) = read_downsampled_views(
            reader, [detection_downsample, thumbnail_downsample]
        )
    else:
        view, view_scale = read_downsampled(reader, detection_downsample)
        thumbnail, thumbnail_scale = view, view_scale
    tissue = detect_tissue(view, config.tissue, mpp=view_scale * slide_mpp)
    width, height = reader.dimensions
    candidates = grid_coordinates(width, height, patch_size)
    fractions = tissue_fractions(tissue.mask, view_scale, candidates, patch_size)
    keep = fractions >= config.min_tissue_fraction
    return PatchPlan(
        slide_mpp=slide_mpp,
        mpp_source=mpp_source,
        patch_size_level0=patch_size,
        read_level=read_level,
        stored_size=stored_size,
        stored_mpp=stored_mpp,
        coordinates=candidates[keep],
        tissue_fractions=fractions[keep],
        num_candidates=len(candidates),
        tissue=tissue,
        view_scale=view_scale,
        thumbnail_view=thumbnail,
        thumbnail_scale=thumbnail_scale,
    )


def read_patch(reader: SlideReader, x: int, y: int, plan: PatchPlan) -> np.ndarray:
    """Pixels of the patch whose level-0 top-left is (x, y), as they are stored (RGB uint8)."""
    return read_patch_at(reader, x, y, plan.patch_size_level0, plan.read_level, plan.stored_size)


def read_patch_at(
    reader: SlideReader, x: int, y: int, patch_size_level0: int, read_level: int, stored_size: int
) -> np.ndarray:
    """Pixels of the patch whose level-0 top-left is (x, y), as the tiler stores them (RGB uint8); the geometry
    is a slide record's (`patch_size_level0`, `read_level`, `stored_patch_size`).

    Native size reads `patch_size_level0` pixels of level 0; otherwise `read_level` is read and resized
    (bicubic, antialiased) to `stored_size`.
    """
    side = max(1, round(patch_size_level0 / reader.level_downsamples[read_level]))
    pixels = reader.read_region((x, y), read_level, (side, side))
    if side != stored_size:
        resized = Image.fromarray(pixels).resize((stored_size,) * 2, Image.Resampling.BICUBIC)
        pixels = np.asarray(resized)
    return pixels


def _shard_name(slide_id: str, part: int) -> str:
    return f"{slide_id}-{part:05d}.parquet"


def _remove_partial_outputs(out_dir: Path, slide_id: str) -> None:
    """Delete what an interrupted run left of a slide: its staging folder and any published shard.

    Shards are published in part order, so the leftovers are parts 0, 1, ... up to the first missing one;
    probing names keeps this independent of how many other slides' shards the folder holds.
    """
    shutil.rmtree(out_dir / ".staging" / slide_id, ignore_errors=True)
    part = 0
    while (shard := out_dir / "shards" / _shard_name(slide_id, part)).is_file():
        shard.unlink()
        part += 1


def _thumbnail_png(plan: PatchPlan, config: TilingConfig) -> bytes:
    image = render_thumbnail(
        plan.thumbnail_view,
        plan.thumbnail_scale,
        plan.tissue.mask,
        plan.coordinates,
        plan.patch_size_level0,
        config.thumbnail_size,
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _slide_record_path(out_dir: Path, slide_id: str) -> Path:
    return out_dir / "slides" / f"{slide_id}.json"


def _complete_record(out_dir: Path, slide_id: str) -> SlideRecord | None:
    """The slide's record when all its outputs exist (the slide is done), else None."""
    path = _slide_record_path(out_dir, slide_id)
    if not path.is_file():
        return None
    record = SlideRecord.from_dict(json.loads(path.read_text()))
    outputs = [out_dir / "shards" / name for name in record.shards]
    outputs += [out_dir / record.coords, out_dir / record.thumbnail]
    return record if all(p.is_file() for p in outputs) else None


def _record_folder_config(out_dir: Path, config: TilingConfig) -> None:
    """Record the settings on first use of `out_dir`; refuse to mix patches cut with other settings."""
    record_folder_settings(
        out_dir / "tiling_config.json",
        config.output_settings(),
        "was tiled with other settings",
        "rerun with the same settings to resume, or choose a new --out folder",
    )


def _write_shards(
    reader: SlideReader, plan: PatchPlan, config: TilingConfig, out_dir: Path, slide_id: str
) -> tuple[list[str], list[int]]:
    """Write the slide's patches as shards into `.staging/<slide_id>/`, then publish them into `shards/`
    together; returns the shards' names and rows (none when the config writes no images)."""
    count = len(plan.coordinates)
    if not (config.write_images and count):
        return [], []

    def records(indices: np.ndarray) -> Iterator[PatchRecord]:
        for i in indices:
            x, y = (int(v) for v in plan.coordinates[i])
            yield PatchRecord(
                image=encode_patch(read_patch(reader, x, y, plan), config.image_format, config.jpeg_quality),
                slide_id=slide_id,
                x=x,
                y=y,
                level=plan.read_level,
                size=plan.patch_size_level0,
                mpp=plan.stored_mpp,
                tissue_fraction=float(plan.tissue_fractions[i]),
            )

    shard_names: list[str] = []
    shard_rows: list[int] = []
    staging = out_dir / ".staging" / slide_id
    staging.mkdir(parents=True, exist_ok=True)
    num_shards = -(-count // config.patches_per_shard)
    for part, indices in enumerate(np.array_split(np.arange(count), num_shards)):
        name = _shard_name(slide_id, part)
        shard_rows.append(write_shard(staging / name, records(indices), config.row_group_size))
        shard_names.append(name)
    move_files_into(staging, out_dir / "shards")
    staging.rmdir()
    return shard_names, shard_rows


def tile_slide(
    path: str | Path, out_dir: str | Path, config: TilingConfig | None = None, slide_id: str | None = None
) -> SlideRecord:
    """Tile one slide into `out_dir` and return its record (see the module docstring for the layout).

    Raises on any problem with the slide (missing MPP, unreadable file, ...); `tile_slides` turns those into
    entries of failures.json instead.
    """
    config = config or TilingConfig()
    out_dir = Path(out_dir)
    slide_id = slide_id or slide_id_from_path(path)
    start = time.perf_counter()
    _record_folder_config(out_dir, config)
    for sub in ("shards", "coords", "thumbnails", "slides"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    _remove_partial_outputs(out_dir, slide_id)

    with open_slide(path, config.backend) as reader:
        plan = plan_patches(reader, config)
        shard_names, shard_rows = _write_shards(reader, plan, config, out_dir, slide_id)
        coords_path = Path("coords") / f"{slide_id}.csv"
        thumbnail_path = Path("thumbnails") / f"{slide_id}.png"
        write_coords_csv(
            out_dir / coords_path,
            plan.coordinates,
            plan.tissue_fractions,
            plan.read_level,
            plan.patch_size_level0,
            plan.stored_mpp,
        )
        atomic_write_bytes(out_dir / thumbnail_path, _thumbnail_png(plan, config))
        record = SlideRecord(
            slide_id=slide_id,
            path=str(Path(path).resolve()),
            reader=type(reader).__name__,
            dimensions=tuple(reader.dimensions),
            level_count=reader.level_count,
            slide_mpp=plan.slide_mpp,
            mpp_source=plan.mpp_source,
            patch_size_level0=plan.patch_size_level0,
            read_level=plan.read_level,
            stored_patch_size=plan.stored_size,
            stored_mpp=plan.stored_mpp,
            num_candidates=plan.num_candidates,
            num_patches=len(plan.coordinates),
            tissue_threshold=plan.tissue.threshold,
            tissue_area_fraction=round(plan.tissue.tissue_fraction, 6),
            shards=tuple(shard_names),
            shard_rows=tuple(shard_rows),
            coords=coords_path.as_posix(),
            thumbnail=thumbnail_path.as_posix(),
            seconds=round(time.perf_counter() - start, 3),
        )
    write_json(_slide_record_path(out_dir, slide_id), record.to_dict())
    return record


@dataclass(frozen=True)
class _Task:
    path: str
    slide_id: str
    out_dir: str
    config: TilingConfig


_Outcome = SlideRecord | SlideFailure


def _run_task(task: _Task) -> _Outcome:
    """Tile one slide; any error becomes a `SlideFailure` so that one bad slide never stops a run."""
    try:
        return tile_slide(task.path, task.out_dir, task.config, task.slide_id)
    except Exception as error:
        logger.debug("slide %s failed:\n%s", task.slide_id, traceback.format_exc())
        _remove_partial_outputs(Path(task.out_dir), task.slide_id)
        return SlideFailure(task.slide_id, task.path, type(error).__name__, str(error))


def worker_process_context() -> multiprocessing.context.BaseContext:
    """forkserver where available, else spawn; never plain fork, which is unsafe once slide readers
    (zarr's I/O thread) have started threads in the parent.

    The fork server imports this module once and forks workers from it, so worker start-up does not repeat the
    imports (numpy, PIL, the slide readers) and their memory pages are shared between workers.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _run_isolated(task: _Task, context, run: Callable[[_Task], _Outcome]) -> _Outcome:
    """Run a slide alone in a fresh process, so a hard crash (a reader's segfault, OOM kill) is pinned on it."""
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(run, task).result()
        except BrokenProcessPool:
            _remove_partial_outputs(Path(task.out_dir), task.slide_id)
            return SlideFailure(
                task.slide_id,
                task.path,
                "WorkerCrashed",
                "the worker process died while tiling this slide (a crash in the slide reader or out of memory)",
            )


def _run_in_processes(
    tasks: Sequence[_Task],
    num_workers: int,
    on_done: Callable[[_Task, _Outcome], None],
    run: Callable[[_Task], _Outcome] = _run_task,
) -> None:
    """Apply `run` (a picklable, module-level function) to every task in `num_workers` worker processes, at
    most one task in flight per worker.

    Keeping the window that small bounds memory and, when a worker dies and takes the pool down, limits the
    slides whose fate is unknown to the ones in flight: each of those is retried alone, the rest go on in a
    fresh pool.
    """
    context = worker_process_context()
    queue = list(reversed(tasks))
    while queue:
        suspects: list[_Task] = []
        pool = ProcessPoolExecutor(num_workers, mp_context=context)
        running: dict[Future, _Task] = {}
        try:
            while (queue or running) and not suspects:
                while queue and len(running) < num_workers:
                    task = queue.pop()
                    running[pool.submit(run, task)] = task
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        suspects.append(task)
                        continue
                    on_done(task, outcome)
            suspects.extend(running.values())
        finally:
            pool.shutdown(wait=not suspects, cancel_futures=True)
        for task in suspects:
            logger.warning("a worker died; retrying slide %s alone", task.slide_id)
            on_done(task, _run_isolated(task, context, run))


def _write_manifest(summary: TilingSummary, config: TilingConfig, slide_ids: Sequence[str]) -> TilingManifest:
    """Summarise complete slides into the run's manifest: a single process lists every complete slide in the
    folder (not only this run's) in manifest.json; a rank lists the complete slides of its share (`slide_ids`)
    in its own manifest.rank-NNNNN.json, which no other rank writes."""
    out_dir = summary.out_dir
    if summary.world_size == 1:
        slide_ids = [path.stem for path in sorted((out_dir / "slides").glob("*.json"))]
    records = [_complete_record(out_dir, slide_id) for slide_id in sorted(slide_ids)]
    slides = {record.slide_id: record for record in records if record is not None}
    manifest = TilingManifest(config, slides, list(summary.failures))
    write_json(
        summary.manifest_path, {**manifest.to_dict(), "rank": summary.rank, "world_size": summary.world_size}
    )
    return manifest


def _tasks(slides: Sequence[str | Path], out_dir: Path, config: TilingConfig) -> list[_Task]:
    """A task per slide; raises when two slides would share an id (and so one set of output files)."""
    tasks = [_Task(str(p), slide_id_from_path(p), str(out_dir), config) for p in slides]
    ids: dict[str, str] = {}
    for task in tasks:
        if task.slide_id in ids:
            raise ValueError(
                f"two slides share the id {task.slide_id!r} ({ids[task.slide_id]} and {task.path}); slide ids "
                "come from file names and must be unique within one output folder: rename one or tile them "
                "into separate folders"
            )
        ids[task.slide_id] = task.path
    return tasks


def _skip_complete(tasks: Sequence[_Task], summary: TilingSummary) -> list[_Task]:
    """The tasks whose slide is not complete in the output folder; the others count as skipped."""
    todo = []
    for task in tasks:
        record = _complete_record(summary.out_dir, task.slide_id)
        if record is None:
            todo.append(task)
        else:
            summary.skipped.append(task.slide_id)
            summary.num_patches += record.num_patches
    if summary.skipped:
        logger.info(
            "%d of %d slides already complete in %s: skipped",
            len(summary.skipped),
            len(tasks),
            summary.out_dir,
        )
    return todo


def _run_tasks(todo: Sequence[_Task], num_workers: int, summary: TilingSummary, progress: bool) -> None:
    """Tile the slides of `todo` (in this process or in `num_workers` processes) into `summary`, with a
    progress bar; failures.json is rewritten at each failure, so that it is current while the run goes on."""
    bar = progress_bar(total=len(todo), desc="tiling", unit="slide", enabled=progress)

    def on_done(task: _Task, outcome: _Outcome) -> None:
        if isinstance(outcome, SlideFailure):
            summary.failures.append(outcome)
            logger.warning("slide %s failed: %s: %s", task.slide_id, outcome.error, outcome.message)
            write_json(summary.failures_path, [asdict(f) for f in summary.failures])
        else:
            summary.tiled.append(task.slide_id)
            summary.num_patches += outcome.num_patches
            logger.debug(
                "slide %s: %d patches in %.1f s", task.slide_id, outcome.num_patches, outcome.seconds
            )
        bar.update(1)
        bar.set_postfix(patches=summary.num_patches, failed=len(summary.failures))

    try:
        if num_workers <= 1:
            for task in todo:
                on_done(task, _run_task(task))
        else:
            _run_in_processes(todo, num_workers, on_done)
    finally:
        bar.close()


def tile_slides(
    slides: Sequence[str | Path],
    out_dir: str | Path,
    config: TilingConfig | None = None,
    num_workers: int = 1,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> TilingSummary:
    """Tile many slides into `out_dir`, in parallel processes, resuming a previous run.

    Slides already complete in `out_dir` are skipped; a slide that fails is recorded in failures.json and the
    others go on. Writes manifest.json at the end. `num_workers=1` tiles in this process; with more, workers
    are started by forkserver (spawn where unavailable), so a calling script needs the usual
    `if __name__ == "__main__":` guard.

    With `world_size` > 1 this process tiles only its share of `slides` (`ranks.split_for_rank`: round robin on
    the sorted slide ids; every rank must get the same list) and writes manifest.rank-NNNNN.json and
    failures.rank-NNNNN.json instead of the shared files.
    """
    config = config or TilingConfig()
    out_dir = Path(out_dir)
    tasks = _tasks(slides, out_dir, config)
    share = split_for_rank(tasks, rank, world_size, key=lambda task: task.slide_id)
    if world_size > 1:
        logger.info(
            "rank %d of %d: %d of %d slides are this rank's", rank, world_size, len(share), len(tasks)
        )
    _record_folder_config(out_dir, config)

    summary = TilingSummary(out_dir=out_dir, rank=rank, world_size=world_size)
    start = time.perf_counter()
    todo = _skip_complete(share, summary)
    try:
        _run_tasks(todo, num_workers, summary, progress)
    finally:
        write_json(summary.failures_path, [asdict(f) for f in summary.failures])
        summary.slides = _write_manifest(summary, config, [task.slide_id for task in share]).slides
    summary.seconds = time.perf_counter() - start
    return summary
