"""Whole-slide tiling: MPP-correct, non-overlapping tissue patches from slides, as shards training streams.

    from exaonepath_hf.tiling import TilingConfig, tile_slides, load_patch_dataset

    summary = tile_slides(["a.svs", "b.svs"], "tiles", TilingConfig(), num_workers=8)
    dataset = load_patch_dataset("tiles", rank=0, world_size=2)  # streaming, this rank's shards

The command line is `exaonepath-tile SLIDES... --out DIR` (see `exaonepath_hf.tiling.cli`). Several processes
tile one slide list into one folder with `tile_slides(..., rank=r, world_size=n)` (see `ranks`). Readers of the
output folder (records, manifests, coordinates, complete shards, a slide's patches) use `output`.
"""

from .config import TilingConfig
from .grid import grid_coordinates, level0_patch_size, tissue_fractions
from .output import (
    COORDS_COLUMNS,
    PatchCoords,
    ShardPatches,
    SlideFailure,
    SlideRecord,
    TiledSlide,
    TilingManifest,
    load_patch_dataset,
    read_coords_csv,
    read_manifest,
    resolve_shards,
    tiling_output_folder,
    write_coords_csv,
)
from .pipeline import (
    PatchPlan,
    TilingSummary,
    plan_patches,
    read_patch,
    read_patch_at,
    slide_id_from_path,
    tile_slide,
    tile_slides,
)
from .ranks import RankInfo, resolve_rank, split_for_rank
from .shards import PATCH_COLUMNS
from .slide_io import (
    MissingMPPError,
    SlideReader,
    SlideReadError,
    expand_slide_inputs,
    open_slide,
    read_downsampled,
    read_downsampled_views,
)
from .tissue import TissueDetectionConfig, TissueMask, detect_tissue

__all__ = [
    "COORDS_COLUMNS",
    "PATCH_COLUMNS",
    "MissingMPPError",
    "PatchCoords",
    "PatchPlan",
    "RankInfo",
    "ShardPatches",
    "SlideFailure",
    "SlideReadError",
    "SlideReader",
    "SlideRecord",
    "TiledSlide",
    "TilingConfig",
    "TilingManifest",
    "TilingSummary",
    "TissueDetectionConfig",
    "TissueMask",
    "detect_tissue",
    "expand_slide_inputs",
    "grid_coordinates",
    "level0_patch_size",
    "load_patch_dataset",
    "open_slide",
    "plan_patches",
    "read_coords_csv",
    "read_downsampled",
    "read_downsampled_views",
    "read_manifest",
    "read_patch",
    "read_patch_at",
    "resolve_rank",
    "resolve_shards",
    "slide_id_from_path",
    "split_for_rank",
    "tile_slide",
    "tile_slides",
    "tissue_fractions",
    "tiling_output_folder",
    "write_coords_csv",
]
