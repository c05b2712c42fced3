"""`exaonepath-demo`, light: its parser is built, and `--help` and argument errors answered, without importing
torch; `main` parses first and imports `demo` only to run it. `python -m exaonepath_hf.demo_cli` runs
it too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli import add_output_argument, add_quiet_argument, run_command

__all__ = ["DEMO_DESCRIPTION", "build_parser", "main"]

DEMO_DESCRIPTION = """\
`exaonepath-demo`: the whole EXAONEPath idea on a real slide, offline, in minutes on a laptop CPU.

1. Tile the bundled CC0 slide CMU-1-Small-Region.svs at 0.5 µm/px into 256 px tissue patches (thumbnail with
   the tissue grid).
2. Re-stain every patch as virtual labs would (`exaonepath_hf.eval.robustness.virtual_labs`): the patch as scanned, two
   fixed stain perturbations in Ruifrok-Johnston HED space and two Reinhard colour transfers toward real
   images of other labs. Not Macenko: Macenko input would undo a Macenko re-staining by construction. With `--data`, labelled tiles (class subfolders or a metadata.csv) are re-stained instead of
   the slide's patches, which gives the robustness index the tissue classes it needs.
3. Get an EXAONEPath-architecture model: the released weights when `--model` points at a converted folder or
   hub repo; otherwise a small ViT pretrained here for a few minutes with the package's own DINO loop on the
   Macenko-normalized patches (clearly a demo model, not EXAONEPath).
4. Extract features from raw and from Macenko-normalized input and measure them the field's way
   (`exaonepath_hf.eval.robustness.run`): paired cosine and top-10 retrieval of a patch's re-stainings, the
   robustness index when there are classes, how much the features cluster by lab; t-SNE coloured by lab.

    exaonepath-demo --out exaonepath-demo                      # demo model, a few minutes on a CPU
    exaonepath-demo --out exaonepath-demo --model path/to/exaonepath-vitb16
    exaonepath-demo --out exaonepath-demo --data labelled-tiles   # tiles in class subfolders: defines the RI
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-demo",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_output_argument(parser, "output folder", default=Path("exaonepath-demo"))
    parser.add_argument(
        "--model", help="converted EXAONEPath folder or hub repo; default: pretrain a demo model"
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="labelled tiles to re-stain instead of the slide's patches (class subfolders "
        "or a metadata.csv with file_name,label): defines the robustness index",
    )
    parser.add_argument(
        "--lab_data",
        type=Path,
        help="fit the Reinhard labs on DIR/stain-templates/ (default: the packaged fit on the shared data)",
    )
    parser.add_argument(
        "--train_steps", "--train-steps", type=int, default=40, help="DINO steps of the demo model"
    )
    parser.add_argument("--workers", type=int, default=1, help="tiling processes")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    add_quiet_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .demo import missing_extras

    problem = missing_extras()
    if problem:
        print(problem, file=sys.stderr)
        return 1

    def demo() -> None:
        import torch

        from .demo import DemoSettings, run_demo

        settings = DemoSettings(
            out=args.output_dir,
            model=args.model,
            data=args.data,
            lab_data=args.lab_data,
            train_steps=args.train_steps,
            workers=args.workers,
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        )
        run_demo(settings)

    return run_command("exaonepath-demo", demo, quiet=args.quiet, libraries=("transformers", "datasets"))


if __name__ == "__main__":
    raise SystemExit(main())
