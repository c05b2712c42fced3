"""The slide room's console script, light: `exaonepath-extract`.

Its parser is built here, and `--help` and argument errors answered, without importing torch, transformers or
h5py (the tiling flags come from `exaonepath_hf.tiling.cli`, the forward flags from `eval.common.cli`, both
light); `extract_main(argv)` parses first and imports the library (`features`) only to build typed settings
and run. `python -m exaonepath_hf.eval.slide.features` (and `accelerate launch -m ...`) runs the same `main`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ...cli import run_command
from ...tiling import TilingConfig
from ...tiling.cli import (
    add_patch_arguments,
    add_tissue_arguments,
    print_failures,
    slide_paths,
    tissue_config_from_args,
)
from ...tiling.ranks import add_rank_arguments
from ..common.cli import add_forward_arguments, forward_settings, read_stain_reference

if TYPE_CHECKING:
    from .features import SlideExtractionSettings, SlideExtractionSummary

__all__ = ["build_extract_parser", "extract_main", "extract_settings"]

# ----------------------------------------------------------------------------------------- exaonepath-extract


def build_extract_parser() -> argparse.ArgumentParser:
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
    add_forward_arguments(run, num_workers=4)
    run.add_argument("--device", default=None, help="default: this rank's GPU (LOCAL_RANK), else the CPU")
    run.add_argument(
        "--tiling_workers", type=int, default=1, help="processes tiling the slides given as files"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    add_patch_arguments(parser.add_argument_group("tiling of the slides given as files (as exaonepath-tile)"))
    add_tissue_arguments(parser.add_argument_group("tissue detection (as exaonepath-tile)"))
    add_rank_arguments(parser)
    return parser


def extract_settings(args: argparse.Namespace) -> SlideExtractionSettings:
    """The parsed command line as typed settings (reads `--slide_list` files and the `--stain_reference` JSON)."""
    from .features import SlideExtractionSettings

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
        pooling=args.pooling,
        revision=args.revision,
        stain_normalize=not args.no_stain_normalization,
        stain_reference=read_stain_reference(args.stain_reference),
        tiling=tiling,
        tiling_workers=args.tiling_workers,
        forward=forward_settings(args, tokens=args.tokens),
        device=args.device,
        rank=args.rank,
        world_size=args.world_size,
    )


def extract_main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when every slide of this process is done, 1 when some failed (the others are written),
    2 on bad input."""
    args = build_extract_parser().parse_args(argv)
    summaries: list[SlideExtractionSummary] = []

    def command() -> None:
        from .features import extract_slide_features

        summary = extract_slide_features(extract_settings(args))
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
