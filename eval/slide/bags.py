"""Per-slide feature bags on disk: one HDF5 file per slide, the layout TRIDENT writes and reads, so that feature
bags move both ways.

File layout (`DIR/<slide_id>.h5`), the one TRIDENT writes and reads, so that feature bags move both ways:

    features   [N, D] float32    one row per patch; attributes: name (the slide id) and, in our files, what
                                 produced them (encoder, tokens, preprocessing, precision) as JSON strings
    coords     [N, 2] int64      level-0 top-left (x, y) of each patch, row-aligned with `features`;
                                 attributes: the patch geometry (see `patch_geometry`)

Verified against TRIDENT (mahmoodlab/TRIDENT, trident/IO.py `save_h5`, `coords_to_h5`, `read_coords`;
trident/wsi_objects/WSI.py `extract_tissue_coords`, `extract_patch_features`): datasets `features` and
`coords`; attributes of `coords`: `patch_size` (side at the target magnification), `patch_size_level0`,
`level0_magnification`, `target_magnification`, `overlap`, `name`, `savetodir`, and in newer versions
`level0_width`, `level0_height`; attributes of `features`: `name`, `savetodir`. TRIDENT stores a dict attribute
as a JSON string and None as the string "None"; we do the same and undo both when reading. We leave out
`savetodir` (an absolute path of the machine that wrote the file) and add `level0_mpp`, `target_mpp`.

Two more formats of the field are read here (verified against mahmoodlab/CLAM `extract_features_fp.py`,
`wsi_core/WholeSlideImage.py` `process_contour`, and TRIDENT's `IO.read_coords_legacy`):

- CLAM's feature bags `pt_files/<slide_id>.pt`: one float tensor [N, D], no coordinates (its `h5_files/` hold
  the same features with `coords`, and are read like ours).
- Patch-coordinate files, `patches/<slide_id>.h5` (CLAM) or `patches/<slide_id>_patches.h5` (TRIDENT): a
  `coords` dataset [N, 2] (level-0 top-left x, y) whose attributes give the geometry. CLAM's: `patch_size` (side
  at `patch_level`), `patch_level`, `downsample`, `level_dim`, `downsampled_level_dim`, `name`, `save_path`,
  and in older files `custom_downsample` (patches read that many times larger and shrunk to `patch_size`).
  TRIDENT's: the `coords` attributes listed above. `read_patch_coords` reads either (`PatchCoordsFile`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ...atomic_io import atomic_file

if TYPE_CHECKING:
    from ...tiling import SlideReader

__all__ = [
    "COORDS_FILE_SUFFIXES",
    "FEATURE_SUFFIXES",
    "MAGNIFICATION_MICRONS",
    "PatchCoordsFile",
    "SlideFeatures",
    "listing",
    "load_slide_features",
    "match_coords_files",
    "patch_geometry",
    "read_patch_coords",
    "write_slide_features",
]

#: Magnification of a pixel size by the microscopy convention 10 µm/px / mpp (0.25 µm/px = 40x, 0.5 = 20x).
MAGNIFICATION_MICRONS = 10.0

#: Feature bag files, in the order of preference when a slide has both (an .h5 bag has its coordinates).
FEATURE_SUFFIXES = (".h5", ".pt")

#: A slide's patch-coordinate file is `<slide_id><suffix>`: TRIDENT's name, then CLAM's.
COORDS_FILE_SUFFIXES = ("_patches.h5", ".h5")

_LISTED = 10  # names shown in an error message; the rest are counted


def listing(names: Iterable[str]) -> str:
    """`names` for an error message: how many, and the first few, sorted."""
    names = sorted(names)
    shown = ", ".join(names[:_LISTED])
    return f"{len(names)} ({shown}{', ...' if len(names) > _LISTED else ''})"


@dataclass
class SlideFeatures:
    """One slide's feature bag: `features[i]` is the patch whose level-0 top-left is `coords[i]`.

    `attributes` holds the patch geometry (the `coords` attributes: patch_size, patch_size_level0,
    level0_magnification, target_magnification, overlap, ...); `feature_attributes` what the `features`
    dataset says about how they were made (encoder, tokens, preprocessing in our files). A CLAM `.pt` bag has
    features only: `coords` is None and both attribute dicts are empty.
    """

    slide_id: str
    features: np.ndarray  # [N, D] float32
    coords: np.ndarray | None  # [N, 2] int64; None for a bag without coordinates (CLAM's .pt)
    attributes: dict[str, Any] = field(default_factory=dict)
    feature_attributes: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])


def patch_geometry(
    slide_id: str,
    patch_size: int,
    patch_size_level0: int,
    level0_mpp: float,
    target_mpp: float,
    level0_width: int | None = None,
    level0_height: int | None = None,
    overlap: int = 0,
) -> dict[str, Any]:
    """The `coords` attributes of a slide in TRIDENT's names (magnifications as 10 µm/px / mpp) plus the MPPs."""
    return {
        "name": slide_id,
        "patch_size": int(patch_size),
        "patch_size_level0": int(patch_size_level0),
        "level0_magnification": MAGNIFICATION_MICRONS / level0_mpp,
        "target_magnification": MAGNIFICATION_MICRONS / target_mpp,
        "level0_mpp": float(level0_mpp),
        "target_mpp": float(target_mpp),
        "overlap": int(overlap),
        **({"level0_width": int(level0_width)} if level0_width is not None else {}),
        **({"level0_height": int(level0_height)} if level0_height is not None else {}),
    }


