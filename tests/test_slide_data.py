"""Slide datasets: the labels CSV joined to TRIDENT-layout feature files (written here with h5py directly, as
TRIDENT writes them), patient-level splits, patient pooling and the errors for bad input."""

from collections import Counter, defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest

from exaonepath_hf.eval.slide.data import load_bags, load_slide_dataset, patient_splits
from exaonepath_hf.eval.slide.settings import SlideDataSettings


def write_trident_h5(
    path: Path, features: np.ndarray, coords: np.ndarray, patch_size_level0: int = 256, patch_size: int = 224
) -> None:
    """A feature file as TRIDENT writes it: `features` and `coords`, the patch geometry on `coords`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features.astype(np.float32)).attrs["name"] = path.stem
        dataset = handle.create_dataset("coords", data=coords.astype(np.int64))
        for key, value in {
            "patch_size": patch_size,
            "patch_size_level0": patch_size_level0,
            "level0_magnification": 40.0,
            "target_magnification": 20.0,
            "overlap": 0,
            "name": path.stem,
        }.items():
            dataset.attrs[key] = value


def write_csv(path: Path, rows: list[dict], columns=("slide_id", "patient_id", "label")) -> Path:
    lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def cohort(tmp_path: Path, rows: list[dict], dim: int = 4, extra: tuple[str, ...] = ()) -> Path:
    """Feature files for `rows` and `extra` ids: slide i has 2 + i % 3 patches whose features encode i."""
    folder = tmp_path / "features"
    for i, slide in enumerate([row["slide_id"] for row in rows] + list(extra)):
        n = 2 + i % 3
        features = np.full((n, dim), float(i)) + np.arange(n)[:, None] / 10
        coords = np.stack([np.arange(n) * 256, np.full(n, 512)], axis=1)
        write_trident_h5(folder / f"{slide}.h5", features, coords)
    return folder


def many_patients(count: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """1-3 slides per patient, a third of the patients positive (labels per patient)."""
    generator = np.random.default_rng(seed)
    patients, labels = [], []
    for p in range(count):
        for _ in range(int(generator.integers(1, 4))):
            patients.append(f"P{p:03d}")
            labels.append(int(p % 3 == 0))
    return patients, labels


def test_derived_splits_keep_patients_whole_and_are_stratified_and_seeded():
    patients, labels = many_patients(90)
    splits = patient_splits(patients, labels, val_fraction=0.2, test_fraction=0.2, seed=7)
    split_of = defaultdict(set)
    for patient, split in zip(patients, splits, strict=True):
        split_of[patient].add(split)
    assert all(len(s) == 1 for s in split_of.values())  # no patient in two splits
    patient_count = Counter(next(iter(s)) for s in split_of.values())
    assert abs(patient_count["test"] - 18) <= 3 and abs(patient_count["val"] - 18) <= 3
    overall = np.mean(labels)
    for name in ("train", "val", "test"):
        share = np.mean([y for y, s in zip(labels, splits, strict=True) if s == name])
        assert abs(share - overall) < 0.12, (name, share, overall)
    assert patient_splits(patients, labels, 0.2, 0.2, seed=7) == splits
    assert patient_splits(patients, labels, 0.2, 0.2, seed=8) != splits


def test_dataset_joins_csv_and_files_with_patient_splits(tmp_path):
    patients, labels = many_patients(30)
    rows = [
        {"slide_id": f"S{i:03d}", "patient_id": p, "label": ["benign", "tumour"][y]}
        for i, (p, y) in enumerate(zip(patients, labels, strict=True))
    ]
    folder = cohort(tmp_path, rows)
    data = load_slide_dataset(
        folder, write_csv(tmp_path / "slides.csv", rows), SlideDataSettings(split_seed=1)
    )
    table = data.table
    assert data.class_names == ("benign", "tumour") and data.split_source == "derived"
    assert len(table) == len(rows) and table.column_names == [
        "bag_id", "patient_id", "slide_ids", "feature_files", "label", "split",
    ]  # fmt: skip
    by_patient = defaultdict(set)
    for row in table:
        by_patient[row["patient_id"]].add(row["split"])
        assert row["label"] == labels[int(row["bag_id"][1:])]
    assert all(len(s) == 1 for s in by_patient.values())
    sizes = data.sizes()
    assert sum(s["slides"] for s in sizes.values()) == len(rows)
    assert sum(s["patients"] for s in sizes.values()) == 30
    assert len(data.split("test")) == sizes["test"]["bags"] > 0

    bags = load_bags(data.split("test"))
    first = bags[0]
    index = int(first.bag_id[1:])
    n = 2 + index % 3
    np.testing.assert_allclose(
        first.features.numpy(), np.full((n, 4), float(index)) + np.arange(n)[:, None] / 10
    )
    assert first.segments[0].coords[:, 0].tolist() == [256 * k for k in range(n)]
    assert first.segments[0].attributes["patch_size_level0"] == 256


def test_patient_level_bags_concatenate_a_patients_slides(tmp_path):
    rows = [
        {"slide_id": "A1", "patient_id": "A", "label": 1, "split": "train"},
        {"slide_id": "A2", "patient_id": "A", "label": 1, "split": "train"},
        {"slide_id": "B1", "patient_id": "B", "label": 0, "split": "val"},
        {"slide_id": "C1", "patient_id": "C", "label": 0, "split": "test"},
        {"slide_id": "C2", "patient_id": "C", "label": 0, "split": "test"},
    ]
    folder = cohort(tmp_path, rows)
    csv_path = write_csv(tmp_path / "slides.csv", rows, ("slide_id", "patient_id", "label", "split"))
    data = load_slide_dataset(folder, csv_path, SlideDataSettings(level="patient"))
    assert data.split_source == "column"
    assert data.table.to_dict()["bag_id"] == ["A", "B", "C"]
    (bag,) = load_bags(data.split("test"))
    assert bag.bag_id == "C" and bag.label == 0
    # slides 3 and 4 of the cohort: 2 + 3 % 3 = 2 and 2 + 4 % 3 = 3 patches, in CSV order
    assert len(bag) == 5 and [(s.slide_id, s.start, s.stop) for s in bag.segments] == [
        ("C1", 0, 2),
        ("C2", 2, 5),
    ]
    np.testing.assert_allclose(bag.features[:2, 0].numpy(), [3.0, 3.1])
    np.testing.assert_allclose(bag.features[2:, 0].numpy(), [4.0, 4.1, 4.2])

    rows[1]["label"] = 0
    write_csv(csv_path, rows, ("slide_id", "patient_id", "label", "split"))
    with pytest.raises(ValueError, match=r"different labels: 1 \(A\)"):
        load_slide_dataset(folder, csv_path, SlideDataSettings(level="patient"))


def test_a_given_split_column_wins_and_val_is_drawn_from_train_when_absent(tmp_path):
    patients, labels = many_patients(40, seed=3)
    test_patients = {f"P{p:03d}" for p in range(0, 40, 5)}
    rows = [
        {
            "slide_id": f"S{i:03d}",
            "patient_id": p,
            "label": y,
            "split": "testing" if p in test_patients else "train",
        }
        for i, (p, y) in enumerate(zip(patients, labels, strict=True))
    ]
    folder = cohort(tmp_path, rows)
    csv_path = write_csv(tmp_path / "slides.csv", rows, ("slide_id", "patient_id", "label", "split"))
    data = load_slide_dataset(folder, csv_path, SlideDataSettings(val_fraction=0.25))
    assert data.split_source == "column+derived val"
    table = data.table.to_dict()
    for patient, split in zip(table["patient_id"], table["split"], strict=True):
        assert (split == "test") == (patient in test_patients)
    val_patients = {p for p, s in zip(table["patient_id"], table["split"], strict=True) if s == "val"}
    assert 5 <= len(val_patients) <= 11  # ~ a quarter of the 32 train patients

    rows[0]["split"] = "test"  # P000 is a test patient; move one of its slides ...
    rows[0]["patient_id"] = "P001"  # ... to a train patient
    write_csv(csv_path, rows, ("slide_id", "patient_id", "label", "split"))
    with pytest.raises(ValueError, match=r"patients with slides in two splits: 1 \(P001\)"):
        load_slide_dataset(folder, csv_path)


def test_bad_input_is_named_and_counted(tmp_path):
    rows = [{"slide_id": f"S{i}", "patient_id": f"P{i}", "label": i % 2} for i in range(12)]
    folder = cohort(tmp_path, rows[:10], extra=("X1", "X2", "X3"))
    csv_path = write_csv(tmp_path / "slides.csv", rows)
    with pytest.raises(ValueError) as error:
        load_slide_dataset(folder, csv_path)
    message = str(error.value)
    assert "without a feature file" in message and "2 (S10, S11)" in message
    assert "without a row" in message and "3 (X1, X2, X3)" in message

    write_csv(csv_path, rows[:10])
    data = load_slide_dataset(
        folder, csv_path, SlideDataSettings(allow_extra_features=True, test_fraction=0.5)
    )
    assert len(data.table) == 10 and data.class_names == ("0", "1")

    with pytest.raises(ValueError, match=r"label\(s\) \['1'\] are not among"):
        load_slide_dataset(
            folder, csv_path, SlideDataSettings(class_names=("0", "2"), allow_extra_features=True)
        )
    (tmp_path / "bad.csv").write_text("slide,label\nS0,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['slide_id', 'patient_id'\]"):
        load_slide_dataset(folder, tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="12 patients cannot be split into 20 folds"):
        patient_splits([r["patient_id"] for r in rows], [r["label"] for r in rows], 0.2, 0.05, seed=0)
    with pytest.raises(FileNotFoundError, match="feature folder not found"):
        load_slide_dataset(tmp_path / "nowhere", csv_path)


def test_numeric_labels_sort_as_numbers(tmp_path):
    rows = [{"slide_id": f"S{i}", "patient_id": f"P{i}", "label": [2, 10, 1][i % 3]} for i in range(15)]
    data = load_slide_dataset(cohort(tmp_path, rows), write_csv(tmp_path / "s.csv", rows))
    assert data.class_names == ("1", "2", "10")


def test_case_id_is_read_as_patient_id(tmp_path):
    """CLAM and TRIDENT name the patient column `case_id`: the same splits as with `patient_id`."""
    patients, labels = many_patients(30)
    rows = [
        {"slide_id": f"S{i:03d}", "patient_id": p, "case_id": p, "label": y}
        for i, (p, y) in enumerate(zip(patients, labels, strict=True))
    ]
    folder = cohort(tmp_path, rows)
    settings = SlideDataSettings(split_seed=1)
    by_patient = load_slide_dataset(folder, write_csv(tmp_path / "patient.csv", rows), settings)
    csv_path = write_csv(tmp_path / "case.csv", rows, ("slide_id", "case_id", "label"))
    by_case = load_slide_dataset(folder, csv_path, settings)
    assert by_case.table.to_dict() == by_patient.table.to_dict()
    assert by_case.sizes() == by_patient.sizes() and by_case.sizes()["test"]["patients"] > 0

    write_csv(csv_path, rows, ("slide_id", "patient_id", "case_id", "label"))
    with pytest.raises(ValueError, match="both patient_id and case_id"):
        load_slide_dataset(folder, csv_path)


def test_clam_feature_folders_are_read_h5_first_then_pt(tmp_path):
    """CLAM's --feat_dir holds each slide twice, `h5_files/<id>.h5` (features, coords) and `pt_files/<id>.pt`
    (the features as one tensor): a slide with both is read from its .h5 (it has coordinates), one with only a
    .pt from that, features as torch.save stored them."""
    import torch

    rows = [{"slide_id": f"S{i}", "patient_id": f"P{i}", "label": i % 2} for i in range(10)]
    feat_dir = tmp_path / "clam_features"
    tensors = {row["slide_id"]: torch.randn(3 + i, 4) for i, row in enumerate(rows)}
    (feat_dir / "pt_files").mkdir(parents=True)
    for slide_id, tensor in tensors.items():
        torch.save(tensor, feat_dir / "pt_files" / f"{slide_id}.pt")
    coords = np.stack([np.arange(3) * 256, np.zeros(3)], axis=1)
    write_trident_h5(feat_dir / "h5_files" / "S0.h5", tensors["S0"].numpy(), coords)
    settings = SlideDataSettings(test_fraction=0.5, val_fraction=0.2)
    data = load_slide_dataset(feat_dir, write_csv(tmp_path / "slides.csv", rows), settings)
    files = {row["slide_ids"][0]: row["feature_files"][0] for row in data.table}
    assert files["S0"].endswith("h5_files/S0.h5") and files["S1"].endswith("pt_files/S1.pt")
    assert sum(split["slides"] for split in data.sizes().values()) == 10  # every slide has features

    bags = {bag.bag_id: bag for name in ("train", "val", "test") for bag in load_bags(data.split(name))}
    for slide_id, tensor in tensors.items():
        torch.testing.assert_close(bags[slide_id].features, tensor)
    assert bags["S0"].segments[0].coords.tolist() == coords.tolist()
    assert bags["S1"].segments[0].coords is None and bags["S1"].segments[0].attributes == {}


def test_a_pt_file_that_is_not_a_feature_bag_is_refused(tmp_path):
    import torch

    from exaonepath_hf.eval.slide.bags import load_slide_features

    torch.save({"features": torch.zeros(3, 4)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(4), tmp_path / "vector.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a tensor")
    with pytest.raises(ValueError, match="holds a dict, not the float tensor"):
        load_slide_features(tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="holds a 1-d torch.float32 tensor"):
        load_slide_features(tmp_path / "vector.pt")
    with pytest.raises(ValueError, match="not a plain tensor file"):
        load_slide_features(tmp_path / "garbage.pt")
