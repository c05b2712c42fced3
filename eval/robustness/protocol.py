"""The virtual-labs protocol of `exaonepath-robustness --virtual_labs`: which labs (`virtual_labs_for`), the
labelled images they re-stain (`labelled_images`), the re-stained folder (`build_virtual_labs`) and its
sample table with one virtual slide per lab (`as_virtual_slides`). The stain models are in `virtual_labs`."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ...images import decode_rgb, image_files
from .samples import SampleTable
from .virtual_labs import (
    HED_LABS,
    HedPerturbation,
    ReinhardTransfer,
    VirtualLab,
    default_virtual_labs,
    make_virtual_lab_dataset,
)

__all__ = [
    "REINHARD_TEMPLATE_STATISTICS",
    "VIRTUAL_LABS_NOTE",
    "as_virtual_slides",
    "build_virtual_labs",
    "labelled_images",
    "virtual_labs_for",
]

logger = logging.getLogger(__name__)

#: The report's note on what the virtual labs test and what they do not.
VIRTUAL_LABS_NOTE = (
    "Virtual labs: every labelled source image re-stained once per lab (fixed HED perturbations after Ruifrok-"
    "Johnston and Tellez et al., Reinhard transfers toward real images of other labs; never Macenko, which would "
    "undo its own re-staining). They differ in stain colour only: scanner, tissue processing and patient biology "
    "are the same across labs, so this bounds from above the site robustness an encoder shows on real centres. "
    "Each lab's copy of the set is one virtual slide; the case is the source image."
)


# The Reinhard labs of `default_virtual_labs` as numbers: the lαβ mean and standard deviation over the tissue
# pixels of HistoQC's stain-templates/template3.png and template4.png (the shared real H&E data; Clear BSD), so
# that the protocol runs from the installed package without the images (tests check them against a fit).
REINHARD_TEMPLATE_STATISTICS = {
    "reinhard-template3": ((-0.700872, -0.0899515, 0.0264820), (0.300913, 0.0617455, 0.00889486)),
    "reinhard-template4": ((-0.282683, -0.0375351, 0.00550753), (0.212567, 0.0416930, 0.00434812)),
}


def virtual_labs_for(lab_data: str | os.PathLike | None = None) -> list[VirtualLab]:
    """The labs of the virtual-labs protocol: the images as they are ("as-scanned", the identity) and the four
    labs of `default_virtual_labs` (two fixed HED perturbations, two Reinhard transfers toward real images of
    other labs). The Reinhard targets are fitted on `lab_data/stain-templates/` when given, else taken from
    `REINHARD_TEMPLATE_STATISTICS` (the same fit on the shared data)."""
    as_scanned = HedPerturbation("as-scanned", scale=(1.0, 1.0, 1.0), bias=(0.0, 0.0, 0.0))
    if lab_data is not None:
        return [as_scanned, *default_virtual_labs(lab_data)]
    reinhard = [
        ReinhardTransfer(name, mean, std) for name, (mean, std) in REINHARD_TEMPLATE_STATISTICS.items()
    ]
    return [as_scanned, *HED_LABS, *reinhard]


def labelled_images(source: str | os.PathLike) -> list[tuple[str, np.ndarray, str, str]]:
    """`(name, uint8 RGB, label, case_id)` of every image of `source`: class subfolders (the case is the image),
    or a `metadata.csv` with `file_name` and `label` (and `case_id` when known)."""
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--data {source}: the virtual-labs protocol needs a folder of labelled images"
        )
    metadata = root / "metadata.csv"
    if metadata.is_file():
        with open(metadata, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
        header = list(reader.fieldnames or [])
        for column in ("file_name", "label"):
            if column not in header:
                raise ValueError(f"{metadata} has no column {column!r}; it has {header}")
        entries = [(row["file_name"], row["label"], row.get("case_id") or None) for row in rows]
    else:
        paths = [p.relative_to(root) for p in image_files(root)]
        loose = [str(p) for p in paths if len(p.parts) < 2]
        if loose:
            raise ValueError(
                f"{root}: images outside a class subfolder ({loose[:3]}); use class subfolders or a metadata.csv "
                "with file_name,label"
            )
        entries = [(str(p), p.parts[0], None) for p in paths]
    if not entries:
        raise ValueError(f"no images found in {root}")
    images = []
    for file_name, label, case_id in entries:
        name = str(Path(file_name).with_suffix("")).replace("/", "__").replace(os.sep, "__")
        images.append((name, decode_rgb(root / file_name), str(label), str(case_id or name)))
    return images


def as_virtual_slides(table: SampleTable) -> SampleTable:
    """Each lab's re-stained copy of the set as one virtual slide: the slide-level measures (within- vs
    cross-slide gap, same-slide share, slide identity) then ask whether a lab's stain shapes the features. The
    case stays the source image, which the robustness index leaves out of its own neighbours."""
    return replace(table, slide_id=table.center)


def build_virtual_labs(
    source: str | os.PathLike, output_dir: str | os.PathLike, lab_data: str | os.PathLike | None = None
) -> tuple[Path, list[VirtualLab]]:
    """The labelled images of `source` re-stained by every lab of `virtual_labs_for(lab_data)`, as a folder
    with a `metadata.csv` (`file_name,label,center,case_id,pair_id`) under `output_dir` (replaced)."""
    labs = virtual_labs_for(lab_data)
    images = labelled_images(source)
    logger.info("re-staining %d images as %d virtual labs into %s", len(images), len(labs), output_dir)
    return make_virtual_lab_dataset(images, labs, output_dir, overwrite=True), labs
