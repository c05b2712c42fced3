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

from ...cli import (
    add_output_argument,
    add_quiet_argument,
    add_stain_normalization_argument,
    run_command,
)
from ...tiling import TilingConfig
from ...tiling.cli import (
    add_patch_arguments,
    add_tissue_arguments,
    print_failures,
    slide_paths,
    tissue_config_from_args,
)
from ...tiling.ranks import add_rank_arguments
from ...tiling.slide_io import SLIDE_BACKENDS
from ..common.cli import (
    add_cpu_threads_argument,
    add_forward_arguments,
    apply_cpu_threads,
    forward_settings,
    read_stain_reference,
)
from .settings import HEAD_NAMES, HeadTrainingConfig, HeatmapSettings, SlideDataSettings, SlideProbeSettings

if TYPE_CHECKING:
    from .features import SlideExtractionSettings

__all__ = [
    "build_extract_parser",
    "build_slide_probe_parser",
    "extract_main",
    "extract_settings",
    "slide_probe_main",
    "slide_probe_settings",
]

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
        "--coords",
        type=Path,
        default=None,
        help="folder of CLAM's or TRIDENT's patch coordinates (patches/<slide>.h5 or <slide>_patches.h5): the "
        "slides given as files are read at those patches instead of being tiled; each needs its file",
    )
    parser.add_argument(
        "--model", required=True, help="folder, hub id, .ckpt/state-dict file, timm:NAME or hf-hub:ORG/NAME"
    )
    parser.add_argument("--revision", default=None, help="model revision on the hub")
    parser.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto")
    add_output_argument(parser, "output folder")
    parser.add_argument(
        "--tokens",
        choices=("cls", "cls+mean"),
        default="cls",
        help="a patch's feature: the CLS feature, or it concatenated with the mean of the patch tokens (2 x D)",
    )
    add_stain_normalization_argument(parser)
    parser.add_argument(
        "--stain_reference", type=Path, default=None, help="JSON with stain_matrix, max_concentrations"
    )
    run = parser.add_argument_group("running")
    add_forward_arguments(run, num_workers=4)
    run.add_argument("--device", default=None, help="default: this rank's GPU (LOCAL_RANK), else the CPU")
    run.add_argument(
        "--tiling_workers", type=int, default=1, help="processes tiling the slides given as files"
    )
    add_quiet_argument(run)
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
        stain_normalize=args.stain_normalization == "on",
        stain_reference=read_stain_reference(args.stain_reference),
        tiling=tiling,
        coords=args.coords,
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

    def command() -> int:
        from .features import extract_slide_features

        summary = extract_slide_features(extract_settings(args))
        share = f"{summary.rank}: " if summary.rank.is_distributed else ""
        print(
            f"{share}{len(summary.extracted)} slides extracted, {len(summary.skipped)} already done, "
            f"{len(summary.failures)} failed; {summary.num_patches} patches in {summary.seconds:.1f} s "
            f"-> {summary.output_dir}"
        )
        if summary.failures:
            print_failures(summary.report_path, summary.failures)
            return 1
        return 0

    return run_command("exaonepath-extract", command, quiet=args.quiet, libraries=("transformers",))


# ------------------------------------------------------------------------------------- exaonepath-slide-probe

SLIDE_PROBE_DESCRIPTION = """Slide-level prediction: a MIL head trained on per-slide feature bags, over several seeds, with Accelerate.

    exaonepath-slide-probe --features DIR --labels slides.csv --head abmil --output_dir OUT
    exaonepath-slide-probe ... --heatmaps --slides SLIDES_DIR   # attention over each test slide, top patches
    accelerate launch -m exaonepath_hf.eval.slide.probe ...     # data-parallel across processes / GPUs

`--features` is a folder of `<slide_id>.h5` feature bags (exaonepath-extract, TRIDENT, CLAM's h5_files) or of CLAM's
`<slide_id>.pt` bags (its pt_files; a CLAM --feat_dir is read through both); `--labels` a CSV
with slide_id, patient_id (or CLAM/TRIDENT's case_id), label[, split] (see `eval.slide.data`: patient-level splits, `--level patient`
pools a patient's slides). Heads (`eval.slide.mil`): `abmil`, gated attention MIL, or `mean`, mean pooling
plus a linear layer. Training follows eva's slide protocol: AdamW (lr 1e-3), batch 32, at most 12,500 steps and
100 epochs, a fixed number of patches sampled per training bag (`--max_patches`; all of them at evaluation),
a cosine schedule with linear warmup, and the head that scores the best validation balanced accuracy
(evaluated every epoch; between equal scores the lower validation loss wins) restored before testing;
training stops after `--patience` evaluations without improvement. Every seed trains its own head.

Writes to OUT, per task (`--name`) and head: `<task>.<head>.slide_record.json` (settings, splits, metrics per seed, and under `test` the
balanced accuracy, AUROC, macro-F1 and top-1 as mean and sd over seeds), `<task>.<head>.predictions.safetensors`
(test probabilities per seed), `<task>.<head>.heads.safetensors` (each seed's selected head), `report.md` (every
slide record in OUT) and with `--heatmaps` `heatmaps/<slide_id>.png` plus `heatmaps/<slide_id>/top*.png`
(`eval.slide.heatmaps`). In Python: `run_slide_probe(SlideProbeSettings(...))`.
"""


