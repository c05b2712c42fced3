"""Data conventions every evaluation shares: our split names and the aliases local layouts use, TCGA ids in
file names, and the content identity of a local folder (for cache keys and run records)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

__all__ = ["SPLIT_NAMES", "SPLIT_ALIASES", "parse_tcga_ids", "local_fingerprint"]

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
