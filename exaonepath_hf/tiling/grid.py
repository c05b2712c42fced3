"""The patch grid: non-overlapping squares of a fixed physical size, kept where the tissue mask covers them."""

from __future__ import annotations

import numpy as np

__all__ = ["level0_patch_size", "grid_coordinates", "tissue_fractions"]

# A slide may be coarser than the target resolution by at most this factor (patches upsampled at most 2x).
_MAX_UPSAMPLING = 2.0


def level0_patch_size(target_size: int, target_mpp: float, slide_mpp: float) -> int:
    """Side in level-0 pixels of a patch that is `target_size` pixels at `target_mpp`: 256 px at 0.5 MPP is
    512 px on a 0.25 MPP slide and round(256 * 0.5 / 0.499) = 257 px on a 0.499 MPP one."""
    if target_size <= 0 or not target_mpp > 0 or not slide_mpp > 0:
        raise ValueError(
            f"patch size and resolutions must be positive (target_size={target_size}, "
            f"target_mpp={target_mpp}, slide_mpp={slide_mpp})"
        )
    if slide_mpp > target_mpp * _MAX_UPSAMPLING:
        raise ValueError(
            f"slide resolution {slide_mpp:g} µm/px is more than {_MAX_UPSAMPLING:g}x coarser than the target "
            f"{target_mpp:g} µm/px; patches would be mostly interpolation. Tile it at a coarser target_mpp"
        )
    return max(1, round(target_size * target_mpp / slide_mpp))


def grid_coordinates(width: int, height: int, patch_size: int) -> np.ndarray:
    """Top-left corners (x, y), level 0, of every whole patch of a grid anchored at (0, 0), row-major.

    A fixed anchor makes the grid of a slide reproducible and independent of the tissue mask; patches that
    would cross the slide's right or bottom edge are not part of it.
    """
    xs = np.arange(width // patch_size, dtype=np.int64) * patch_size
    ys = np.arange(height // patch_size, dtype=np.int64) * patch_size
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def _integral_at(integral: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a summed-area table at fractional (x, y).

    The mask's integral is bilinear inside each mask pixel, so this is the exact area-weighted tissue sum
    over [0, x) x [0, y) when mask pixels are treated as uniform squares.
    """
    height, width = integral.shape[0] - 1, integral.shape[1] - 1
    x = np.clip(x, 0, width)
    y = np.clip(y, 0, height)
    x0 = np.minimum(np.floor(x).astype(np.int64), width - 1)
    y0 = np.minimum(np.floor(y).astype(np.int64), height - 1)
    fx, fy = x - x0, y - y0
    top = integral[y0, x0] * (1 - fx) + integral[y0, x0 + 1] * fx
    bottom = integral[y0 + 1, x0] * (1 - fx) + integral[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def tissue_fractions(mask: np.ndarray, scale: float, coordinates: np.ndarray, patch_size: int) -> np.ndarray:
    """Fraction of each patch covered by tissue.

    `mask` is a boolean tissue mask whose pixels are `scale` level-0 pixels wide; `coordinates` are level-0
    top-left corners (N, 2) of squares `patch_size` level-0 pixels wide. Partly covered mask pixels count
    by the overlapping area, so the result does not depend on how the grid falls on the mask.
    """
    if len(coordinates) == 0:
        return np.zeros(0, dtype=np.float64)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    x0 = coordinates[:, 0] / scale
    y0 = coordinates[:, 1] / scale
    x1 = x0 + patch_size / scale
    y1 = y0 + patch_size / scale
    covered = (
        _integral_at(integral, x1, y1)
        - _integral_at(integral, x0, y1)
        - _integral_at(integral, x1, y0)
        + _integral_at(integral, x0, y0)
    )
    return np.clip(covered / (patch_size / scale) ** 2, 0.0, 1.0)
