"""`exaonepath-convert`, light: its parser is built, and `--help` and argument errors answered, without
importing torch; `main` parses first and imports `convert` only to run it. `python -m exaonepath_hf.convert_cli`
runs it too.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .cli import add_output_argument, add_quiet_argument, run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-convert",
        description="Convert the EXAONEPath release, its hub layout, or timm/DINO ViT weights to a "
        "save_pretrained folder (safetensors, remote code, processor, model card).",
    )
    parser.add_argument("source", help="EXAONEPath.ckpt, a release/hub folder, or a timm/DINO weights file")
    add_output_argument(parser, "output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output_dir if it exists")
    parser.add_argument(
        "--num_attention_heads",
        "--num-attention-heads",
        type=int,
        help="heads, when the source has no config (default: hidden size / 64)",
    )
    parser.add_argument(
        "--push_to_hub", "--push-to-hub", metavar="REPO", help="also upload the folder to this hub model repo"
    )
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    parser.add_argument(
        "--format",
        choices=("transformers", "timm"),
        default="transformers",
        help="folder layout: transformers' save_pretrained, or timm's (timm.create_model('local-dir:OUT'); timm "
        "does not apply Macenko, the card says how to) (default: transformers)",
    )
    add_quiet_argument(parser)
    parser.add_argument(
        "--weights_source",
        "--weights-source",
        choices=("exaonepath-release", "other"),
        default="other",
        help="what the weights are, for the model card: 'exaonepath-release' (the released EXAONEPath.ckpt or "
        "hub weights: the release card, LG's licence) or 'other' (a card that claims no licence and no "
        "training data) (default: other)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> None:
        from .convert import convert

        convert(
            args.source,
            args.output_dir,
            overwrite=args.overwrite,
            num_attention_heads=args.num_attention_heads,
            push_to_hub=args.push_to_hub,
            private=args.private or None,
            folder_format=args.format,
            weights_source=args.weights_source,
        )

    return run_command("exaonepath-convert", command, quiet=args.quiet, libraries=("transformers",))


if __name__ == "__main__":
    raise SystemExit(main())
