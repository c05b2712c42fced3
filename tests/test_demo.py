"""exaonepath-demo end to end on the bundled slide, with a 2-step demo model so that it stays fast; then the
robustness CLI with that demo DINO model beside a random tiny ViT on the virtual-labs protocol."""

import csv
import json
import os
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

from exaonepath_hf.eval.robustness.cli import robustness_main
from exaonepath_hf.eval.robustness.metrics import paired_retrieval
from exaonepath_hf.eval.robustness.run import virtual_labs_for

LABS = [lab.name for lab in virtual_labs_for()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "exaonepath_hf.demo_cli", "--out", str(out), "--train-steps", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout


def test_demo_writes_every_output(demo):
    out, stdout = demo
    for name in (
        "thumbnail.png",
        "tsne_by_center.png",
        "robustness.md",
        "robustness.json",
        "features.safetensors",
        "samples.csv",
        "virtual-labs/metadata.csv",
    ):
        assert (out / name).is_file(), name
    assert "not EXAONEPath" in stdout and "paired top-10" in stdout and "can and cannot show" in stdout
    assert "robustness_index undefined: the data has no biological class labels" in stdout
    # the virtual labs, not a Macenko re-staining (which Macenko input would undo by construction)
    assert "x 5 virtual labs (" + ", ".join(LABS) + ")" in stdout

    with open(out / "samples.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    num_patches = len(rows) // len(LABS)
    assert num_patches == 28, "CMU-1-Small-Region at 0.5 µm/px gives 28 tissue patches"
    assert sorted({row["center"] for row in rows}) == sorted(LABS)
    assert all(sum(r["pair_id"] == row["pair_id"] for r in rows) == len(LABS) for row in rows[:3])
    assert {row["label"] for row in rows} == {""}  # the slide's patches have no tissue class
    with safe_open(str(out / "features.safetensors"), framework="pt") as features:
        name = "demo ViT (2 DINO steps here; not EXAONEPath)"
        raw, macenko = features.get_tensor(f"{name}/raw"), features.get_tensor(f"{name}/macenko")
    assert raw.shape == macenko.shape == (len(LABS) * num_patches, 192)

    records = json.loads((out / "robustness.json").read_text())
    assert [record["setting"] for record in records] == ["raw", "macenko"]
    for record, features in zip(records, (raw, macenko), strict=True):
        metrics = record["metrics"]
        assert metrics["robustness_index"] is None and "label" in record["reasons"]["robustness_index"]
        # the saved features and samples recompute the reported paired retrieval
        paired = paired_retrieval(features, [r["pair_id"] for r in rows], [r["center"] for r in rows])
        assert metrics["paired_top10"] == pytest.approx(paired.top10)
        assert metrics["paired_cosine"] == pytest.approx(paired.cosine)
        assert metrics["slide_identity_chance"] == pytest.approx(1 / len(LABS))  # a lab's copy: one slide
    markdown = (out / "robustness.md").read_text()
    assert "Virtual labs" in markdown and "What a demo ViT can and cannot show" in markdown


@pytest.mark.slow
def test_robustness_cli_with_the_demo_model_and_a_random_vit(demo, shared_data, tiny_model_dir, tmp_path):
    """The issue's offline run: two models (a random tiny ViT and the demo's DINO model) on the 32
    crc-val-he-7k-samples re-stained as virtual labs, raw and Macenko, in at most 5 minutes."""
    out, _ = demo
    crc = tmp_path / "crc"
    for path in sorted((shared_data / "crc-val-he-7k-samples").glob("*.png")):
        (crc / path.name.split("-")[0]).mkdir(parents=True, exist_ok=True)
        (crc / path.name.split("-")[0] / path.name).write_bytes(path.read_bytes())
    started = time.perf_counter()
    argv = [
        "--model", str(tiny_model_dir), "--model", str(out / "demo-model-training" / "export"),
        "--name", "random-vit", "--name", "demo-dino", "--data", str(crc), "--virtual_labs",
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--num_workers", "1",
    ]  # fmt: skip
    assert robustness_main(argv) == 0
    assert time.perf_counter() - started < 300
    records = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert [(r["model"], r["setting"]) for r in records] == [
        ("random-vit", "raw"), ("random-vit", "macenko"), ("demo-dino", "raw"), ("demo-dino", "macenko"),
    ]  # fmt: skip
    assert all(r["metrics"]["robustness_index"] is not None for r in records)
    assert "| demo-dino | macenko |" in (tmp_path / "out" / "robustness.md").read_text()
