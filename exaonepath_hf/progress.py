"""Progress of long work: a tqdm bar on a terminal, plain log lines in a log file.

A bar redraws itself with carriage returns and, when nested, cursor moves: in a file (a Slurm log, `nohup`,
CI) those control codes pile up into one unreadable line. Off a terminal the same bar therefore writes its
status as a log record every `LOG_INTERVAL_S` seconds and once at the end, in the commands' one log format.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

__all__ = ["LOG_INTERVAL_S", "progress_bar"]

logger = logging.getLogger(__name__)

#: Seconds between two status lines of a bar that writes to a log file.
LOG_INTERVAL_S = 30.0


class _Discard:
    """Where a logged bar's own drawing goes: its status reaches the log through `display` instead."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class _LoggedProgress(tqdm):
    _logged_count: float | None = None

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        # tqdm also draws the empty bar it starts with, the bar it erases (msg ""), and at close the state it
        # drew last: none of these is news in a log
        if msg == "" or self.n == self._logged_count or (self.n == 0 and self.total):
            return True
        self._logged_count = self.n
        logger.info("%s", msg or self.format_meter(**self.format_dict))
        return True


def progress_bar(*, enabled: bool = True, **tqdm_arguments) -> tqdm:
    """A progress bar taking tqdm's arguments: a live bar on a terminal, log lines otherwise; none when not
    `enabled` (e.g. a process other than the main one) or when info lines are off (a command's `--quiet`)."""
    enabled = enabled and logger.isEnabledFor(logging.INFO)
    if not enabled or sys.stderr.isatty():
        return tqdm(disable=not enabled, **tqdm_arguments)
    return _LoggedProgress(file=_Discard(), mininterval=LOG_INTERVAL_S, **tqdm_arguments)
