"""What every console script shares: one flag vocabulary, one log format, `--quiet`, and bad input as one line on
stderr with exit code 2.

A command's `main(argv) -> int` parses its flags into typed settings and hands the call to `run_command`. This
module imports neither torch nor the Hugging Face libraries: commands answer `--help` at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "BAD_INPUT_EXIT_CODE",
    "INTERRUPTED_EXIT_CODE",
    "LOG_FORMAT",
    "STAIN_NORMALIZATION_CHOICES",
    "add_output_argument",
    "add_quiet_argument",
    "add_stain_normalization_argument",
    "configure_output",
    "run_command",
]

logger = logging.getLogger(__name__)

#: argparse's own code for a bad command line; bad files or values found later get the same.
BAD_INPUT_EXIT_CODE = 2
#: The shell's code for a process ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_CODE = 130


#: Where each Hugging Face library turns its progress bars off. Named, not imported: a command imports only the
#: libraries it says it uses (`exaonepath-tile` none: its worker processes stay light).
_PROGRESS_SWITCHES = {
    "transformers": ("transformers.utils.logging", "disable_progress_bar"),
    "datasets": ("datasets", "disable_progress_bars"),
}
#: Every command's log lines, ours and the Hugging Face libraries' alike.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: `--stain_normalization`: Macenko on each patch (the paper) or not.
STAIN_NORMALIZATION_CHOICES = ("on", "off")

Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def add_output_argument(
    parser: Parser, help: str, default: Path | None = None, required: bool | None = None
) -> None:
    """`--output_dir` (alias `--out`); `required` unless the command has a `default` or says otherwise."""
    parser.add_argument(
        "--output_dir",
        "--out",
        dest="output_dir",
        type=Path,
        required=default is None if required is None else required,
        default=default,
        help=f"{help} (--out is an alias)" + (" (default: %(default)s)" if default is not None else ""),
    )


def add_quiet_argument(parser: Parser) -> None:
    parser.add_argument(
        "--quiet", action="store_true", help="warnings and errors only: no progress bars, no info lines"
    )


def add_stain_normalization_argument(parser: Parser, compare: bool = False) -> None:
    """`--stain_normalization on|off`; a command that compares the two (`compare`) takes both, the default."""
    if compare:
        parser.add_argument(
            "--stain_normalization",
            nargs="+",
            choices=STAIN_NORMALIZATION_CHOICES,
            default=["off", "on"],
            help="inputs to compare: raw (off), Macenko-normalized (on); default both",
        )
        return
    parser.add_argument(
        "--stain_normalization",
        choices=STAIN_NORMALIZATION_CHOICES,
        default="on",
        help="Macenko on every patch before resize/crop (the paper: on, the default)",
    )


def configure_output(quiet: bool = False, libraries: tuple[str, ...] = ()) -> None:
    """One log format for the command and the Hugging Face `libraries` it uses; `quiet` keeps warnings and
    errors only. The libraries' progress bars go when `quiet`, and also when stderr is a log file rather than a
    terminal (ours then write log lines: `exaonepath_hf.progress`).

    Each of `libraries` is imported here, so that its records reach the root handler instead of its own (their
    info lines are for their developers: warnings and errors only). The progress-bar switches are also set in
    the environment, which the command's worker processes inherit.
    """
    logging.basicConfig(format=LOG_FORMAT)  # a no-op where the root logger has handlers (a test, a notebook)
    logging.getLogger().setLevel(logging.WARNING if quiet else logging.INFO)
    logging.captureWarnings(True)
    no_bars = quiet or not sys.stderr.isatty()
    if no_bars:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    for library in libraries:
        importlib.import_module(f"{library}.utils.logging")  # which installs the library's own handler
        library_logger = logging.getLogger(library)
        library_logger.handlers.clear()
        library_logger.propagate = True
        library_logger.setLevel(logging.WARNING)
        if no_bars:  # the environment is read once, at the library's import, which may be behind us
            module, switch = _PROGRESS_SWITCHES[library]
            getattr(importlib.import_module(module), switch)()


def run_command(
    prog: str,
    command: Callable[[], object],
    interrupted: str = "rerun the same command to resume",
    quiet: bool = False,
    libraries: tuple[str, ...] = (),
) -> int:
    """Runs `command()`; returns 0 (or the exit code `command` returned), or `BAD_INPUT_EXIT_CODE` after naming
    the bad input on stderr, or `INTERRUPTED_EXIT_CODE` after saying how to go on (`interrupted`) when the user
    pressed Ctrl-C.

    Bad input is a missing file, an output that exists, or a value the library rejects (FileNotFoundError,
    FileExistsError, ValueError); anything else is a bug or an environment failure and propagates with its
    traceback. `quiet` and `libraries` go to `configure_output`.
    """
    configure_output(quiet, libraries)
    try:
        outcome = command()
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        logger.debug("bad input", exc_info=True)
        print(f"{prog}: error: {error}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    except KeyboardInterrupt:  # every output is written atomically: nothing half-written to warn about
        print(f"{prog}: interrupted: {interrupted}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return outcome if isinstance(outcome, int) else 0
