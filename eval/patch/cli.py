"""The patch room's console scripts, light: `exaonepath-probe`, `-report` and `-convert-dataset`.

Each command's parser is built here, and `--help` and argument errors answered, without importing torch,
datasets or sklearn; `<command>_main(argv)` parses first and imports the library (`linear_probe`, `report`,
`converters`) only to build typed settings and run. The choices that name registry entries
(`PAPER_TASK_NAMES`, `PROTOCOL_NAMES`) are spelled here, and tests/test_architecture.py pins them to the
registries (`tasks`, `probes`). `python -m exaonepath_hf.eval.patch.linear_probe` (`report`, `converters`)
runs the same `main`.
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
from ..common.cli import (
    add_cpu_threads_argument,
    add_extraction_arguments,
    apply_cpu_threads,
    extraction_settings,
    read_stain_reference,
)

if TYPE_CHECKING:
    from .linear_probe import LinearProbeSettings

__all__ = [
    "PAPER_TASK_NAMES",
    "PROBE_DESCRIPTION",
    "PROTOCOL_NAMES",
    "REPORT_DESCRIPTION",
    "build_convert_dataset_parser",
    "build_probe_parser",
    "build_report_parser",
    "convert_dataset_main",
    "probe_main",
    "probe_settings",
    "report_main",
]

#: `tasks.PAPER_TASK_ORDER`: the paper's six benchmarks, in Table 1's order.
PAPER_TASK_NAMES = ("pcam", "mhist", "crc100k", "til", "msi_crc", "msi_stad")
#: `sorted(probes.PRESETS)`: the probing protocols.
PROTOCOL_NAMES = ("eva", "lbfgs", "paper")

# ------------------------------------------------------------------------------------------- exaonepath-probe

PROBE_DESCRIPTION = """\
Linear probing of a frozen encoder on the paper's six benchmarks or any local imagefolder.

    exaonepath-probe --model PATH_OR_HUB_ID --task crc100k
    exaonepath-probe --model PATH --task all --data_root /data/benchmarks   # mhist/ til/ msi_crc/ msi_stad/
    exaonepath-probe --model PATH --task imagefolder --data_dir DIR --test_fraction 0.25
    accelerate launch -m exaonepath_hf.eval.patch.linear_probe ...     # feature extraction across processes / nodes

