"""`exaonepath-slide-probe` end to end on small synthetic feature folders in TRIDENT's layout: the record, its
metrics against scikit-learn on the saved predictions, the report, the head selection of `fit_head`, and
attention heatmaps plus top patches drawn on the bundled CMU-1-Small-Region slide."""

import json

import h5py
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score
from test_slide_data import write_csv, write_trident_h5

from exaonepath_hf.demo import sample_slide
from exaonepath_hf.eval.slide.cli import slide_probe_main as main
from exaonepath_hf.eval.slide.data import Bag
from exaonepath_hf.eval.slide.probe import fit_head
from exaonepath_hf.eval.slide.settings import HeadTrainingConfig
from exaonepath_hf.images import decode_rgb
from exaonepath_hf.tiling import TilingConfig, open_slide, plan_patches

DIM = 8
SIGNAL = 4.0
FAST = [
    "--seeds", "0", "1", "--max_epochs", "15", "--batch_size", "4", "--max_patches", "16",
    "--hidden_dim", "16", "--dropout", "0", "--lr", "1e-2", "--patience", "0", "--cpu", "--cpu_threads", "1",
]  # fmt: skip


def planted_features(generator: np.random.Generator, n: int, label: int, planted: int = 3):
    """n noise patches; for label 1, `planted` of them (returned) carry the class signal on feature 0."""
    features = generator.normal(size=(n, DIM))
    where = generator.choice(n, size=planted, replace=False) if label else np.array([], dtype=int)
    features[where, 0] += SIGNAL
    return features, set(where.tolist())


def synthetic_cohort(root, slides: int = 40, split_of=None) -> list[dict]:
    """`slides` feature files (two per patient, the patient's label on both) and their CSV rows."""
    generator = np.random.default_rng(0)
    rows = []
    for i in range(slides):
        patient, label = i // 2, (i // 2) % 2
        n = int(generator.integers(10, 30))
        features, _ = planted_features(generator, n, label)
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1)
        write_trident_h5(root / "features" / f"S{i:03d}.h5", features, coords)
        row = {"slide_id": f"S{i:03d}", "patient_id": f"P{patient:02d}", "label": ["normal", "tumour"][label]}
        if split_of is not None:
            row["split"] = split_of(patient)
        rows.append(row)
    return rows


def test_cli_end_to_end_record_metrics_and_report(tmp_path, capsys):
    rows = synthetic_cohort(tmp_path)
    labels = write_csv(tmp_path / "slides.csv", rows)
    out = tmp_path / "out"
    common = ["--features", str(tmp_path / "features"), "--labels", str(labels), "--output_dir", str(out)]
    assert main([*common, "--head", "abmil", *FAST]) == 0
    record = json.loads((out / "slides.abmil.slide_record.json").read_text())

    for key in ("balanced_accuracy", "auroc", "macro_f1"):
        assert set(record["test"][key]) >= {"mean", "sd"} and record["test"][key]["n"] == 2
        values = [run[key] for run in record["per_seed"]]
        assert record["test"][key]["mean"] == pytest.approx(np.mean(values))
        assert record["test"][key]["sd"] == pytest.approx(np.std(values, ddof=1))
    assert [run["seed"] for run in record["per_seed"]] == [0, 1]
    assert record["test"]["balanced_accuracy"]["mean"] >= 0.8  # planted signal; chance is 0.5
    assert record["task"] == {"name": "slides", "class_names": ["normal", "tumour"], "level": "slide"}
    head = record["head"]
    assert (head["head"], head["lr"], head["batch_size"], head["max_epochs"]) == ("abmil", 1e-2, 4, 15)
    sizes = record["data"]["sizes"]
    assert sum(s["slides"] for s in sizes.values()) == 40 and sum(s["patients"] for s in sizes.values()) == 20
    assert all(
        len(run["history"]) == 15 and run["steps"] == run["history"][-1]["step"] for run in record["per_seed"]
    )

    # the record's metrics are scikit-learn's on the saved test predictions
    with safe_open(out / "slides.abmil.predictions.safetensors", "pt") as saved:
        probabilities, references = (
            saved.get_tensor("probabilities").numpy(),
            saved.get_tensor("labels").numpy(),
        )
        bag_ids = json.loads(saved.metadata()["bag_ids"])
    assert probabilities.shape == (2, sizes["test"]["bags"], 2) and len(bag_ids) == sizes["test"]["bags"]
    assert references.tolist() == [int(rows[int(b[1:])]["label"] == "tumour") for b in bag_ids]
    for run, probs in zip(record["per_seed"], probabilities, strict=True):
        predictions = probs.argmax(axis=1)
        assert run["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(references, predictions))
        assert run["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro"))
        assert run["auroc"] == pytest.approx(roc_auc_score(references, probs[:, 1]))
    with safe_open(out / "slides.abmil.heads.safetensors", "pt") as heads:
        assert {k.split(".")[0] for k in heads.keys()} == {"seed0", "seed1"}
        assert heads.get_tensor("seed0.attention_v.weight").shape == (16, DIM)

    # a second head into the same folder: the report lists both runs
    assert main([*common, "--head", "mean", *FAST]) == 0
    report = (out / "report.md").read_text()
    assert "| slides | abmil | slide | 2 | " in report and "| slides | mean | slide | 2 | " in report
    assert "## slides, mean" in report
    assert "balanced_accuracy" in capsys.readouterr().out