def _attribute_value(key: str, value: Any) -> Any:
    """A value h5py stores as an attribute: scalars and numeric lists as they are, dicts (and lists of other
    things) as JSON text, None as "None" (TRIDENT's conventions)."""
    if value is None:
        return "None"
    if isinstance(value, str | bool | int | float | np.generic):
        return value
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, list | tuple | np.ndarray):
        array = np.asarray(value)
        if array.dtype.kind in "biuf":
            return array
        return json.dumps(list(value))
    raise ValueError(f"attribute {key!r}: cannot store a {type(value).__name__} in HDF5 ({value!r})")


def _python_value(value: Any) -> Any:
    """An HDF5 attribute read back as a plain Python value (the inverse of `_attribute_value`)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str):
        if value == "None":
            return None
        if value[:1] in "{[":
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
    return value


def write_slide_features(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    attributes: Mapping[str, Any],
    feature_attributes: Mapping[str, Any] | None = None,
) -> Path:
    """Write one slide's bag to `path` (HDF5, TRIDENT's layout), atomically: a reader sees the whole file or none.

    `attributes` go on `coords` (the patch geometry, see `patch_geometry`); `feature_attributes` on `features`,
    whose `name` defaults to `attributes["name"]`, else the file name.
    """
    import h5py

    path = Path(path)
    features = np.asarray(features)
    coords = np.asarray(coords)
    if features.ndim != 2:
        raise ValueError(f"{path}: features must be [N, D], got shape {features.shape}")
    if coords.shape != (features.shape[0], 2):
        raise ValueError(
            f"{path}: coords must be [N, 2] with N = {features.shape[0]} rows of features, got {coords.shape}"
        )
    if not np.isfinite(features).all():
        raise ValueError(f"{path}: features hold NaN or infinite values; refusing to write them")
    if coords.size and not np.array_equal(coords, np.round(coords)):
        raise ValueError(f"{path}: coords must be whole level-0 pixels")
    name = str(attributes.get("name") or path.stem)
    feature_attributes = {"name": name, **(feature_attributes or {})}
    with atomic_file(path) as temporary, h5py.File(temporary, "w") as handle:
        features_set = handle.create_dataset("features", data=features.astype(np.float32, copy=False))
        coords_set = handle.create_dataset("coords", data=coords.astype(np.int64, copy=False))
        for dataset, values in ((features_set, feature_attributes), (coords_set, attributes)):
            for key, value in values.items():
                dataset.attrs[key] = _attribute_value(key, value)
    return path


def load_slide_features(path: str | Path) -> SlideFeatures:
    """Read a feature bag written by `write_slide_features`, TRIDENT or CLAM (its `h5_files/` or `pt_files/`).

    `features` come back as float32 [N, D], `coords` as int64 [N, 2] (None from a `.pt` bag); the slide id is
    the `name` attribute (of `features`, else of `coords`), else the file name without its suffix.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feature file")
    if path.suffix == ".pt":
        return _load_pt_bag(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 file ({error}); re-extract it") from error
    with handle:
        missing = [key for key in ("features", "coords") if key not in handle]
        if missing:
            raise ValueError(
                f"{path} has no dataset {' or '.join(missing)} (it has {sorted(handle)}); a patch feature file "
                "holds `features` [N, D] and `coords` [N, 2] (TRIDENT / exaonepath-extract layout)"
            )
        features = np.asarray(handle["features"][()], dtype=np.float32)
        coords = np.asarray(handle["coords"][()])
        attributes = {key: _python_value(value) for key, value in handle["coords"].attrs.items()}
        feature_attributes = {key: _python_value(value) for key, value in handle["features"].attrs.items()}
    if features.ndim != 2:
        raise ValueError(
            f"{path}: features have shape {features.shape}, not [N, D]; a slide encoder's output (one vector "
            "per slide) is not a patch feature bag"
        )
    if coords.ndim != 2 or coords.shape != (features.shape[0], 2):
        raise ValueError(
            f"{path}: coords {coords.shape} do not match features {features.shape} (want [N, 2])"
        )
    if coords.dtype.kind == "f":
        if not np.array_equal(coords, np.round(coords)):
            raise ValueError(f"{path}: coords are not whole level-0 pixels")
    coords = coords.astype(np.int64)
    slide_id = feature_attributes.get("name") or attributes.get("name") or path.stem
    return SlideFeatures(
        slide_id=str(slide_id),
        features=features,
        coords=coords,
        attributes=attributes,
        feature_attributes=feature_attributes,
    )


def _load_pt_bag(path: Path) -> SlideFeatures:
    """A CLAM `pt_files/<slide_id>.pt` bag: one float tensor [N, D], loaded without running pickled code."""
    import pickle

    import torch

    try:
        features = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        # torch's own message suggests weights_only=False, which would run the file's pickled code: not shown
        raise ValueError(
            f"{path} is not a plain tensor file ({type(error).__name__}); a CLAM feature bag is one tensor "
            "saved with torch.save, read without running pickled code: re-extract it"
        ) from error
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or not features.is_floating_point():
        is_tensor = isinstance(features, torch.Tensor)
        what = f"a {features.ndim}-d {features.dtype} tensor" if is_tensor else f"a {type(features).__name__}"
        raise ValueError(f"{path} holds {what}, not the float tensor [N, D] of a CLAM feature bag (pt_files)")
    return SlideFeatures(slide_id=path.stem, features=features.float().numpy(), coords=None)


# --------------------------------------------------------------------------------------------------------------
# CLAM's and TRIDENT's patch-coordinate files


@dataclass(frozen=True)
class PatchCoordsFile:
    """A slide's patches as CLAM or TRIDENT chose them: level-0 top-left `coords` and how the patches are cut.

    `layout` "clam": `patch_size` pixels read at `patch_level` (times `custom_downsample`, then shrunk back to
    `patch_size`); "trident": `patch_size_level0` level-0 pixels, which TRIDENT resizes to `patch_size`.
    """

    path: Path
    coords: np.ndarray  # [N, 2] int64
    attributes: dict[str, Any]  # the `coords` attributes as Python values
    layout: Literal["clam", "trident"]

    @property
    def patch_size(self) -> int:
        """Side of a patch at the target resolution (TRIDENT) or at `patch_level` (CLAM)."""
        return int(self.attributes["patch_size"])

    def geometry(self, reader: SlideReader, resize_to_target: bool) -> tuple[int, int, int]:
        """(patch_size_level0, read_level, stored size) for `tiling.read_patch_at`: the file's patches read from
        `reader`'s slide and sized as the tiler sizes its own (`TilingConfig.resize_to_target`): TRIDENT's
        level-0 side at native resolution, or resized to its `patch_size` from the coarsest level fine enough;
        CLAM's `patch_size` pixels of `patch_level`, as CLAM reads them (there is nothing to resize)."""
        size = self.patch_size
        if self.layout == "clam":
            level = int(self.attributes["patch_level"])
            if not 0 <= level < reader.level_count:
                raise ValueError(
                    f"{self.path}: patch_level {level}, but {reader.path} has {reader.level_count} level(s); "
                    "is this the coordinates file of that slide?"
                )
            scale = float(self.attributes.get("custom_downsample") or 1) * reader.level_downsamples[level]
            return round(size * scale), level, size
        side = int(
            self.attributes.get("patch_size_level0")
            or round(size * self.attributes["level0_magnification"] / self.attributes["target_magnification"])
        )
        if resize_to_target:
            return side, reader.best_level_for_downsample(side / size), size
        return side, 0, side

    def check_inside(self, dimensions: Sequence[int]) -> None:
        """Refuse coordinates outside the slide: the file belongs to another slide."""
        width, height = dimensions
        outside = (self.coords < 0).any(axis=1) | (self.coords[:, 0] >= width) | (self.coords[:, 1] >= height)
        if outside.any():
            x, y = self.coords[np.flatnonzero(outside)[0]]
            raise ValueError(
                f"{self.path}: {int(outside.sum())} patches lie outside the {width}x{height} slide (first at "
                f"{x}, {y}); is this the coordinates file of that slide?"
            )


def _coords_layout(path: Path, attributes: Mapping[str, Any]) -> Literal["clam", "trident"]:
    """Which tool wrote a coordinates file, by the attributes only it writes (TRIDENT never writes patch_level)."""
    given = {key for key, value in attributes.items() if value is not None}  # TRIDENT writes None as "None"
    if {"patch_size", "patch_level"} <= given:
        return "clam"
    magnifications = {"level0_magnification", "target_magnification"} <= given
    if "patch_size" in given and ("patch_size_level0" in given or magnifications):
        return "trident"
    raise ValueError(
        f"{path}: the attributes of its coords ({', '.join(sorted(attributes)) or 'none'}) give no patch "
        "geometry; a CLAM coordinates file has patch_size and patch_level, a TRIDENT one patch_size with "
        "patch_size_level0 (or level0_magnification and target_magnification)"
    )


def read_patch_coords(path: str | Path) -> PatchCoordsFile:
    """Read a CLAM or TRIDENT patch-coordinate file (`patches/<slide_id>.h5`); a feature bag with TRIDENT's
    `coords` attributes (ours included) reads as one too."""
    import h5py

    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path} is not a readable HDF5 file ({error}); recreate the coordinates") from error
    with handle:
        if "coords" not in handle:
            raise ValueError(
                f"{path} has no dataset coords (it has {sorted(handle)}); a patch-coordinate file (CLAM's or "
                "TRIDENT's patches/<slide>.h5) holds coords [N, 2]"
            )
        coords = np.asarray(handle["coords"][()])
        attributes = {key: _python_value(value) for key, value in handle["coords"].attrs.items()}
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"{path}: coords have shape {coords.shape}, not [N, 2] level-0 (x, y)")
    if coords.dtype.kind == "f" and not np.array_equal(coords, np.round(coords)):
        raise ValueError(f"{path}: coords are not whole level-0 pixels")
    return PatchCoordsFile(path, coords.astype(np.int64), attributes, _coords_layout(path, attributes))


def match_coords_files(
    slide_ids: Sequence[str], folder: str | Path
) -> tuple[dict[str, Path], list[str], list[Path]]:
    """Each slide's coordinates file in `folder` (or in its `patches/`, where CLAM and TRIDENT put them), the
    slides without one, and the files of no slide. A slide with both TRIDENT's and CLAM's name is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"coordinates folder not found: {folder}; pass the folder of CLAM's or TRIDENT's patches/<slide>.h5"
        )
    if not any(folder.glob("*.h5")) and (folder / "patches").is_dir():
        folder = folder / "patches"
    found: dict[str, Path] = {}
    for slide_id in slide_ids:
        named = [folder / f"{slide_id}{suffix}" for suffix in COORDS_FILE_SUFFIXES]
        present = [path for path in named if path.is_file()]
        if len(present) > 1:
            raise ValueError(
                f"{folder} holds {' and '.join(p.name for p in present)}, both the coordinates of {slide_id}; "
                "keep one"
            )
        if present:
            found[slide_id] = present[0]
    claimed = set(found.values())
    missing = sorted(set(slide_ids) - set(found))
    unused = [path for path in sorted(folder.glob("*.h5")) if path not in claimed]
    return found, missing, unused
