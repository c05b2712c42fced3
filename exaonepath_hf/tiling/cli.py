"""`exaonepath-tile SLIDES... --output_dir DIR`: cut tissue patches from whole-slide images into parquet shards."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from ..cli import add_output_argument, add_quiet_argument, run_command
from .config import TilingConfig
from .pipeline import tile_slides
from .ranks import add_rank_arguments, resolve_rank
from .slide_io import SLIDE_BACKENDS, expand_slide_inputs
from .tissue import TissueDetectionConfig

__all__ = [
    "add_patch_arguments",
    "add_tissue_arguments",
    "build_parser",
    "config_from_args",
    "main",
    "print_failures",
    "slide_paths",
    "tissue_config_from_args",
]

_DEFAULTS = TilingConfig()
_TISSUE_DEFAULTS = TissueDetectionConfig()


def _threshold(value: str) -> int | str:
    if value == "otsu":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'otsu' or an integer 0-254, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-tile",
        description=(
            "Cut non-overlapping tissue patches of a fixed physical size (default 256 px at 0.5 µm/px, CLAM-style "
            "as in EXAONEPath pretraining) from whole-slide images, into parquet shards that `datasets` streams. "
            "Reruns resume: complete slides are skipped; failed slides are listed in DIR/failures.json. Several "
            "processes (torchrun, accelerate launch, srun, or --rank/--world_size) split the slides between them "
            "and tile into one DIR."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "slides",
        nargs="+",
        type=Path,
        help="slide files (SVS, TIFF, NDPI, DICOM .dcm) or folders of them; a folder of .dcm files is one slide",
    )
    parser.add_argument(
        "--slide_list",
        "--slide-list",
        action="store_true",
        help="treat each SLIDES argument as a text file of slide paths",
    )
    add_output_argument(parser, "output folder")
    parser.add_argument("--workers", type=int, default=1, help="slides tiled in parallel (processes)")
    add_patch_arguments(parser.add_argument_group("patches"))
    _add_output_arguments(parser.add_argument_group("output"))
    add_tissue_arguments(parser.add_argument_group("tissue detection"))
    add_rank_arguments(parser)
    add_quiet_argument(parser)
    return parser


def add_patch_arguments(grid: argparse._ArgumentGroup) -> None:
    """Where patches are cut: size, MPP, tissue share, resizing, fallback MPP, reader (`config_from_args`)."""
    grid.add_argument(
        "--patch_size",
        "--patch-size",
        type=int,
        default=_DEFAULTS.patch_size,
        help="patch side in px at --target_mpp",
    )
    grid.add_argument(
        "--target_mpp",
        "--target-mpp",
        type=float,
        default=_DEFAULTS.target_mpp,
        help="µm/px defining patch size",
    )
    grid.add_argument(
        "--min_tissue",
        "--min-tissue",
        type=float,
        default=_DEFAULTS.min_tissue_fraction,
        help="tissue fraction to keep a patch",
    )
    grid.add_argument(
        "--resize", action="store_true", help="store patches resized to --patch_size (default: native size)"
    )
    grid.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="level-0 µm/px for slides whose metadata has none or an implausible one",
    )
    grid.add_argument("--backend", choices=SLIDE_BACKENDS, default=_DEFAULTS.backend, help="slide reader")


def _add_output_arguments(out: argparse._ArgumentGroup) -> None:
    out.add_argument(
        "--format", choices=("png", "jpeg"), default=_DEFAULTS.image_format, help="patch encoding"
    )
    out.add_argument("--jpeg_quality", "--jpeg-quality", type=int, default=_DEFAULTS.jpeg_quality)
    out.add_argument(
        "--shard_size",
        "--shard-size",
        type=int,
        default=_DEFAULTS.patches_per_shard,
        help="max patches per parquet shard",
    )
    out.add_argument("--row_group_size", "--row-group-size", type=int, default=_DEFAULTS.row_group_size)
    out.add_argument(
        "--thumbnail_size",
        "--thumbnail-size",
        type=int,
        default=_DEFAULTS.thumbnail_size,
        help="thumbnail longest side",
    )
    out.add_argument(
        "--coords_only",
        "--coords-only",
        action="store_true",
        help="write coordinates and thumbnails, no image shards",
    )


def add_tissue_arguments(tissue: argparse._ArgumentGroup) -> None:
    """Tissue detection flags (`tissue_config_from_args`)."""
    tissue.add_argument(
        "--detection_mpp", "--detection-mpp", type=float, default=_TISSUE_DEFAULTS.detection_mpp
    )
    tissue.add_argument("--median_blur", "--median-blur", type=int, default=_TISSUE_DEFAULTS.median_blur)
    tissue.add_argument(
        "--threshold", type=_threshold, default=_TISSUE_DEFAULTS.threshold, help="'otsu' or 0-254"
    )
    tissue.add_argument("--otsu_floor", "--otsu-floor", type=int, default=_TISSUE_DEFAULTS.otsu_floor)
    tissue.add_argument("--closing", type=int, default=_TISSUE_DEFAULTS.closing)
    tissue.add_argument(
        "--min_region_area",
        "--min-region-area",
        type=float,
        default=_TISSUE_DEFAULTS.min_region_area_mm2,
        help="mm²",
    )
    tissue.add_argument(
        "--min_hole_area",
        "--min-hole-area",
        type=float,
        default=_TISSUE_DEFAULTS.min_hole_area_mm2,
        help="mm²",
    )
    tissue.add_argument(
        "--max_holes",
        "--max-holes",
        type=int,
        default=_TISSUE_DEFAULTS.max_holes_per_region,
        help="per region (CLAM: 8); no cap",
    )


def tissue_config_from_args(args: argparse.Namespace) -> TissueDetectionConfig:
    return TissueDetectionConfig(
        detection_mpp=args.detection_mpp,
        median_blur=args.median_blur,
        threshold=args.threshold,
        otsu_floor=args.otsu_floor,
        closing=args.closing,
        min_region_area_mm2=args.min_region_area,
        min_hole_area_mm2=args.min_hole_area,
        max_holes_per_region=args.max_holes,
    )


def config_from_args(args: argparse.Namespace) -> TilingConfig:
    tissue = tissue_config_from_args(args)
    return TilingConfig(
        patch_size=args.patch_size,
        target_mpp=args.target_mpp,
        min_tissue_fraction=args.min_tissue,
        resize_to_target=args.resize,
        image_format=args.format,
        jpeg_quality=args.jpeg_quality,
        write_images=not args.coords_only,
        patches_per_shard=args.shard_size,
        row_group_size=args.row_group_size,
        thumbnail_size=args.thumbnail_size,
        backend=args.backend,
        mpp=args.mpp,
        tissue=tissue,
    )


def slide_paths(arguments: Sequence[Path], slide_list: bool) -> list[Path]:
    """The slides a command line names: its arguments, or with `--slide_list` the lines of the text files they
    are (blank lines and `#` comments skipped)."""
    if not slide_list:
        return list(arguments)
    paths = []
    for listing in arguments:
        for line in Path(listing).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                paths.append(Path(line.strip()))
    return paths


def print_failures(listing: Path, failures: Iterable[Mapping[str, str]]) -> None:
    """On stderr: where the failed slides are listed, then each one's path, error type and message."""
    print(f"failed slides are listed in {listing}:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure['path']}: {failure['error']}: {failure['message']}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 when every slide was tiled, 1 when some failed (the others are done)."""
    args = build_parser().parse_args(argv)
    return run_command("exaonepath-tile", lambda: _tile(args), quiet=args.quiet)


def _tile(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    slides = expand_slide_inputs(slide_paths(args.slides, args.slide_list))
    rank = resolve_rank(args.rank, args.world_size)
    summary = tile_slides(
        slides,
        args.output_dir,
        config,
        num_workers=args.workers,
        progress=not args.quiet,
        rank=rank.rank,
        world_size=rank.world_size,
    )
    share = f"{rank}: " if rank.is_distributed else ""
    print(
        f"{share}{len(summary.tiled)} slides tiled, {len(summary.skipped)} already complete, "
        f"{len(summary.failures)} failed; {summary.num_patches} patches in {args.output_dir / 'shards'} "
        f"({summary.seconds:.1f} s)"
    )
    if summary.failures:
        print_failures(summary.failures_path, [asdict(failure) for failure in summary.failures])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
