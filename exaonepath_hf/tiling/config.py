"""The settings of a tiling run: how slides are cut into patches and how the patches are stored.

Its own module because both the tiler (`pipeline`) and the reader of its output (`output`, whose manifests
record the settings) need it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .shards import ImageFormat
from .slide_io import SLIDE_BACKENDS
from .tissue import TissueDetectionConfig

__all__ = ["TilingConfig"]


@dataclass(frozen=True)
class TilingConfig:
    """How slides are cut into patches and how the patches are stored.

    Attributes:
        patch_size: patch side in pixels at `target_mpp` (the paper: 256 at 0.5 µm/px).
        target_mpp: physical resolution (µm/px) that defines the patch's physical size.
        min_tissue_fraction: a grid patch is kept when at least this fraction of it is tissue.
        resize_to_target: store patches resized to `patch_size` at `target_mpp` instead of at the slide's
            native resolution (the paper keeps native size: 512 px on a 0.25 µm/px slide).
        image_format: "png" (lossless, default) or "jpeg" for the stored patches.
        jpeg_quality: JPEG quality when image_format is "jpeg".
        write_images: write image shards; False writes only coordinates, thumbnails and the manifest.
        patches_per_shard: upper bound on the rows of one shard; a slide's patches are split evenly into
            ceil(n / patches_per_shard) shards.
        row_group_size: parquet row group size (the unit a streaming reader holds in memory).
        thumbnail_size: longest side of the thumbnail PNG.
        backend: slide reader ("auto", "tiffslide", "openslide", "wsidicom").
        mpp: level-0 µm/px to use for slides whose metadata has none or an implausible value (outside
            `slide_io.MPP_PLAUSIBLE_RANGE`); a plausible recorded value wins.
        tissue: tissue detection parameters.
    """

    patch_size: int = 256
    target_mpp: float = 0.5
    min_tissue_fraction: float = 0.5
    resize_to_target: bool = False
    image_format: ImageFormat = "png"
    jpeg_quality: int = 90
    write_images: bool = True
    patches_per_shard: int = 1024
    row_group_size: int = 64
    thumbnail_size: int = 1024
    backend: str = "auto"
    mpp: float | None = None
    tissue: TissueDetectionConfig = field(default_factory=TissueDetectionConfig)

    def __post_init__(self):
        if self.patch_size < 1 or not self.target_mpp > 0:
            raise ValueError(
                f"patch_size and target_mpp must be positive ({self.patch_size}, {self.target_mpp})"
            )
        if not 0.0 < self.min_tissue_fraction <= 1.0:
            raise ValueError(f"min_tissue_fraction must be in (0, 1], got {self.min_tissue_fraction}")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', got {self.image_format!r}")
        if self.patches_per_shard < 1 or self.row_group_size < 1 or self.thumbnail_size < 16:
            raise ValueError("patches_per_shard and row_group_size must be >= 1, thumbnail_size >= 16")
        if self.backend not in SLIDE_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(SLIDE_BACKENDS)}, got {self.backend!r}")
        if self.mpp is not None and not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def output_settings(self) -> dict[str, Any]:
        """The settings every slide of one output folder must share: those that decide which patches exist
        and how they are stored. How a slide is read (backend, fallback MPP) may change between runs, e.g. to
        rerun the slides that failed (each slide's record keeps it), and so may the thumbnail size."""
        settings = self.to_dict()
        del settings["backend"], settings["mpp"], settings["thumbnail_size"]
        return settings

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TilingConfig:
        values = dict(values)
        values["tissue"] = TissueDetectionConfig(**values.get("tissue", {}))
        return cls(**values)
