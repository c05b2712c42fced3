"""Whole-slide tiling: MPP-correct, non-overlapping tissue patches from slides, as shards training streams.

    from exaonepath_hf.tiling import TilingConfig, tile_slides, load_patch_dataset

    summary = tile_slides(["a.svs", "b.svs"], "tiles", TilingConfig(), num_workers=8)
    dataset = load_patch_dataset("tiles", rank=0, world_size=2)  # streaming, this rank's shards

The command line is `exaonepath-tile SLIDES... --out DIR` (see `exaonepath_hf.tiling.cli`).
"""

from .grid import grid_coordinates, level0_patch_size, tissue_fractions
from .pipeline import (
    PatchPlan,
    SlideFailure,
    TilingConfig,
    TilingSummary,
    plan_patches,
    read_patch,
    slide_id_from_path,
    tile_slide,
    tile_slides,
)
from .shards import (
    PATCH_COLUMNS,
    complete_shards_only,
    completed_shard_files,
    load_patch_dataset,
    tiling_output_folder,
)
from .slide_io import (
    MissingMPPError,
    SlideReader,
    SlideReadError,
    open_slide,
    read_downsampled,
    read_downsampled_views,
)
from .tissue import TissueDetectionConfig, TissueMask, detect_tissue

__all__ = [
    "PATCH_COLUMNS",
    "MissingMPPError",
    "PatchPlan",
    "SlideFailure",
    "SlideReadError",
    "SlideReader",
    "TilingConfig",
    "TilingSummary",
    "TissueDetectionConfig",
    "TissueMask",
    "complete_shards_only",
    "completed_shard_files",
    "detect_tissue",
    "grid_coordinates",
    "level0_patch_size",
    "load_patch_dataset",
    "open_slide",
    "plan_patches",
    "read_downsampled",
    "read_downsampled_views",
    "read_patch",
    "slide_id_from_path",
    "tile_slide",
    "tile_slides",
    "tissue_fractions",
    "tiling_output_folder",
]
