"""Task registry (pinned label orders, seeded splits) and the archive converters on synthetic copies."""

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from exaonepath_hf.eval.common.data import parse_tcga_ids
from exaonepath_hf.eval.patch.converters import convert_mhist, convert_msi, convert_til
from exaonepath_hf.eval.patch.tasks import TASKS, get_task, imagefolder_task, load_task


def _png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pinned_label_orders():
    assert get_task("msi_crc").class_names == ("MSS", "MSIMUT")
    assert get_task("msi_stad").label_index("MSS") == 0 and get_task("msi_stad").label_index("MSIMUT") == 1
    assert get_task("mhist").label_index("HP") == 0 and get_task("mhist").label_index("SSA") == 1
    assert get_task("pcam").label_index(False) == 0 and get_task("pcam").label_index(True) == 1
    assert get_task("til").label_index("til-positive") == 1
    assert get_task("crc100k").class_names == (
        "ADI",
        "BACK",
        "DEB",
        "LYM",
        "MUC",
        "MUS",
        "NORM",
        "STR",
        "TUM",
    )
    with pytest.raises(ValueError, match="MSI-H"):
        get_task("msi_crc").label_index("MSI-H")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("camelyon")


def test_registry_matches_the_paper():
    assert {name: spec.paper_top1 for name, spec in TASKS.items()} == {
        "pcam": 0.901,
        "mhist": 0.818,
        "crc100k": 0.946,
        "til": 0.939,
        "msi_crc": 0.756,
        "msi_stad": 0.804,
    }
    assert (
        TASKS["crc100k"].splits.train == "NCT_CRC_HE_100K" and TASKS["crc100k"].splits.test == "CRC_VAL_HE_7K"
    )
    assert "NCT_CRC_HE_100K" in TASKS["crc100k"].stain_normalized_by_source


def test_parse_tcga_ids():
    assert parse_tcga_ids("blk-AAAFIYHTSVPE-TCGA-G4-6309-01Z-00-DX1.png") == (
        "TCGA-G4-6309-01Z-00-DX1",
        "TCGA-G4-6309",
    )
    assert parse_tcga_ids("TCGA-3X-AAVA") == ("TCGA-3X-AAVA", "TCGA-3X-AAVA")
    assert parse_tcga_ids("NORM-ABCDEFGH.png") == ("", "")


def _msi_archive(src: Path, cohort: str) -> dict[tuple[str, str], list[str]]:
    """The Zenodo 2530835 layout: one zip (or extracted folder) per split and label."""
    names = {}
    seed = 0
    for split in ("TRAIN", "TEST"):
        for label in ("MSS", "MSIMUT"):
            files = []
            for patient in range(5):
                seed += 1
                barcode = f"TCGA-A{patient}-{1000 + seed:04d}-01Z-00-DX1"
                files.append(f"blk-{'X' * 12}{seed:02d}-{barcode}.png")
            names[(split, label)] = files
            if label == "MSS":  # zipped, with a top folder as in the archives
                with zipfile.ZipFile(src / f"{cohort}_{split}_{label}.zip", "w") as handle:
                    for i, name in enumerate(files):
                        handle.writestr(f"{label}/{name}", _png(seed * 10 + i))
            else:
                folder = src / f"{cohort}_{split}_{label}"
                folder.mkdir(parents=True)
                for i, name in enumerate(files):
                    (folder / name).write_bytes(_png(seed * 10 + i))
    return names


def test_msi_converter_and_task(tmp_path):
    src, out = tmp_path / "zenodo", tmp_path / "msi_crc"
    src.mkdir()
    names = _msi_archive(src, "CRC_DX")
    convert_msi(src, out, "CRC_DX")
    rows = list(csv.DictReader(open(out / "metadata.csv")))
    assert len(rows) == 20
    first = next(r for r in rows if r["file_name"].endswith(names[("TRAIN", "MSS")][0]))
    assert first["label"] == "MSS" and first["split"] == "train"
    assert first["slide_id"] == parse_tcga_ids(names[("TRAIN", "MSS")][0])[0]
    assert first["patient_id"] == first["slide_id"][:12]
    assert all((out / r["file_name"]).is_file() for r in rows)

    task = load_task(get_task("msi_crc"), data_dir=out)
    assert task.class_names == ("MSS", "MSIMUT")
    sizes = {name: len(ds) for name, ds in task.splits.items()}
    assert sizes == {"train": 8, "val": 2, "test": 10}
    # labels follow the pinned order (imagefolder alone would sort MSIMUT first)
    expected_label = {parse_tcga_ids(n)[0]: label for (_, label), files in names.items() for n in files}
    for split in task.splits.values():
        for row in split.select_columns(["label", "slide_id"]):
            assert row["label"] == task.class_names.index(expected_label[row["slide_id"]])
    assert task.provenance["val_split"] == {
        "fraction": 0.2,
        "seed": 42,
        "stratified": True,
        "how": "sklearn.model_selection.train_test_split",
    }
    assert sorted(task.splits["val"]["label"]) == [0, 1]  # stratified: one of each class out of 5 + 5


