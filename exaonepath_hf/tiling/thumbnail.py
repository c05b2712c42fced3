"""A slide thumbnail with the tissue mask tinted and the kept patches outlined, for checking a tiling by eye."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["render_thumbnail"]

_TISSUE_TINT = np.array([0, 200, 0], dtype=np.float32)
_TINT_ALPHA = 0.3
_PATCH_OUTLINE = (0, 60, 255)


def render_thumbnail(
    view: np.ndarray,
    view_scale: float,
    mask: np.ndarray,
    coordinates: np.ndarray,
    patch_size: int,
    max_side: int,
) -> Image.Image:
    """Draw on a low-resolution RGB `view` (`view_scale` level-0 pixels per pixel): the tissue `mask`
    (any resolution over the same slide area) tinted green and each kept patch (level-0 top-left
    `coordinates`, side `patch_size`) outlined in blue. The result fits in `max_side` x `max_side`."""
    height, width = view.shape[:2]
    shrink = max(1.0, max(height, width) / max_side)
    size = (max(1, round(width / shrink)), max(1, round(height / shrink)))
    scale = view_scale * (width / size[0])  # level-0 pixels per thumbnail pixel

    base = Image.fromarray(view).resize(size, Image.Resampling.BILINEAR) if size != (width, height) else None
    rgb = np.asarray(base if base is not None else Image.fromarray(view), dtype=np.float32)
    tissue = (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    )
    rgb[tissue] = rgb[tissue] * (1 - _TINT_ALPHA) + _TISSUE_TINT * _TINT_ALPHA
    image = Image.fromarray(np.rint(rgb).astype(np.uint8))

    draw = ImageDraw.Draw(image)
    for x, y in coordinates:
        left, top = round(x / scale), round(y / scale)
        right, bottom = round((x + patch_size) / scale) - 1, round((y + patch_size) / scale) - 1
        draw.rectangle([left, top, right, bottom], outline=_PATCH_OUTLINE, width=1)
    return image
