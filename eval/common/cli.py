"""Command-line flags every evaluation command spells the same way, defined without importing torch: a command
(each room's `cli` module) answers `--help` and argument errors at once, and imports the library only when
it runs; the functions that read the flags back into typed settings import it then.

Library functions never change process-wide state; a command owns its process, so the thread count a user
asks for is applied by `main`, before any work starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from ...stain_normalization import StainReference
    from .extraction import ForwardSettings
    from .features import ExtractionSettings

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "add_cpu_threads_argument",
    "add_extraction_arguments",
    "add_forward_arguments",
    "apply_cpu_threads",
    "extraction_settings",
    "forward_settings",
    "read_stain_reference",
]

Parser = argparse.ArgumentParser | argparse._ArgumentGroup

#: Rows per resumable feature-cache chunk (`ExtractionSettings.chunk_size` and `--chunk_size`).
DEFAULT_CHUNK_SIZE = 4096
#: Images per forward pass (`ForwardSettings.batch_size` and `--batch_size`).
DEFAULT_BATCH_SIZE = 64
#: `--precision`: "auto" is bf16 on a GPU, fp32 elsewhere.
Precision = Literal["auto", "bf16", "fp32"]
#: `--preprocess_on`: where the model's processor runs; "auto" is the device when that is a GPU, the loader
#: workers on a CPU.
PreprocessOn = Literal["auto", "device", "workers"]


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


def add_forward_arguments(parser: Parser, num_workers: int, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
    """How images reach the encoder (`ForwardSettings`); `forward_settings` reads the flags back."""
    parser.add_argument(
        "--batch_size", type=_positive_int, default=batch_size, help="images per forward pass"
    )
    parser.add_argument(
        "--num_workers", type=int, default=num_workers, help="loader worker processes that read and decode"
    )
    parser.add_argument(
        "--precision",
        choices=get_args(Precision),
        default="auto",
        help="auto = bf16 on a GPU, else fp32",
    )
    parser.add_argument(
        "--preprocess_on",
        choices=get_args(PreprocessOn),
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


def add_extraction_arguments(parser: argparse.ArgumentParser, num_workers: int) -> None:
    """The feature-extraction flags every evaluation command shares; `extraction_settings` reads them back."""
    group = parser.add_argument_group("feature extraction")
    group.add_argument(
        "--cache_dir", type=Path, default=None, help="feature cache (default $EXAONEPATH_FEATURE_CACHE)"
    )
    add_forward_arguments(group, num_workers)
    group.add_argument(
        "--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE, help="rows per resumable cache chunk"
    )


def extraction_settings(args: argparse.Namespace) -> ExtractionSettings:
    """The flags of `add_extraction_arguments` as typed settings (for a command's `main`)."""
    from .features import ExtractionSettings

    return ExtractionSettings(
        cache_dir=args.cache_dir, forward=forward_settings(args), chunk_size=args.chunk_size
    )


def read_stain_reference(path: Path | None) -> StainReference | None:
    """The `--stain_reference` JSON file (`stain_matrix`, `max_concentrations`) as a `StainReference`."""
    if path is None:
        return None
    import json

    from ...stain_normalization import StainReference

    return StainReference.from_dict(json.loads(Path(path).read_text()))
