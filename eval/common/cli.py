"""Command-line flags every evaluation command spells the same way, defined without importing torch: a command
answers `--help` and argument errors at once, and imports the library only when it runs.

Library functions never change process-wide state; a command owns its process, so the thread count a user
asks for is applied by `main`, before any work starts.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .extraction import ForwardSettings

__all__ = ["add_cpu_threads_argument", "add_forward_arguments", "apply_cpu_threads", "forward_settings"]

Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_cpu_threads_argument(parser: Parser) -> None:
    parser.add_argument(
        "--cpu_threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads for this command (default: torch's). Probes and heads trained on a CPU "
        "take steps too small to split: on a busy machine one thread is often faster",
    )


def apply_cpu_threads(count: int | None) -> None:
    """Sets torch's intra-op thread count for the whole process, once, from a command's `main`."""
    if count is not None:
        import torch

        torch.set_num_threads(count)


def add_forward_arguments(parser: Parser, num_workers: int, batch_size: int = 64) -> None:
    """How images reach the encoder (`ForwardSettings`); `forward_settings` reads the flags back."""
    parser.add_argument(
        "--batch_size", type=_positive_int, default=batch_size, help="images per forward pass"
    )
    parser.add_argument(
        "--num_workers", type=int, default=num_workers, help="loader worker processes that read and decode"
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto = bf16 on a GPU, else fp32",
    )
    parser.add_argument(
        "--preprocess_on",
        choices=("auto", "device", "workers"),
        default="auto",
        help="where the model's processor (Macenko, resize, crop, normalize) runs: auto = on the GPU when the "
        "model runs on one, else in the loader workers",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the encoder (pays off on long GPU runs)"
    )


def forward_settings(args: argparse.Namespace, **extra) -> ForwardSettings:
    """The flags of `add_forward_arguments` (and `extra` fields such as `tokens`) as typed settings."""
    from .extraction import ForwardSettings

    return ForwardSettings(
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        precision=args.precision,
        preprocess_on=args.preprocess_on,
        compile=args.compile,
        progress=not getattr(args, "quiet", False),
        **extra,
    )
