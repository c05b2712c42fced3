"""Image files and their decoding to RGB, as every reader of the package (training, evaluation, demo) does it.

Transparent pixels are composited over white, as the image processor does, so that a transparent region reads
as glass everywhere. Imports neither torch nor transformers.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "ImageSource", "decode_rgb", "image_files", "open_rgb", "source_name"]

#: File suffixes read as images (lower case), by folders of patches and imagefolder datasets.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

#: A path, encoded bytes, an open PIL image, or a `datasets.Image(decode=False)` value {"bytes", "path"}.
ImageSource = str | os.PathLike | bytes | Image.Image | Mapping[str, Any]


def source_name(source: ImageSource) -> str:
    """How to name `source` in a message: its path, or what it is."""
    if isinstance(source, Mapping):
        return str(source.get("path") or "<encoded bytes>")
    if isinstance(source, bytes | Image.Image):
        return f"<{type(source).__name__}>"
    return str(source)


def open_rgb(source: ImageSource) -> Image.Image:
    """The image of `source` as a loaded RGB PIL image (alpha composited over white).

    Raises the decoder's error (OSError, `PIL.UnidentifiedImageError`, ...) for unreadable data; callers that
    must go on count and report it.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, Mapping):
        data = source.get("bytes")
        source = data if data else source.get("path")
        if source is None:
            raise ValueError("image value has neither bytes nor a path")
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return _to_rgb(image)


def decode_rgb(source: ImageSource) -> np.ndarray:
    """The image of `source` as a writable uint8 array H x W x 3 (see `open_rgb`)."""
    return np.array(open_rgb(source), dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # 16-bit (and 32-bit integer) grey: PIL's convert would clip at 255
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    rgb = image.convert("RGB")
    rgb.load()
    return rgb


def image_files(root: str | os.PathLike) -> list[Path]:
    """Image files under `root` (recursive, hidden files skipped), in a stable order."""
    return sorted(
        path
        for path in Path(root).rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )
