"""Data conventions every evaluation shares: our split names and the aliases local layouts use, TCGA ids in
file names, the content identity of a local folder (for cache keys and run records), and how local files are
loaded with `datasets`."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

__all__ = ["SPLIT_NAMES", "SPLIT_ALIASES", "load_local_dataset", "local_fingerprint", "parse_tcga_ids"]

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
# Split names a local metadata.csv or folder layout may use, mapped to ours.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
_TCGA_SLIDE = re.compile(r"(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})(-[0-9]{2}[A-Z]?-[0-9]{2}-[A-Z0-9]{2,4})?")


def parse_tcga_ids(text: str) -> tuple[str, str]:
    """(slide id, patient id) from a TCGA barcode anywhere in `text`; ("", "") when there is none.

    `blk-ABCD-TCGA-AA-3516-01Z-00-DX1.png` -> ("TCGA-AA-3516-01Z-00-DX1", "TCGA-AA-3516").
    """
    match = _TCGA_SLIDE.search(text)
    if match is None:
        return "", ""
    return match.group(0), match.group(1)


def local_fingerprint(root: Path) -> str:
    """Content identity of a local imagefolder: relative paths, sizes and mtimes of every file."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_local_dataset(path: str, **load_arguments) -> datasets.Dataset | datasets.DatasetDict:
    """`datasets.load_dataset(path, **load_arguments)` for files on this machine, without the "Downloading data"
    bars `datasets` draws while it lists and hashes local files (nothing is downloaded) or its split-building
    bars; one log line says what is read instead."""
    import datasets

    source = load_arguments.get("data_dir") or load_arguments.get("data_files") or path
    count = f"{len(source)} files" if isinstance(source, list | tuple) else source
    logger.info("reading %s (%s)", path, count)
    were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(path, **load_arguments)
    finally:
        if were_enabled:
            datasets.enable_progress_bars()
