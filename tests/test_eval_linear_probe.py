"""End to end on the real CRC-VAL-HE-7K samples as an imagefolder: features cached, the second run does no
forward pass, the record holds the protocol, and its metrics agree with scikit-learn on the saved predictions."""

import json

import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from exaonepath_hf.eval.patch.cli import probe_main
from exaonepath_hf.eval.patch.linear_probe import (
    LinearProbeSettings,
    imagefolder_task_name,
    probe_configs,
    run_linear_probe,
)

CLASSES = ("ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


def build_crc_imagefolder(shared_data, root):
    """The flat `<CLASS>-TCGA-XXXX.png` files as an imagefolder with a metadata.csv: 2 train, 1 val, 1 test per class."""
    (root / "images").mkdir(parents=True)
    lines = ["file_name,label,split"]
    samples = sorted((shared_data / "crc-val-he-7k-samples").glob("*.png"))
    for i, path in enumerate(samples):
        (root / "images" / path.name).symlink_to(path)
        lines.append(
            f"images/{path.name},{path.name.split('-')[0]},{['train', 'train', 'val', 'test'][i % 4]}"
        )
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def crc_imagefolder(shared_data, tmp_path_factory):
    return build_crc_imagefolder(shared_data, tmp_path_factory.mktemp("crc"))


def test_end_to_end_on_crc_samples(crc_imagefolder, tiny_model_dir, tmp_path, capsys):
    argv = [
        "--model", str(tiny_model_dir), "--task", "imagefolder", "--data_dir", str(crc_imagefolder),
        "--class_names", ",".join(CLASSES), "--protocol", "paper", "eva",
        "--iterations", "60", "--eval_every", "20", "--seeds", "0", "1",
        "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"),
        "--num_workers", "1", "--batch_size", "8",
    ]  # fmt: skip
    task_dir = tmp_path / "out" / "tiny-exaonepath" / imagefolder_task_name(crc_imagefolder)
    assert probe_main(argv) == 0
    assert sorted(p.name for p in task_dir.glob("*.record.json")) == ["eva.record.json", "paper.record.json"]
    record = json.loads((task_dir / "paper.record.json").read_text())
    assert all(not s["cache_hit"] and s["forward_batches"] > 0 for s in record["extraction"].values())

    assert probe_main(argv) == 0
    record = json.loads((task_dir / "paper.record.json").read_text())
    extraction = record["extraction"]
    assert all(s["cache_hit"] and s["forward_batches"] == 0 for s in extraction.values())
    assert {split: s["num_features"] for split, s in extraction.items()} == {"train": 16, "val": 8, "test": 8}

    # the record shows the protocol and where everything came from
    probe = record["probe"]
    assert (probe["optimizer"], probe["lr"], probe["momentum"], probe["weight_decay"], probe["batch_size"]) == (
        "sgd", 0.1, 0.9, 0.0, 128,
    )  # fmt: skip
    assert (
        probe["iterations"] == 60
        and probe["seeds"] == [0, 1]
        and "best validation top1" in probe["model_selection"]
    )
    assert record["preprocessing"]["stain_normalize"] is True
    assert record["preprocessing"]["stain_reference"]["stain_matrix"][0] == [0.5626, 0.2159]
    processor = record["preprocessing"]["processor"]
    assert processor["image_processor_type"] == "ExaonePathImageProcessor" and processor["do_stain_normalize"]
    assert processor["size"] == {"shortest_edge": 256} and processor["crop_size"] == {
        "height": 224,
        "width": 224,
    }
    assert record["task"]["class_names"] == list(CLASSES)
    assert record["model"]["revision"].startswith("sha256:") and record["model"]["kind"] == "exaonepath"
    assert record["dataset"]["revision"] and set(record["dataset"]["fingerprints"]) == {
        "train",
        "val",
        "test",
    }
    assert record["environment"]["packages"]["torch"] == torch.__version__.split("+")[0]

    # metrics agree with scikit-learn on the saved predictions
    saved = load_file(str(task_dir / "paper.predictions.safetensors"))
    labels = saved["labels"].numpy()
    assert sorted(labels.tolist()) == list(range(8))
    for seed_index, per_seed in enumerate(record["results"]["per_seed"]):
        probs = saved["probabilities"][seed_index].double()
        predictions = probs.argmax(1).numpy()
        assert per_seed["top1"] == pytest.approx(accuracy_score(labels, predictions))
        assert per_seed["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
        assert per_seed["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
        probs = (probs / probs.sum(1, keepdim=True)).numpy()
        assert per_seed["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"), abs=1e-6)
    tops = [s["top1"] for s in record["results"]["per_seed"]]
    assert record["results"]["summary"]["top1"]["mean"] == pytest.approx(sum(tops) / 2)

    report = (tmp_path / "out" / "report.md").read_text()
    assert "| EXAONEPath (paper) | 0.901 | 0.818 | 0.946 | 0.939 | 0.756 | 0.804 | 0.861 |" in report
    assert "| tiny-exaonepath | crc" in report and "cached" in report


def test_probes_of_two_imagefolders_keep_both_records(shared_data, tiny_model_dir, tmp_path):
    """Two folders of the same name: each probe keeps its record and report row; a rerun replaces its own."""
    folders = [build_crc_imagefolder(shared_data, tmp_path / site / "crc") for site in ("site_a", "site_b")]
    out = tmp_path / "out"

    def probe(data_dir):
        argv = [
            "--model", str(tiny_model_dir), "--task", "imagefolder", "--data_dir", str(data_dir),
            "--class_names", ",".join(CLASSES), "--protocol", "paper", "--iterations", "2",
            "--eval_every", "1", "--seeds", "0", "--cache_dir", str(tmp_path / "cache"),
            "--output_dir", str(out), "--num_workers", "0", "--batch_size", "32",
        ]  # fmt: skip
        assert probe_main(argv) == 0

    for folder in (*folders, folders[0]):
        probe(folder)
    records = sorted(out.rglob("*.record.json"))
    assert [r.parent.name for r in records] == sorted(imagefolder_task_name(f) for f in folders)
    assert sorted(json.loads(r.read_text())["dataset"]["id"] for r in records) == sorted(
        str(f.resolve()) for f in folders
    )
    report = (out / "report.md").read_text()
    assert report.count("| tiny-exaonepath | crc | paper |") == 2


def test_local_task_without_data_explains_the_converter(tiny_model_dir, tmp_path, capsys):
    code = probe_main(["--model", str(tiny_model_dir), "--task", "msi_crc", "--cache_dir", str(tmp_path)])
    assert code == 2
    assert "exaonepath-convert-dataset msi_crc" in capsys.readouterr().err


def test_library_call_takes_typed_settings(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs --data_dir"):
        run_linear_probe(LinearProbeSettings(model=str(tiny_model_dir), task="imagefolder"))
    with pytest.raises(ValueError, match="unknown protocol"):
        probe_configs(["paper", "nope"])
    (sgd,) = probe_configs(["paper"], iterations=10, seeds=[3])
    assert (sgd.iterations, sgd.seeds, sgd.lr) == (10, (3,), 0.1)