Features are extracted once per (model, dataset revision, split, preprocessing) into the feature cache,
then each protocol (`--protocol paper eva lbfgs`) trains on the cache. Each (task, protocol) writes
`OUTPUT/<model>/<task>/<protocol>.record.json` (every setting, versions, revisions, metrics per seed,
mean ± sd) and `<protocol>.predictions.safetensors`; `OUTPUT/report.md` renders the paper's Table 1.
In Python: `run_linear_probe(LinearProbeSettings(...))`.
"""


def build_probe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-probe",
        description=PROBE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="folder, hub id, .ckpt/state-dict file, timm:NAME or hf-hub:ORG/NAME"
    )
    parser.add_argument("--revision", default=None, help="model revision on the hub")
    parser.add_argument("--label", default=None, help="model name in the report (default: folder / id name)")
    parser.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto")
    parser.add_argument("--task", required=True, choices=(*PAPER_TASK_NAMES, "all", "imagefolder"))
    parser.add_argument(
        "--data_dir", type=Path, help="imagefolder of a local task (or of --task imagefolder)"
    )
    parser.add_argument(
        "--data_root", type=Path, help="with --task all: folder holding mhist/ til/ msi_crc/ msi_stad/"
    )
    parser.add_argument("--dataset_revision", default=None, help="hub dataset revision")
    parser.add_argument("--class_names", default=None, help="imagefolder: comma-separated label order to pin")
    parser.add_argument(
        "--val_fraction", type=float, default=0.2, help="imagefolder without val: share of train"
    )
    parser.add_argument(
        "--test_fraction", type=float, default=None, help="imagefolder without test: share held out"
    )
    parser.add_argument("--split_seed", type=int, default=42)
    add_stain_normalization_argument(parser)
    parser.add_argument(
        "--stain_reference", type=Path, default=None, help="JSON with stain_matrix, max_concentrations"
    )
    parser.add_argument("--protocol", nargs="+", choices=PROTOCOL_NAMES, default=["paper"])
    parser.add_argument("--iterations", type=int, default=None, help="override the protocol's iterations")
    parser.add_argument("--eval_every", type=int, default=None, help="override the validation interval")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the protocol's seeds")
    add_cpu_threads_argument(parser)
    add_output_argument(parser, "records, logs and report", default=Path("results/linear_probe"))
    add_quiet_argument(parser)
    add_extraction_arguments(parser, num_workers=4)
    parser.add_argument(
        "--probe_device", default=None, help="device for probe training (default: cuda if available)"
    )
    return parser


def probe_settings(args: argparse.Namespace) -> LinearProbeSettings:
    """The parsed command line as typed settings (reads the `--stain_reference` JSON)."""
    from .linear_probe import LinearProbeSettings

    return LinearProbeSettings(
        model=args.model,
        task=args.task,
        revision=args.revision,
        label=args.label,
        pooling=args.pooling,
        data_dir=args.data_dir,
        data_root=args.data_root,
        dataset_revision=args.dataset_revision,
        class_names=tuple(args.class_names.split(",")) if args.class_names else None,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        stain_normalize=args.stain_normalization == "on",
        stain_reference=read_stain_reference(args.stain_reference),
        protocols=tuple(args.protocol),
        iterations=args.iterations,
        eval_every=args.eval_every,
        seeds=tuple(args.seeds) if args.seeds is not None else None,
        output_dir=args.output_dir,
        probe_device=args.probe_device,
        extraction=extraction_settings(args),
    )


def probe_main(argv: Sequence[str] | None = None) -> int:
    args = build_probe_parser().parse_args(argv)
    apply_cpu_threads(args.cpu_threads)

    def command() -> None:
        from .linear_probe import run_linear_probe

        run_linear_probe(probe_settings(args))

    return run_command("exaonepath-probe", command, quiet=args.quiet, libraries=("transformers", "datasets"))


# ------------------------------------------------------------------------------------------ exaonepath-report

REPORT_DESCRIPTION = """\
Run records and the Table 1 report (the paper's numbers beside ours, with the difference).

Each probing run writes one JSON record (`exaonepath-probe`); this command renders a directory of them:

    exaonepath-report results/linear_probe            # prints and writes results/linear_probe/report.md
"""


def build_report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-report",
        description=REPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("results", type=Path, help="directory with *.record.json files")
    add_output_argument(parser, "folder for report.md (default: RESULTS)", required=False)
    add_quiet_argument(parser)
    return parser


def report_main(argv: Sequence[str] | None = None) -> int:
    args = build_report_parser().parse_args(argv)

    def command() -> None:
        from .report import write_report

        out = args.output_dir / "report.md" if args.output_dir else None
        report = write_report(args.results, out).read_text()
        if not args.quiet:
            print(report)

    return run_command("exaonepath-report", command, quiet=args.quiet)


# --------------------------------------------------------------------------------- exaonepath-convert-dataset


def build_convert_dataset_parser() -> argparse.ArgumentParser:
    # `converters` is light (the standard library, PIL, numpy): its registry and docstring are the command's
    from . import converters

    parser = argparse.ArgumentParser(
        prog="exaonepath-convert-dataset",
        description=converters.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", choices=sorted(converters.CONVERTERS))
    parser.add_argument("src", type=Path, help="folder with the downloaded original files")
    add_output_argument(parser, "imagefolder to write (metadata.csv + images/)")
    parser.add_argument("--link", choices=converters.LINK_MODES, default="symlink")
    add_quiet_argument(parser)
    return parser


def convert_dataset_main(argv: Sequence[str] | None = None) -> int:
    args = build_convert_dataset_parser().parse_args(argv)

    def command() -> None:
        from .converters import convert_dataset

        print(convert_dataset(args.dataset, args.src, args.output_dir, link=args.link))

    return run_command("exaonepath-convert-dataset", command, quiet=args.quiet)
