"""CLAM-style tissue detection on a low-resolution view of a slide.

Saturation channel (HSV) → median blur → Otsu (or a fixed) threshold → morphological closing → keep connected
tissue regions whose area (holes excluded) reaches a minimum; inside kept regions, holes smaller than a minimum
area (and all but the largest few) are filled, larger ones stay background. Areas are physical (mm²), so the
same parameters work at any detection resolution; kernel sizes are in pixels of the detection view.

scipy.ndimage provides the median filter, closing and connected-component labelling (scipy already comes with
scikit-learn, a core dependency), so no image-processing library is added. It is imported where it is used:
importing it takes most of a second, which `--help` of the tiling and extraction commands should not pay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["TissueDetectionConfig", "TissueMask", "detect_tissue", "otsu_threshold", "saturation"]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class TissueDetectionConfig:
    """Parameters of `detect_tissue` (CLAM's segmentation and contour-filter parameters, in physical units).

    Attributes:
        detection_mpp: microns per pixel of the low-resolution view the mask is computed on (8 µm/px is a
            16x downsample of a 0.5 MPP slide: 16x16 mask pixels per default patch).
        median_blur: side of the median filter on the saturation channel, in detection pixels (odd; 1 = off).
        threshold: saturation threshold (0-255; a pixel is tissue when its blurred saturation is above it),
            or "otsu" to pick it per slide.
        otsu_floor: lowest threshold Otsu may pick, so a slide that is almost all background does not turn
            scanner noise into tissue.
        closing: side of the square structuring element of the morphological closing (0 = off).
        min_region_area_mm2: smallest tissue region kept, holes excluded (debris and dust are smaller).
        min_hole_area_mm2: holes inside a kept region smaller than this are filled (counted as tissue).
        max_holes_per_region: at most this many holes (the largest) stay background per region; None keeps
            every hole above `min_hole_area_mm2`. CLAM caps it (8), which turns the smaller of many large
            holes (lumens, glass between tissue pieces that touch at corners) into "tissue".
    """

    detection_mpp: float = 8.0
    median_blur: int = 7
    threshold: int | Literal["otsu"] = "otsu"
    otsu_floor: int = 8
    closing: int = 4
    min_region_area_mm2: float = 0.02
    min_hole_area_mm2: float = 0.005
    max_holes_per_region: int | None = None

    def __post_init__(self):
        if not self.detection_mpp > 0:
            raise ValueError(f"detection_mpp must be positive, got {self.detection_mpp}")
        if self.median_blur < 1 or self.median_blur % 2 == 0:
            raise ValueError(f"median_blur must be an odd size >= 1, got {self.median_blur}")
        if self.threshold != "otsu" and not (isinstance(self.threshold, int) and 0 <= self.threshold < 255):
            raise ValueError(f"threshold must be 'otsu' or an integer in [0, 255), got {self.threshold!r}")
        if self.closing < 0 or (self.max_holes_per_region is not None and self.max_holes_per_region < 0):
            raise ValueError("closing and max_holes_per_region must be >= 0")
        if self.min_region_area_mm2 < 0 or self.min_hole_area_mm2 < 0:
            raise ValueError("min_region_area_mm2 and min_hole_area_mm2 must be >= 0")


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask over a low-resolution view, with the threshold that produced it."""

    mask: np.ndarray
    threshold: int
    mpp: float

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB uint8 image, as uint8 0..255 ((max - min) / max, 0 for black)."""
    rgb = rgb.astype(np.int32)
    high = rgb.max(axis=2)
    low = rgb.min(axis=2)
    scaled = np.divide((high - low) * 255, high, out=np.zeros(high.shape, dtype=np.float64), where=high > 0)
    return np.rint(scaled).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising the between-class variance of {<= t} vs {> t}."""
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = histogram.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(histogram)
    weight_high = total - weight_low
    sum_low = np.cumsum(histogram * levels)
    mean_low = np.divide(sum_low, weight_low, out=np.zeros(256), where=weight_low > 0)
    mean_high = np.divide(sum_low[-1] - sum_low, weight_high, out=np.zeros(256), where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return int(np.argmax(between))


def _filter_regions(
    mask: np.ndarray, min_area_px: float, min_hole_px: float, max_holes: int | None
) -> np.ndarray:
    """Keep regions with >= min_area_px tissue pixels; fill their small holes (and all but the largest few)."""
    from scipy import ndimage

    regions, n_regions = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n_regions == 0:
        return mask
    region_area = np.bincount(regions.ravel(), minlength=n_regions + 1)
    keep_region = region_area >= min_area_px
    keep_region[0] = False

    # Holes: background components (4-connected, the dual of 8-connected tissue) that do not touch the border.
    holes, n_holes = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    fill = np.zeros(n_holes + 1, dtype=bool)
    if n_holes:
        hole_area = np.bincount(holes.ravel(), minlength=n_holes + 1)[1:]
        # The pixel just above a hole's first pixel (raster order) belongs to the region enclosing the hole:
        # anything inside the hole (an island) lies strictly below that row.
        _, first = np.unique(holes.ravel(), return_index=True)
        first = first[1:]  # label 0 (not a hole) comes first
        owner = regions.ravel()[first - mask.shape[1]]
        # Rank holes by area within their region; beyond max_holes or below min_hole_px they are filled.
        order = np.lexsort((-hole_area, owner))
        rank = np.empty(n_holes, dtype=np.int64)
        owner_sorted = owner[order]
        starts = np.searchsorted(owner_sorted, owner_sorted, side="left")
        rank[order] = np.arange(n_holes) - starts
        too_many = rank >= max_holes if max_holes is not None else np.zeros(n_holes, dtype=bool)
        fill[1:] = keep_region[owner] & ((hole_area < min_hole_px) | too_many)
    return keep_region[regions] | fill[holes]


def detect_tissue(rgb: np.ndarray, config: TissueDetectionConfig, mpp: float) -> TissueMask:
    """Tissue mask of an RGB uint8 low-resolution view whose pixels are `mpp` microns wide."""
    from scipy import ndimage

    sat = saturation(rgb)
    if config.median_blur > 1:
        sat = ndimage.median_filter(sat, size=config.median_blur, mode="reflect")
    if config.threshold == "otsu":
        threshold = max(otsu_threshold(sat), config.otsu_floor)
    else:
        threshold = int(config.threshold)
    mask = sat > threshold
    if config.closing > 0:
        # Pad so that closing does not erode tissue touching the border of the view.
        pad = config.closing
        padded = np.pad(mask, pad, mode="edge")
        mask = ndimage.binary_closing(padded, structure=np.ones((config.closing, config.closing), bool))
        mask = mask[pad:-pad, pad:-pad]
    pixel_area_mm2 = (mpp / 1000.0) ** 2
    mask = _filter_regions(
        mask,
        min_area_px=config.min_region_area_mm2 / pixel_area_mm2,
        min_hole_px=config.min_hole_area_mm2 / pixel_area_mm2,
        max_holes=config.max_holes_per_region,
    )
    return TissueMask(mask=mask, threshold=threshold, mpp=mpp)