def test_slide_probes_of_two_tasks_keep_both_records(tmp_path):
    """Two --name runs into one folder keep their records and report rows; a rerun replaces its own."""
    labels = write_csv(tmp_path / "slides.csv", synthetic_cohort(tmp_path))
    out = tmp_path / "out"
    common = ["--features", str(tmp_path / "features"), "--labels", str(labels), "--output_dir", str(out)]
    quick = [*FAST, "--seeds", "0", "--max_epochs", "1"]
    for name in ("msi", "subtype", "msi"):
        assert main([*common, "--name", name, *quick]) == 0
    assert sorted(p.name for p in out.glob("*.slide_record.json")) == [
        "msi.abmil.slide_record.json",
        "subtype.abmil.slide_record.json",
    ]
    record = json.loads((out / "subtype.abmil.slide_record.json").read_text())
    assert record["task"]["name"] == "subtype"
    assert all((out / file).is_file() for file in record["outputs"].values())
    report = (out / "report.md").read_text()
    assert all(report.count(f"| {name} | abmil | slide | 1 | ") == 1 for name in ("msi", "subtype"))


def test_clam_pt_bags_train_the_probe(tmp_path, capsys):
    """CLAM's `pt_files/<slide_id>.pt` bags (one float tensor each, no coordinates) are slides with features:
    the cohort's bags, moved from TRIDENT's .h5 layout into CLAM's, train the head on the planted signal."""
    rows = synthetic_cohort(tmp_path)
    pt_files = tmp_path / "clam" / "pt_files"
    pt_files.mkdir(parents=True)
    for path in sorted((tmp_path / "features").glob("*.h5")):
        with h5py.File(path, "r") as handle:
            torch.save(torch.from_numpy(handle["features"][()]), pt_files / f"{path.stem}.pt")
    labels = write_csv(tmp_path / "slides.csv", rows)
    out = tmp_path / "out"
    argv = ["--features", str(tmp_path / "clam"), "--labels", str(labels), "--output_dir", str(out)]
    assert main([*argv, "--head", "abmil", *FAST]) == 0
    record = json.loads((out / "slides.abmil.slide_record.json").read_text())
    assert sum(split["slides"] for split in record["data"]["sizes"].values()) == 40
    assert record["test"]["balanced_accuracy"]["mean"] >= 0.8  # planted signal; chance is 0.5
    # heatmaps need coordinates, which .pt bags lack: refused in one line before any training
    drawn = tmp_path / "drawn"
    heatmaps = ["--head", "abmil", "--heatmaps", "--slides", str(tmp_path), *FAST]
    assert main([*argv[:-1], str(drawn), *heatmaps]) == 2
    assert "CLAM .pt bags have none" in capsys.readouterr().err and not drawn.exists()


def test_cli_rejects_bad_input(tmp_path, capsys):
    rows = synthetic_cohort(tmp_path, slides=12)
    labels = write_csv(tmp_path / "slides.csv", rows[:10])
    common = [
        "--features",
        str(tmp_path / "features"),
        "--labels",
        str(labels),
        "--output_dir",
        str(tmp_path),
    ]
    assert main([*common, *FAST]) == 2
    assert "without a row in" in capsys.readouterr().err
    assert main([*common, "--head", "mean", "--heatmaps", "--slides", str(tmp_path), *FAST]) == 2
    assert "heatmaps need an attention head" in capsys.readouterr().err
    assert main([*common, "--heatmaps", *FAST]) == 2
    assert "--heatmaps needs --slides" in capsys.readouterr().err


