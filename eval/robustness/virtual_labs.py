"""Virtual labs: the same labelled tiles re-stained as several labs would, by stain models other than Macenko.

A robustness test needs the same tissue under several stains, with the truth known. Real multi-site data have
that only for registered re-scans (PLISM); here every labelled source tile is re-stained once per "lab", which
gives centres (the labs), pairs (the source tile) and classes (the source label) with known truth. Two stain
models, both written here from their papers:

- :class:`HedPerturbation`: colour deconvolution into haematoxylin, eosin and DAB (Ruifrok & Johnston, Anal.
  Quant. Cytol. Histol. 23(4), 2001), a fixed per-lab scale and bias per stain channel (the HED augmentation of
  Tellez et al., IEEE TMI 2018, drawn once per lab instead of per image), and back to RGB;
- :class:`ReinhardTransfer`: colour transfer in the lαβ space of Reinhard et al. (IEEE CG&A 2001): each lαβ
  channel of the tile is shifted and scaled to the mean and standard deviation of a real target image of
  another lab (statistics over tissue pixels only, see :func:`tissue_mask`; glass is left white).

What this does NOT test: virtual labs differ in stain colour only. Scanner optics and compression, section
thickness, fixation and other tissue processing, and the biology of each site's patients are all the same
across labs here; real sites differ in all of them, and stain normalization cannot remove those (Dippel et al.,
arXiv 2411.05489). Treat a virtual-labs result as an upper bound on the site robustness an encoder shows.

Why not re-stain with Macenko: Macenko normalization inverts a Macenko re-staining exactly (both are the same
linear map in optical density), so a test built on one proves nothing about an encoder. Neither model here is
a Macenko re-staining: the HED bias adds optical density to every pixel (glass included) and the scales act on
fixed Ruifrok stain vectors, not on the image's own; Reinhard's transfer is an affine map of log-LMS colour, not
of stain concentrations. Macenko brings the labs closer but not onto each other: on the 32 CRC-VAL-HE-7K sample
tiles, two default labs' versions of a tile differ by 13 to 64 uint8 levels on average (mean absolute
difference per pair of labs), 12 to 34 after Macenko, while two Macenko re-stainings of a tile come back within
3.4 (``tests/test_virtual_labs.py`` measures this). What remains after normalization is a fair test of the
encoder.

    labs = default_virtual_labs("../shared/data")      # 2 HED labs + 2 Reinhard labs toward HistoQC templates
    make_virtual_lab_dataset([(name, rgb, label, case_id), ...], labs, "OUT/virtual-labs")
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...atomic_io import atomic_directory
from ...images import decode_rgb
from ...progress import progress_bar

__all__ = [
    "HED_FROM_RGB",
    "HED_LABS",
    "RGB_FROM_HED",
    "HedPerturbation",
    "ReinhardTransfer",
    "VirtualLab",
    "default_virtual_labs",
    "hed_to_rgb",
    "lab_to_rgb",
    "make_virtual_lab_dataset",
    "od_to_rgb",
    "rgb_to_hed",
    "rgb_to_lab",
    "rgb_to_od",
    "tissue_mask",
]

# Optical density OD = -ln((I + 1) / 256): 255 (white) is 0, and 0 stays finite (ln 256).
_LIGHT = 256.0

# Ruifrok & Johnston 2001, Table 1: the optical density of each stain in R, G, B (rows: haematoxylin, eosin,
# DAB), each row normalized to unit length. OD (one row per pixel) = concentrations @ RGB_FROM_HED.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

# Reinhard et al. 2001: linear RGB -> LMS cone space, and log10 LMS -> decorrelated l, alpha, beta. The paper
# prints the inverse of the first matrix rounded to 4 digits; it is inverted exactly here.
_LMS_FROM_RGB = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LAB_FROM_LOG_LMS = np.diag([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]
)
_RGB_FROM_LMS = np.linalg.inv(_LMS_FROM_RGB)
_LOG_LMS_FROM_LAB = np.linalg.inv(_LAB_FROM_LOG_LMS)

# tissue = summed optical density of at least this (mean intensity below about 230 of 255); an image with fewer
# than _MIN_TISSUE_PIXELS tissue pixels has its statistics taken over all pixels
_TISSUE_OD = 0.3
_MIN_TISSUE_PIXELS = 64
# a lαβ channel with a smaller standard deviation is flat (rounding leaves ~1e-17 on a one-colour image)
_FLAT_STD = 1e-9


def _rgb(image: Any, name: str = "image") -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ValueError(f"{name} must be a uint8 RGB array H x W x 3, got {array.dtype} {array.shape}")
    return array


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def rgb_to_od(image: Any) -> np.ndarray:
    """Optical density -ln((I + 1) / 256) per channel, float64 H x W x 3."""
    return -np.log((_rgb(image).astype(np.float64) + 1.0) / _LIGHT)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb_to_od`, rounded and clipped to uint8."""
    return _to_uint8(_LIGHT * np.exp(-od) - 1.0)