def test_mhist_converter_val_split_matches_the_field(tmp_path):
    src, out = tmp_path / "mhist", tmp_path / "mhist_if"
    src.mkdir()
    rows = []
    with zipfile.ZipFile(src / "images.zip", "w") as handle:
        for i in range(30):
            name = f"MHIST_{i:03d}.png"
            handle.writestr(f"images/{name}", _png(i))
            rows.append((name, "SSA" if i % 3 == 0 else "HP", 4, "test" if i >= 20 else "train"))
    with open(src / "annotations.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "Image Name",
                "Majority Vote Label",
                "Number of Annotators who Selected SSA (Out of 7)",
                "Partition",
            ]
        )
        writer.writerows(rows)
    convert_mhist(src, out)
    task = load_task(get_task("mhist"), data_dir=out)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 16, "val": 4, "test": 10}
    # MHIST's val: train_test_split(train_size=0.8, random_state=42) on the official train rows, unstratified
    train_rows = [r for r in rows if r[3] == "train"]
    _, val_idx = train_test_split(np.arange(len(train_rows)), train_size=0.8, random_state=42)
    expected = sorted(1 if train_rows[i][1] == "SSA" else 0 for i in val_idx)
    assert sorted(task.splits["val"]["label"]) == expected
    assert sorted(task.splits["test"]["label"]) == sorted(
        1 if r[1] == "SSA" else 0 for r in rows if r[3] == "test"
    )


def test_til_converter_keeps_partitions_and_barcodes(tmp_path):
    src, out = tmp_path / "til", tmp_path / "til_if"
    (src / "images-tcga-tils" / "brca").mkdir(parents=True)
    records = []
    for i, partition in enumerate(["train"] * 6 + ["val"] * 2 + ["test"] * 2):
        label = "til-positive" if i % 2 else "til-negative"
        path = f"brca/{label}_{i}.png"
        (src / "images-tcga-tils" / path).write_bytes(_png(i))
        records.append(
            {
                "partition": partition,
                "study": "brca",
                "barcode": f"TCGA-E2-A1{i:02d}",
                "label": label,
                "path": path,
            }
        )
    with open(src / "images-tcga-tils-metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    convert_til(src, out, link="copy")
    task = load_task(get_task("til"), data_dir=out)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 6, "val": 2, "test": 2}
    assert task.provenance["derived_val"] is False
    test_rows = task.splits["test"]
    assert sorted(test_rows["slide_id"]) == ["TCGA-E2-A108", "TCGA-E2-A109"]
    assert sorted(test_rows["label"]) == [0, 1]


def test_converter_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations.csv"):
        convert_mhist(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="STAD_TRAIN_MSS"):
        convert_msi(tmp_path, tmp_path / "out", "STAD")
    evil = tmp_path / "evil"
    evil.mkdir()
    with zipfile.ZipFile(evil / "STAD_TRAIN_MSS.zip", "w") as handle:
        handle.writestr("../../escape.png", _png(0))
    with pytest.raises(ValueError, match="outside"):
        convert_msi(evil, tmp_path / "out2", "STAD")


