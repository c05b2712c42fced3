"""What every console script shares: log format, and bad input as one line on stderr with exit code 2.

A command's `main(argv) -> int` parses its flags into typed settings and hands the call to `run_command`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

__all__ = ["BAD_INPUT_EXIT_CODE", "INTERRUPTED_EXIT_CODE", "run_command"]

logger = logging.getLogger(__name__)

#: argparse's own code for a bad command line; bad files or values found later get the same.
BAD_INPUT_EXIT_CODE = 2
#: The shell's code for a process ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_CODE = 130


def run_command(
    prog: str, command: Callable[[], object], interrupted: str = "rerun the same command to resume"
) -> int:
    """Runs `command()`; returns 0, or `BAD_INPUT_EXIT_CODE` after naming the bad input on stderr, or
    `INTERRUPTED_EXIT_CODE` after saying how to go on (`interrupted`) when the user pressed Ctrl-C.

    Bad input is a missing file, an output that exists, or a value the library rejects (FileNotFoundError,
    FileExistsError, ValueError); anything else is a bug or an environment failure and propagates with its
    traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        command()
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        logger.debug("bad input", exc_info=True)
        print(f"{prog}: error: {error}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    except KeyboardInterrupt:  # every output is written atomically: nothing half-written to warn about
        print(f"{prog}: interrupted: {interrupted}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 0
