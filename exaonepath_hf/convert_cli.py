"""`exaonepath-convert`, light: its parser is built, and `--help` and argument errors answered, without
importing torch; `main` parses first and imports `convert` only to run it. `python -m exaonepath_hf.convert_cli`
runs it too.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .cli import run_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-convert",
        description="Convert the EXAONEPath release, its hub layout, or timm/DINO ViT weights to a "
        "save_pretrained folder (safetensors, remote code, processor, model card).",
    )
    parser.add_argument("source", help="EXAONEPath.ckpt, a release/hub folder, or a timm/DINO weights file")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> None:
        from .convert import convert

        convert(
            args.source,
            args.out,
            overwrite=args.overwrite,
            num_attention_heads=args.num_attention_heads,
            push_to_hub=args.push_to_hub,
            private=args.private or None,
        )

    return run_command("exaonepath-convert", command)


if __name__ == "__main__":
    raise SystemExit(main())