def test_imagefolder_subfolders_and_metadata_agree(tmp_path, shared_data):
    samples = sorted((shared_data / "crc-val-he-7k-samples").glob("*.png"))
    by_folder, by_csv = tmp_path / "folders", tmp_path / "csv"
    (by_csv / "images").mkdir(parents=True)
    lines = ["file_name,label,split"]
    for i, path in enumerate(samples):
        cls = path.name.split("-")[0]
        split = "test" if i % 4 == 3 else "train"
        (by_folder / split / cls).mkdir(parents=True, exist_ok=True)
        (by_folder / split / cls / path.name).symlink_to(path)
        (by_csv / "images" / path.name).symlink_to(path)
        lines.append(f"images/{path.name},{cls},{split}")
    (by_csv / "metadata.csv").write_text("\n".join(lines) + "\n")
    loaded = [
        load_task(imagefolder_task(root, val_fraction=0.34), data_dir=root) for root in (by_folder, by_csv)
    ]
    for task in loaded:
        assert task.class_names == ("ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
        assert {k: len(v) for k, v in task.splits.items()} == {"train": 15, "val": 9, "test": 8}
        assert sorted(task.splits["test"]["label"]) == list(range(8))
    assert loaded[0].splits["val"]["label"] == loaded[1].splits["val"]["label"]
    with pytest.raises(ValueError, match="--test_fraction"):
        load_task(imagefolder_task(tmp_path / "folders" / "train"), data_dir=tmp_path / "folders" / "train")


def _hub_like_copy(root, splits: dict, features) -> str:
    """A local folder laid out like a hub dataset repo (README configs naming the splits, parquet files)."""
    import datasets

    (root / "data").mkdir(parents=True)
    config = ["---", "configs:", "- config_name: default", "  data_files:"]
    for name, rows in splits.items():
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(root / "data" / f"{name}-00000.parquet")
        )
        config += [f"  - split: {name}", f"    path: data/{name}-*.parquet"]
    (root / "README.md").write_text("\n".join(config + ["---", ""]))
    return str(root)


def test_hub_tasks_map_splits_and_labels(tmp_path):
    import dataclasses

    import datasets

    image = datasets.Image()
    pcam_rows = {
        name: {
            "image": [{"bytes": _png(i), "path": None} for i in range(n)],
            "label": [bool(i % 2) for i in range(n)],
        }
        for name, n in (("train", 6), ("valid", 4), ("test", 4))
    }
    pcam_dir = _hub_like_copy(
        tmp_path / "pcam", pcam_rows, datasets.Features({"image": image, "label": datasets.Value("bool")})
    )
    # a private datasets cache: datasets keys local hub-style folders by folder name, not content
    cache = tmp_path / "hf-cache"
    pcam = load_task(dataclasses.replace(TASKS["pcam"], hub_id=pcam_dir), cache_dir=cache)
    assert {k: len(v) for k, v in pcam.splits.items()} == {"train": 6, "val": 4, "test": 4}
    assert pcam.splits["val"]["label"] == [0, 1, 0, 1] and pcam.provenance["derived_val"] is False
    assert pcam.dataset_revision == "main"

    # CRC-100K: ClassLabel names mapped by name into the pinned order, val derived 80:20 from NCT_CRC_HE_100K
    source_order = ["TUM", "ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR"]  # deliberately not ours
    crc_rows = {
        name: {
            "image": [{"bytes": _png(i), "path": None} for i in range(n)],
            "label": [i % k for i in range(n)],
        }
        for name, n, k in (("NCT_CRC_HE_100K", 45, 9), ("CRC_VAL_HE_7K", 18, 3))
    }
    crc_dir = _hub_like_copy(
        tmp_path / "crc",
        crc_rows,
        datasets.Features({"image": image, "label": datasets.ClassLabel(names=source_order)}),
    )
    crc = load_task(dataclasses.replace(TASKS["crc100k"], hub_id=crc_dir), cache_dir=cache)
    assert {k: len(v) for k, v in crc.splits.items()} == {"train": 36, "val": 9, "test": 18}
    assert sorted(crc.splits["val"]["label"]) == list(range(9))  # stratified
    # the test split holds source classes 0..2 = TUM, ADI, BACK = our 8, 0, 1
    assert sorted(crc.splits["test"]["label"]) == [0] * 6 + [1] * 6 + [8] * 6
    assert crc.provenance["stain_normalized_by_source"] == {"train": True, "test": True}
    with pytest.raises(ValueError, match="not found"):
        load_task(dataclasses.replace(TASKS["crc100k"], hub_id=pcam_dir), cache_dir=cache)


def test_imagefolder_without_splits_holds_out_a_stratified_test_set(tmp_path, shared_data):
    for path in sorted((shared_data / "crc-val-he-7k-samples").glob("*.png")):
        (tmp_path / path.name.split("-")[0]).mkdir(exist_ok=True)
        (tmp_path / path.name.split("-")[0] / path.name).symlink_to(path)
    task = load_task(imagefolder_task(tmp_path, val_fraction=0.34), data_dir=tmp_path, test_fraction=0.25)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 15, "val": 9, "test": 8}
    assert sorted(task.splits["test"]["label"]) == list(range(8))
    assert task.provenance["derived_test"] == {"fraction": 0.25, "seed": 42}
    with pytest.raises(ValueError, match="cannot hold out 10% of 32 images stratified"):
        load_task(imagefolder_task(tmp_path), data_dir=tmp_path, test_fraction=0.1)