def rgb_to_hed(image: Any) -> np.ndarray:
    """Ruifrok-Johnston stain concentrations (haematoxylin, eosin, DAB) per pixel, float64 H x W x 3."""
    return rgb_to_od(image) @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """uint8 RGB of stain concentrations (the inverse of :func:`rgb_to_hed`, up to rounding)."""
    return od_to_rgb(np.asarray(hed, dtype=np.float64) @ RGB_FROM_HED)


def rgb_to_lab(image: Any) -> np.ndarray:
    """Reinhard's lαβ of every pixel (of (I + 1) / 256, so that black stays finite), float64 H x W x 3."""
    rgb = (_rgb(image).astype(np.float64) + 1.0) / _LIGHT
    return np.log10(rgb @ _LMS_FROM_RGB.T) @ _LAB_FROM_LOG_LMS.T


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """uint8 RGB of lαβ values (the inverse of :func:`rgb_to_lab`, rounded and clipped)."""
    rgb = 10.0 ** (np.asarray(lab, dtype=np.float64) @ _LOG_LMS_FROM_LAB.T) @ _RGB_FROM_LMS.T
    return _to_uint8(rgb * _LIGHT - 1.0)


def tissue_mask(image: Any) -> np.ndarray:
    """Pixels darker than glass: summed optical density >= 0.3 (bool H x W)."""
    return rgb_to_od(image).sum(axis=2) >= _TISSUE_OD


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ValueError(
            f"{what} {name!r} must be a non-empty file name (no path separators, no leading dot)"
        )
    return name


def _triple(values: Sequence[float], what: str) -> tuple[float, float, float]:
    triple = tuple(float(v) for v in values)
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(f"{what} must be 3 finite numbers (one per channel), got {values!r}")
    return triple


@dataclass(frozen=True)
class HedPerturbation:
    """A lab whose stains differ by a fixed factor and offset per Ruifrok-Johnston stain channel.

    ``scale`` and ``bias`` are per channel (haematoxylin, eosin, DAB): concentrations ``c`` become
    ``scale * c + bias`` (Tellez et al. 2018's HED augmentation, fixed per lab). Concentrations are in natural-log
    optical density units (white glass 0, black ln 256 = 5.5; tissue mostly 0.2 to 2); a bias of 0.05 on eosin tints
    glass from 255 to about 243 in green. ``scale=(1, 1, 1), bias=(0, 0, 0)`` is the identity.
    """

    name: str
    scale: tuple[float, float, float]
    bias: tuple[float, float, float]

    def __post_init__(self):
        _check_name(self.name, "lab name")
        object.__setattr__(self, "scale", _triple(self.scale, "scale"))
        object.__setattr__(self, "bias", _triple(self.bias, "bias"))
        if min(self.scale) <= 0:
            raise ValueError(f"scale must be positive (a negative one inverts a stain), got {self.scale}")

    def apply(self, image: Any) -> np.ndarray:
        """The uint8 RGB image as this lab would have stained it."""
        return hed_to_rgb(rgb_to_hed(image) * np.array(self.scale) + np.array(self.bias))

    __call__ = apply

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "hed", "name": self.name, "scale": list(self.scale), "bias": list(self.bias)}


@dataclass(frozen=True)
class ReinhardTransfer:
    """A lab whose colours follow a real image's: Reinhard colour transfer toward ``target_mean`` and
    ``target_std`` (per lαβ channel, over the target's tissue pixels); build it with :meth:`fit`."""

    name: str
    target_mean: tuple[float, float, float]
    target_std: tuple[float, float, float]

    def __post_init__(self):
        _check_name(self.name, "lab name")
        object.__setattr__(self, "target_mean", _triple(self.target_mean, "target_mean"))
        object.__setattr__(self, "target_std", _triple(self.target_std, "target_std"))
        if min(self.target_std) <= 0:
            raise ValueError(f"target_std must be positive, got {self.target_std}")

    @classmethod
    def fit(cls, name: str, image: Any) -> ReinhardTransfer:
        """The transfer toward ``image`` (uint8 RGB array, or a path / anything :func:`decode_rgb` opens)."""
        array = image if isinstance(image, np.ndarray) else decode_rgb(image)
        mean, std = _tissue_statistics(_rgb(array, "target image"))
        if min(std) <= _FLAT_STD:
            raise ValueError(f"target image of lab {name!r} has a flat colour channel; use a real H&E image")
        return cls(name, tuple(mean), tuple(std))

    def apply(self, image: Any) -> np.ndarray:
        """The uint8 RGB image with its tissue's lαβ mean and standard deviation moved to the target's.

        Tissue pixels (summed OD >= 0.3) take the full transfer, glass (OD 0) none, with a linear ramp between:
        applied to glass, the shift that turns pink tissue into the target's colours turns white glass into the
        complementary green (the known weakness of one global lαβ map, Magee et al. 2009).
        """
        image = _rgb(image)
        mean, std = _tissue_statistics(image)
        # a flat channel (e.g. a blank tile) has nothing to stretch: it moves to the target mean only
        gain = np.divide(self.target_std, std, out=np.zeros(3), where=std > _FLAT_STD)
        lab = rgb_to_lab(image)
        weight = np.clip(rgb_to_od(image).sum(axis=2, keepdims=True) / _TISSUE_OD, 0.0, 1.0)
        return lab_to_rgb(lab + weight * ((lab - mean) * gain + np.array(self.target_mean) - lab))

    __call__ = apply

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "reinhard",
            "name": self.name,
            "target_mean": list(self.target_mean),
            "target_std": list(self.target_std),
        }


