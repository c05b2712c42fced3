"""Converters from the original archives of the benchmarks with no hub copy to a local imagefolder.

Every converter writes `OUT/metadata.csv` (columns `file_name,label,split,slide_id,patient_id`) and the
images under `OUT/images/`, which `datasets.load_dataset("imagefolder", data_dir=OUT)` and
`exaonepath_hf.eval.patch.tasks.load_task` read. Images are symlinked by default (the sets are large); `--link copy` copies
them. Archives given as `.zip` are extracted into `OUT/images/<archive name>/`.

Source layouts (as distributed):

- MHIST (`mhist`): `annotations.csv` (`Image Name`, `Majority Vote Label` HP/SSA, `Partition` train/test)
  and the images in `images/` (or `images.zip`).
- TIL (`til`, Zenodo 6604094): `images-tcga-tils-metadata.csv` (`partition`, `study`, `barcode`,
  `label`, `path` relative to the source folder) and the images (or `images-tcga-tils.zip`).
- MSI (`msi_crc`, `msi_stad`, Zenodo 2530835): `CRC_DX_{TRAIN,TEST}_{MSIMUT,MSS}` (folders or `.zip`) and
  `STAD_{TRAIN,TEST}_{MSIMUT,MSS}`; the TCGA barcode is in every file name (`blk-XXXX-TCGA-AA-3516-01Z-00-DX1.png`).

    exaonepath-convert-dataset mhist /data/mhist --output_dir /data/mhist-imagefolder
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ...atomic_io import atomic_write_bytes
from ...images import image_files
from ..common.data import parse_tcga_ids

__all__ = [
    "MetadataRow",
    "CONVERTERS",
    "convert_dataset",
    "convert_mhist",
    "convert_til",
    "convert_msi",
    "write_metadata",
]

logger = logging.getLogger(__name__)

METADATA_COLUMNS = ("file_name", "label", "split", "slide_id", "patient_id")
LINK_MODES = ("symlink", "copy", "hardlink")


@dataclass(frozen=True)
class MetadataRow:
    file_name: str  # relative to the output folder
    label: str
    split: str
    slide_id: str = ""
    patient_id: str = ""


def write_metadata(out_dir: Path, rows: Iterable[MetadataRow]) -> Path:
    """Write `out_dir/metadata.csv` atomically; returns its path."""
    rows = list(rows)
    if not rows:
        raise ValueError(
            f"no images found for {out_dir}; check the source folder layout (see exaonepath-convert-dataset --help)"
        )
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(METADATA_COLUMNS)
    writer.writerows([getattr(row, column) for column in METADATA_COLUMNS] for row in rows)
    target = out_dir / "metadata.csv"
    atomic_write_bytes(target, text.getvalue().encode())
    logger.info("wrote %s (%d images)", target, len(rows))
    return target


def _place(source: Path, target: Path, link: str) -> None:
    """Put `source` at `target` by symlink, hard link or copy; idempotent so a rerun resumes."""
    if target.exists() or target.is_symlink():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if link == "symlink":
        os.symlink(source.resolve(), target)
    elif link == "hardlink":
        os.link(source, target)
    elif link == "copy":
        shutil.copy2(source, target)
    else:
        raise ValueError(f"link mode {link!r} is not one of {LINK_MODES}")


def _extract(archive: Path, destination: Path) -> Path:
    """Extract a zip into `destination` (once; a finished extraction leaves a marker), refusing unsafe paths."""
    marker = destination / ".extracted"
    if marker.exists():
        return destination
    destination.mkdir(parents=True, exist_ok=True)
    root = destination.resolve()
    with zipfile.ZipFile(archive) as handle:
        for member in handle.namelist():
            resolved = (destination / member).resolve()
            if root not in resolved.parents and resolved != root:
                raise ValueError(f"{archive}: member {member!r} would be written outside {destination}")
        handle.extractall(destination)
    marker.touch()
    return destination


def _source_folder(src: Path, name: str, out_dir: Path) -> Path:
    """`src/name` as a folder, or `src/name.zip` extracted under `out_dir/images/name`."""
    folder, archive = src / name, src / f"{name}.zip"
    if folder.is_dir():
        return folder
    if archive.is_file():
        return _extract(archive, out_dir / "images" / name)
    raise FileNotFoundError(f"neither {folder} nor {archive} exists; is {src} the downloaded dataset folder?")


def convert_mhist(src: Path, out_dir: Path, link: str = "symlink") -> Path:
    """MHIST: `annotations.csv` + `images/` (or `images.zip`). Labels HP / SSA, splits train / test."""
    annotations = src / "annotations.csv"
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations} not found; MHIST ships annotations.csv beside images/")
    images = _source_folder(src, "images", out_dir)
    by_name = {p.name: p for p in image_files(images)}
    rows = []
    with open(annotations, newline="") as handle:
        for record in csv.DictReader(handle):
            name = record["Image Name"].strip()
            if name not in by_name:
                raise FileNotFoundError(f"{annotations}: image {name!r} is missing from {images}")
            target = Path("images") / name
            if by_name[name].resolve() != (out_dir / target).resolve():
                _place(by_name[name], out_dir / target, link)
            rows.append(
                MetadataRow(
                    str(target), record["Majority Vote Label"].strip(), record["Partition"].strip().lower()
                )
            )
    return write_metadata(out_dir, rows)


def convert_til(src: Path, out_dir: Path, link: str = "symlink") -> Path:
    """TIL (Zenodo 6604094): `images-tcga-tils-metadata.csv` with partition, barcode, label, path."""
    metadata = src / "images-tcga-tils-metadata.csv"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found; download it from Zenodo record 6604094")
    archive = src / "images-tcga-tils.zip"
    base = _extract(archive, out_dir / "images" / "images-tcga-tils") if archive.is_file() else src
    rows = []
    image_root: Path | None = None
    with open(metadata, newline="") as handle:
        for record in csv.DictReader(handle):
            relative = Path(record["path"].strip())
            if image_root is None:
                # `path` is relative to the archive's top folder, which the zip may or may not add
                roots = [base, *(child for child in sorted(base.iterdir()) if child.is_dir())]
                image_root = next((r for r in roots if (r / relative).is_file()), None)
                if image_root is None:
                    raise FileNotFoundError(f"{metadata}: image {relative} not found under {base}")
            source = image_root / relative
            if not source.is_file():
                raise FileNotFoundError(f"{metadata}: image {relative} not found under {image_root}")
            target = Path("images") / "til" / relative
            if source.resolve() != (out_dir / target).resolve():
                _place(source, out_dir / target, link)
            barcode = record["barcode"].strip()
            slide_id, patient_id = parse_tcga_ids(barcode)
            rows.append(
                MetadataRow(
                    str(target),
                    record["label"].strip(),
                    record["partition"].strip().lower(),
                    slide_id or barcode,
                    patient_id,
                )
            )
    return write_metadata(out_dir, rows)


def convert_msi(src: Path, out_dir: Path, cohort: str, link: str = "symlink") -> Path:
    """MSI-CRC (`cohort="CRC_DX"`) / MSI-STAD (`"STAD"`): `{cohort}_{TRAIN,TEST}_{MSIMUT,MSS}` folders or zips."""
    rows = []
    for split in ("TRAIN", "TEST"):
        for label in ("MSS", "MSIMUT"):
            name = f"{cohort}_{split}_{label}"
            folder = _source_folder(src, name, out_dir)
            for source in image_files(folder):
                slide_id, patient_id = parse_tcga_ids(source.name)
                if not slide_id:
                    raise ValueError(f"{source}: no TCGA barcode in the file name; is this the {cohort} set?")
                target = Path("images") / name / source.name
                if source.resolve() != (out_dir / target).resolve():
                    _place(source, out_dir / target, link)
                rows.append(MetadataRow(str(target), label, split.lower(), slide_id, patient_id))
    return write_metadata(out_dir, rows)


CONVERTERS: dict[str, Callable[..., Path]] = {
    "mhist": convert_mhist,
    "til": convert_til,
    "msi_crc": lambda src, out, link="symlink": convert_msi(src, out, "CRC_DX", link),
    "msi_stad": lambda src, out, link="symlink": convert_msi(src, out, "STAD", link),
}


def convert_dataset(dataset: str, src: Path, out_dir: Path, link: str = "symlink") -> Path:
    """Convert the original archive of `dataset` (a key of `CONVERTERS`); returns the written metadata.csv."""
    if dataset not in CONVERTERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(CONVERTERS)}")
    if link not in LINK_MODES:
        raise ValueError(f"link mode {link!r} is not one of {LINK_MODES}")
    return CONVERTERS[dataset](Path(src), Path(out_dir), link=link)


if __name__ == "__main__":
    from .cli import convert_dataset_main

    raise SystemExit(convert_dataset_main())