def build_slide_probe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-slide-probe",
        description=SLIDE_PROBE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults, data_defaults = HeadTrainingConfig(), SlideDataSettings()
    parser.add_argument(
        "--features", type=Path, required=True, help="folder of <slide_id>.h5 or CLAM .pt feature bags"
    )
    parser.add_argument(
        "--labels", type=Path, required=True, help="CSV: slide_id, patient_id (or case_id), label[, split]"
    )
    parser.add_argument("--head", choices=sorted(HEAD_NAMES), default=defaults.head)
    add_output_argument(parser, "records, report and heatmaps", default=Path("results/slide_probe"))
    add_quiet_argument(parser)
    parser.add_argument("--name", default=None, help="task name in the report (default: the CSV's file name)")
    parser.add_argument("--class_names", default=None, help="comma-separated label order to pin")
    parser.add_argument(
        "--level",
        choices=("slide", "patient"),
        default=data_defaults.level,
        help="patient: one bag per patient (its slides' patches concatenated)",
    )
    parser.add_argument("--val_fraction", type=float, default=data_defaults.val_fraction)
    parser.add_argument("--test_fraction", type=float, default=data_defaults.test_fraction)
    parser.add_argument("--split_seed", type=int, default=data_defaults.split_seed)
    parser.add_argument(
        "--allow_extra_features", action="store_true", help="ignore feature files without a CSV row"
    )
    parser.add_argument("--hidden_dim", type=int, default=defaults.hidden_dim)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight_decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--max_steps", type=int, default=defaults.max_steps)
    parser.add_argument("--max_epochs", type=int, default=defaults.max_epochs)
    parser.add_argument("--warmup_fraction", type=float, default=defaults.warmup_fraction)
    parser.add_argument("--patience", type=int, default=defaults.patience, help="0: no early stopping")
    parser.add_argument("--eval_every_epochs", type=int, default=defaults.eval_every_epochs)
    parser.add_argument("--max_patches", type=int, default=defaults.max_patches, help="0: all patches")
    parser.add_argument("--eval_batch_size", type=int, default=defaults.eval_batch_size)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    add_cpu_threads_argument(parser)
    parser.add_argument(
        "--heatmaps", action="store_true", help="attention heatmaps of the test slides (abmil)"
    )
    parser.add_argument("--slides", type=Path, default=None, help="folder of the slide files, for --heatmaps")
    parser.add_argument("--top_k", type=int, default=8, help="top-attention patches exported per slide")
    parser.add_argument("--thumbnail_size", type=int, default=1024, help="longest side of a heatmap")
    parser.add_argument(
        "--backend", choices=SLIDE_BACKENDS, default="auto", help="slide reader for --heatmaps"
    )
    return parser


def slide_probe_settings(args: argparse.Namespace) -> SlideProbeSettings:
    if args.heatmaps and args.slides is None:
        raise ValueError("--heatmaps needs --slides, the folder holding the slide files")
    return SlideProbeSettings(
        features=args.features,
        labels=args.labels,
        output_dir=args.output_dir,
        name=args.name,
        data=SlideDataSettings(
            class_names=tuple(args.class_names.split(",")) if args.class_names else None,
            level=args.level,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            allow_extra_features=args.allow_extra_features,
        ),
        training=HeadTrainingConfig(
            head=args.head,
            hidden_dim=args.hidden_dim,
            dropout=args.dropout,
            lr=args.lr,
            weight_decay=args.weight_decay,
            batch_size=args.batch_size,
            max_steps=args.max_steps,
            max_epochs=args.max_epochs,
            warmup_fraction=args.warmup_fraction,
            patience=args.patience or None,
            eval_every_epochs=args.eval_every_epochs,
            max_patches=args.max_patches or None,
            eval_batch_size=args.eval_batch_size,
            seeds=tuple(args.seeds),
        ),
        heatmaps=HeatmapSettings(args.slides, args.top_k, args.thumbnail_size, args.backend)
        if args.heatmaps
        else None,
        mixed_precision=args.mixed_precision,
        cpu=args.cpu,
    )


def slide_probe_main(argv: Sequence[str] | None = None) -> int:
    """`exaonepath-slide-probe`: parses, sets the thread count the user asked for, then imports the library."""
    args = build_slide_probe_parser().parse_args(argv)
    apply_cpu_threads(args.cpu_threads)

    def command() -> None:
        from .probe import run_slide_probe

        run_slide_probe(slide_probe_settings(args))

    return run_command("exaonepath-slide-probe", command, quiet=args.quiet, libraries=("transformers",))