def _tissue_statistics(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of lαβ over the tissue pixels (all pixels when there are too few)."""
    lab = rgb_to_lab(image).reshape(-1, 3)
    mask = tissue_mask(image).reshape(-1)
    chosen = lab[mask] if mask.sum() >= _MIN_TISSUE_PIXELS else lab
    return chosen.mean(axis=0), chosen.std(axis=0)


#: One virtual lab: a stain model with a ``name`` and ``apply(uint8 RGB) -> uint8 RGB``.
VirtualLab = HedPerturbation | ReinhardTransfer

#: The two fixed HED labs of the protocol (natural-log OD units, see HedPerturbation): one heavy on
#: haematoxylin, one on eosin. Tellez et al. draw a scale near 1 and a small bias per stain for every image; a
#: lab here is one such draw, fixed, chosen strong enough to be seen.
HED_LABS = (
    HedPerturbation("hed-strong-haematoxylin", scale=(1.35, 0.85, 1.0), bias=(0.03, -0.01, 0.0)),
    HedPerturbation("hed-strong-eosin", scale=(0.8, 1.4, 1.0), bias=(-0.01, 0.05, 0.0)),
)
# Reinhard targets: HistoQC's colour templates, H&E of different labs (dark purple vs pale lavender; template1,
# pink, turns pale tissue green under a global lαβ map)
_REINHARD_TARGETS = (("reinhard-template3", "template3.png"), ("reinhard-template4", "template4.png"))


def default_virtual_labs(data_dir: str | os.PathLike) -> list[VirtualLab]:
    """Four labs: the two fixed HED perturbations of `HED_LABS` and Reinhard transfers toward
    ``data_dir/stain-templates/template3.png`` and ``template4.png`` (the shared real H&E data folder)."""
    folder = Path(data_dir) / "stain-templates"
    labs: list[VirtualLab] = list(HED_LABS)
    for name, file_name in _REINHARD_TARGETS:
        path = folder / file_name
        if not path.is_file():
            raise FileNotFoundError(
                f"Reinhard target {path} not found: pass the real H&E data folder (the one holding "
                "stain-templates/), or build labs yourself with ReinhardTransfer.fit(name, image)"
            )
        labs.append(ReinhardTransfer.fit(name, path))
    return labs


def make_virtual_lab_dataset(
    images: Sequence[tuple[str, np.ndarray, Any, Any]],
    labs: Sequence[VirtualLab],
    output_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Re-stain every source tile as every lab and write them as an image folder; returns ``output_dir``.

    ``images`` are ``(name, uint8 RGB H x W x 3, label, case_id)``, names unique file-name stems. The folder
    holds ``<lab>/<name>.png`` and ``metadata.csv`` (``file_name,label,center,case_id,pair_id``): the centre
    is the lab, the pair id the source tile's name (each source appears once per lab: paired conditions), the
    case id the source's (every lab's copy of a case counts as that case, so the robustness index never takes
    a tile's own re-staining as its neighbour). The folder appears whole or not at all; an existing one is
    replaced only with ``overwrite``.
    """
    if not images:
        raise ValueError("no source images to re-stain")
    if not labs:
        raise ValueError("no virtual labs given")
    lab_names = [_check_name(lab.name, "lab name") for lab in labs]
    if len(set(lab_names)) != len(lab_names):
        raise ValueError(f"lab names must be unique, got {lab_names}")
    names = [_check_name(entry[0], "image name") for entry in images]
    duplicates = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if duplicates:
        raise ValueError(f"image names must be unique (they are the pair ids); repeated: {duplicates[:5]}")
    for name, array, _, _ in images:
        _rgb(array, f"image {name!r}")
    rows = []
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        for lab in lab_names:
            (staging / lab).mkdir()
        progress = progress_bar(total=len(images) * len(labs), desc="virtual labs", unit="tile")
        with progress:
            for name, array, label, case_id in images:
                for lab in labs:
                    file_name = f"{lab.name}/{name}.png"
                    Image.fromarray(lab.apply(array)).save(staging / file_name)
                    rows.append([file_name, label, lab.name, case_id, name])
                    progress.update()
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file_name", "label", "center", "case_id", "pair_id"])
        writer.writerows(rows)
        (staging / "metadata.csv").write_text(buffer.getvalue())
    return Path(output_dir)
