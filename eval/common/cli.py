"""Command-line flags every evaluation command spells the same way.

Library functions never change process-wide state; a command owns its process, so the thread count a user
asks for is applied by `main`, before any work starts.
"""

from __future__ import annotations

import argparse

import torch

__all__ = ["add_cpu_threads_argument", "apply_cpu_threads"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_cpu_threads_argument(parser: argparse.ArgumentParser) -> None:
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
        torch.set_num_threads(count)