def test_fit_head_restores_the_best_validation_head_and_stops_after_patience():
    """Validation labels unrelated to the features make the score wander: training stops `patience`
    evaluations after the best one (highest balanced accuracy, then lowest loss, the first of equals), and
    the head handed back is that evaluation's."""
    generator = np.random.default_rng(1)

    def bags(count: int, labels) -> list[Bag]:
        made = []
        for i, label in zip(range(count), labels, strict=False):
            features, _ = planted_features(generator, 20, i % 2)
            made.append(Bag(f"B{i}", int(label), torch.from_numpy(features).float()))
        return made

    train, val = bags(16, [i % 2 for i in range(16)]), bags(8, generator.integers(0, 2, 8))
    config = HeadTrainingConfig(
        head="mean", lr=0.05, batch_size=4, max_epochs=200, patience=3, max_patches=None, seeds=(0,)
    )
    fit = fit_head(train, val, config, num_classes=2, seed=0, accelerator=Accelerator(cpu=True))

    ranked = sorted(
        range(len(fit.history)),
        key=lambda i: (-fit.history[i]["val_balanced_accuracy"], fit.history[i]["val_loss"], i),
    )
    best = fit.history[ranked[0]]
    assert fit.stopped_early and len(fit.history) == ranked[0] + 1 + config.patience
    assert (fit.selected_step, fit.selected_val_score) == (best["step"], best["val_balanced_accuracy"])
    with torch.no_grad():
        logits = torch.cat(
            [fit.head(bag.features[None], torch.ones(1, len(bag), dtype=torch.bool)).logits for bag in val]
        )
    labels = torch.tensor([bag.label for bag in val])
    assert torch.nn.functional.cross_entropy(logits, labels).item() == pytest.approx(
        best["val_loss"], rel=1e-5
    )
    assert balanced_accuracy_score(labels, logits.argmax(dim=1)) == pytest.approx(
        best["val_balanced_accuracy"]
    )


def test_heatmap_and_top_patches_on_the_bundled_slide(tmp_path):
    slide_path = sample_slide()
    slide_id = slide_path.name.removesuffix(".svs")
    with open_slide(slide_path) as reader:
        plan = plan_patches(reader, TilingConfig())  # tissue patches of 0.5 µm/px x 256 px
        width, height = reader.dimensions
    coords, side = plan.coordinates, plan.patch_size_level0
    assert len(coords) >= 20

    # training and validation patients from the synthetic cohort; test: the real slide plus two others
    rows = synthetic_cohort(
        tmp_path, slides=40, split_of=lambda p: "test" if p >= 18 else ("val" if p >= 14 else "train")
    )
    features, planted = planted_features(np.random.default_rng(1), len(coords), label=1)
    write_trident_h5(tmp_path / "features" / f"{slide_id}.h5", features, coords, side, patch_size=256)
    rows.append({"slide_id": slide_id, "patient_id": "CMU", "label": "tumour", "split": "test"})
    labels = write_csv(tmp_path / "slides.csv", rows, ("slide_id", "patient_id", "label", "split"))
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / slide_path.name).symlink_to(slide_path)
    out = tmp_path / "out"
    argv = [
        "--features", str(tmp_path / "features"), "--labels", str(labels), "--output_dir", str(out),
        "--heatmaps", "--slides", str(tmp_path / "slides"), "--top_k", str(len(coords)),
        "--thumbnail_size", "256", *FAST, "--seeds", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "slides.abmil.slide_record.json").read_text())
    heatmaps = record["heatmaps"]
    assert sorted(heatmaps["missing_slides"]) == ["S036", "S037", "S038", "S039"]
    (drawn,) = heatmaps["written"]
    assert drawn["slide_id"] == slide_id and f"heatmaps/{slide_id}.png" in (out / "report.md").read_text()

    # every patch exported, ranked by attention; the three largest attentions are on the planted patches
    top = drawn["top_patches"]
    assert [t["rank"] for t in top] == list(range(1, len(coords) + 1))
    attention = [t["attention"] for t in top]
    assert attention == sorted(attention, reverse=True) and sum(attention) == pytest.approx(1.0, abs=1e-5)
    planted_coords = {tuple(coords[i]) for i in planted}
    assert {(t["x"], t["y"]) for t in top[:3]} == planted_coords
    # each exported patch is the slide region at its coordinates (read level 0, resized 257 -> 256 px)
    with open_slide(slide_path) as reader:
        for entry in (top[0], top[-1]):
            image = decode_rgb(out / "heatmaps" / entry["file"])
            assert image.shape == (256, 256, 3)
            region = reader.read_region((entry["x"], entry["y"]), 0, (side, side))
            assert np.abs(image.mean(axis=(0, 1)) - region.mean(axis=(0, 1))).max() < 2

    # the heatmap: the thumbnail (longest side 256) over a 12-px colour bar; the top patch is drawn in the
    # colour map's bright end, the lowest in its dark end
    heatmap = decode_rgb(out / "heatmaps" / f"{slide_id}.png")
    assert heatmap.shape[0] - 12 == 256 and abs(heatmap.shape[1] - round(256 * width / height)) <= 1
    scale = height / 256

    def centre(entry):
        return heatmap[int((entry["y"] + side / 2) / scale), int((entry["x"] + side / 2) / scale)]

    assert centre(top[0])[1] > 139 and centre(top[-1])[1] < 116  # green: 0.55 * 252 + ..., <= 0.45 * 255
