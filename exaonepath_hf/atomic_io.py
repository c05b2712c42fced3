"""Atomic outputs: written under a uniquely named temporary in the target's folder, then `os.replace`d.

Readers (and a resumed run) never see a half-written file or folder, and parallel writers (tiling workers,
ranks) never share a temporary. Every writer of the package goes through this module. It imports neither
torch nor transformers: the tiling workers use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "atomic_directory",
    "atomic_file",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "atomic_write_text",
    "move_files_into",
    "publish_directory",
    "record_folder_settings",
    "write_json",
]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def record_folder_settings(
    path: str | os.PathLike, settings: Mapping[str, Any], what: str, remedy: str
) -> None:
    """Write `settings` (JSON) to `path` on the first use of its folder; later, refuse other settings.

    A resumed run adds outputs to a folder filled earlier, and outputs made with other settings must not mix
    with them: when the recorded settings differ, raises ValueError
    `"<folder> <what> (<keys> differ; see <path>); <remedy>"`.
    """
    path = Path(path)
    wanted = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != wanted:
            changed = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
            raise ValueError(f"{path.parent} {what} ({', '.join(changed)} differ; see {path}); {remedy}")
        return
    write_json(path, wanted)


def atomic_save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """`safetensors` file of `tensors` (made contiguous), with its string `metadata`, written atomically."""
    from safetensors.torch import save_file  # here, not at the top: tiling imports this module without torch

    with atomic_file(path) as temporary:
        contiguous = {key: value.contiguous() for key, value in tensors.items()}
        save_file(contiguous, str(temporary), metadata=dict(metadata) if metadata is not None else None)


def publish_directory(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder `staging` to `target`, replacing a `target` that exists.

    The rename is atomic; replacing an existing folder is not (it is removed first), so a crash in between
    leaves no `target` but the complete `staging`.
    """
    staging, target = Path(staging), Path(target)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh sibling folder to fill; on success it becomes `target`, on error it is removed."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another output folder or overwrite it (--overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield staging
        publish_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def move_files_into(staging: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Move every file of the finished folder `staging` into `target`, each by an atomic rename.

    For outputs that join a folder holding other files (a processor saved beside a model, a slide's shards
    beside other slides'). Subfolders are merged recursively. Returns the moved files' new paths.
    """
    staging, target = Path(staging), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for item in sorted(staging.iterdir()):
        if item.is_dir():
            moved += move_files_into(item, target / item.name)
        else:
            os.replace(item, target / item.name)
            moved.append(target / item.name)
    return moved
