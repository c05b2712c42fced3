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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic_io import atomic_file

__all__ = [
    "MAGNIFICATION_MICRONS",
    "SlideFeatures",
    "load_slide_features",
    "patch_geometry",
    "write_slide_features",
]

#: Magnification of a pixel size by the microscopy convention 10 µm/px / mpp (0.25 µm/px = 40x, 0.5 = 20x).
MAGNIFICATION_MICRONS = 10.0


@dataclass
class SlideFeatures:
    """One slide's feature bag: `features[i]` is the patch whose level-0 top-left is `coords[i]`.

    `attributes` holds the patch geometry (the `coords` attributes: patch_size, patch_size_level0,
    level0_magnification, target_magnification, overlap, ...); `feature_attributes` what the `features`
    dataset says about how they were made (encoder, tokens, preprocessing in our files).
    """

    slide_id: str
    features: np.ndarray  # [N, D] float32
    coords: np.ndarray  # [N, 2] int64
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
    """Read a feature bag written by `write_slide_features` or by TRIDENT.

    `features` come back as float32 [N, D], `coords` as int64 [N, 2]; the slide id is the `name` attribute
    (of `features`, else of `coords`), else the file name without `.h5`.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feature file")
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
