"""N processes (nodes, GPUs) working on one slide list and one output folder: who does which slide, and the
per-rank records that readers merge.

Rank and world size come from, first match wins: explicit values (`--rank` / `--world_size`), the variables
torchrun and `accelerate launch` set (RANK, WORLD_SIZE), Slurm's (SLURM_PROCID, SLURM_NTASKS), else a single
process (rank 0 of 1).

The split is round robin on the sorted slide ids: rank r takes ids[r], ids[r + W], ids[r + 2W], ... of the
sorted ids. It is deterministic, the shares are disjoint and together cover the list, their sizes differ by at
most one, and the order in which slides are given does not matter. Every rank must be given the same slide list
(the same arguments): a rank given a different list would cut it differently.

A rank never writes a file another rank writes: a run with more than one process writes its summary to
`<stem>.rank-00003.json` (rank 3), a single process to `<stem>.json`. `record_files(folder, stem)` lists both
kinds for a reader to merge (`output.read_manifest` for tiling manifests).
"""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = [
    "RankInfo",
    "add_rank_arguments",
    "record_files",
    "record_name",
    "resolve_rank",
    "split_for_rank",
]

T = TypeVar("T")

# (rank variable, world size variable, local rank variable, who sets them), in order of precedence.
_LAUNCHERS = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "torchrun / accelerate launch"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "Slurm"),
)


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a multi-process run; `local_rank` picks its GPU on a node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single process"

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"rank {self.rank} of world size {self.world_size} ({self.source}): need world_size >= 1 "
                "and 0 <= rank < world_size"
            )
        if self.local_rank < 0:
            raise ValueError(f"local rank must be >= 0, got {self.local_rank} ({self.source})")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size} ({self.source})"


def _int_variable(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def resolve_rank(
    rank: int | None = None, world_size: int | None = None, environ: Mapping[str, str] | None = None
) -> RankInfo:
    """This process's rank and world size: explicit values, else torchrun / Accelerate, else Slurm, else 0 of 1."""
    environ = os.environ if environ is None else environ
    if (rank is None) != (world_size is None):
        raise ValueError(
            "give both --rank and --world_size, or neither (then they come from the environment)"
        )
    if rank is not None:
        local = _int_variable(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
        return RankInfo(rank, world_size, local, "flags")
    for rank_name, world_name, local_name, launcher in _LAUNCHERS:
        if rank_name in environ and world_name in environ:
            local = _int_variable(environ, local_name) if local_name in environ else 0
            return RankInfo(
                _int_variable(environ, rank_name),
                _int_variable(environ, world_name),
                local,
                f"{rank_name}/{world_name} from {launcher}",
            )
    return RankInfo()


def split_for_rank(items: Sequence[T], rank: int, world_size: int, key: Callable[[T], str] = str) -> list[T]:
    """This rank's share of `items`: round robin over `items` sorted by `key` (see the module docstring)."""
    RankInfo(rank, world_size)  # validates
    ordered = sorted(items, key=key)
    keys = [key(item) for item in ordered]
    duplicates = sorted(k for k, count in Counter(keys).items() if count > 1)
    if duplicates:
        raise ValueError(
            f"the slide list names {', '.join(duplicates[:5])} more than once; list each slide once"
        )
    return ordered[rank::world_size]


def record_name(stem: str, rank: int, world_size: int) -> str:
    """`<stem>.json` for a single process, `<stem>.rank-00003.json` for rank 3 of a multi-process run."""
    return f"{stem}.json" if world_size == 1 else f"{stem}.rank-{rank:05d}.json"


def record_files(folder: str | Path, stem: str) -> list[Path]:
    """`<stem>.json` and every `<stem>.rank-NNNNN.json` in `folder` that exist, in name order."""
    folder = Path(folder)
    pattern = re.compile(rf"{re.escape(stem)}(\.rank-\d{{5,}})?\.json")
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    """`--rank` and `--world_size`; `resolve_rank(args.rank, args.world_size)` reads them back."""
    group = parser.add_argument_group(
        "several processes into one output folder",
        "each process takes every world_size-th slide of the sorted list; by default rank and world size come "
        "from torchrun / accelerate launch (RANK, WORLD_SIZE) or Slurm (SLURM_PROCID, SLURM_NTASKS)",
    )
    group.add_argument("--rank", type=int, default=None, help="this process's rank (with --world_size)")
    group.add_argument(
        "--world_size", "--world-size", type=int, default=None, help="number of processes (with --rank)"
    )
