"""`exaonepath-fit-stain`, light: its parser is built, and `--help` and argument errors answered, without
importing torch; `main` parses first and imports `fit_stain` only to run it.
`python -m exaonepath_hf.fit_stain_cli` runs it too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli import add_output_argument, add_quiet_argument, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-fit-stain",
        description="Fit a Macenko stain reference to H&E target image(s) and save an EXAONEPath image processor.",
    )
    parser.add_argument("targets", nargs="+", type=Path, help="target image file(s) (PNG, JPEG, TIFF, ...)")
    add_output_argument(parser, "folder to write the processor to")
    parser.add_argument(
        "--processor",
        type=Path,
        default=None,
        help="start from this saved processor (default: the release's)",
    )
    parser.add_argument("--io", type=float, default=None, help="transmitted light intensity (default 240)")
    parser.add_argument("--alpha", type=float, default=None, help="stain angle percentile in %% (default 1)")
    parser.add_argument("--beta", type=float, default=None, help="background OD threshold (default 0.15)")
    parser.add_argument("--device", default=None, help="fit on this device, e.g. cuda (default cpu)")
    add_quiet_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Fits, saves the processor and prints the fitted reference as JSON on stdout."""
    args = build_parser().parse_args(argv)
    settings = {"stain_io": args.io, "stain_alpha": args.alpha, "stain_beta": args.beta}

    def fit_and_print() -> None:
        from .fit_stain import fit_stain

        reference = fit_stain(
            args.targets,
            args.output_dir,
            processor=args.processor,
            device=args.device,
            **{key: value for key, value in settings.items() if value is not None},
        )
        json.dump(reference.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")

    return run_command("exaonepath-fit-stain", fit_and_print, quiet=args.quiet, libraries=("transformers",))


if __name__ == "__main__":
    raise SystemExit(main())
