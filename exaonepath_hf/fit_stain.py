"""``exaonepath-fit-stain TARGET... --out DIR``: fit a Macenko stain reference and save a ready processor.

Fits the stain reference to one or more H&E target images (pooled, like a single larger target) and writes
an :class:`ExaonePathImageProcessor` with that reference to ``DIR`` (``preprocessor_config.json`` plus the
processor's code, so ``AutoImageProcessor.from_pretrained(DIR, trust_remote_code=True)`` loads it anywhere).
The reference is also printed as JSON. Start from an existing processor folder with ``--processor``.
The command line: :mod:`exaonepath_hf.fit_stain_cli`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .atomic_io import move_files_into
from .image_processing_exaonepath import ExaonePathImageProcessor
from .images import open_rgb
from .stain_normalization import StainReference

logger = logging.getLogger(__name__)


def _load_target(path: Path) -> Image.Image:
    try:
        return open_rgb(path)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read target image {path}: {error}") from error


def _save_atomically(processor: ExaonePathImageProcessor, out: Path) -> None:
    """Save into a temporary sibling folder, then move each file into `out` (which may hold a model too)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-fit-stain-") as staging:
        processor.save_pretrained(staging)
        move_files_into(staging, out)


def fit_stain(
    targets: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    processor: str | os.PathLike | None = None,
    device: str | None = None,
    **stain_settings: float,
) -> StainReference:
    """Fit the stain reference of `targets`, save the processor carrying it to `out` and return the reference.

    `processor` is a processor folder to start from (else the defaults); `stain_settings` override its
    `stain_io`, `stain_alpha`, `stain_beta`.
    """
    if processor is not None:
        fitted = ExaonePathImageProcessor.from_pretrained(processor, **stain_settings)
    else:
        fitted = ExaonePathImageProcessor(**stain_settings)
    images = [_load_target(Path(path)) for path in targets]
    reference = fitted.fit_stain_reference(images, device=device)
    _save_atomically(fitted, Path(out))
    logger.info("fitted on %d target image(s); processor written to %s", len(images), out)
    return reference
