"""exaonepath-demo end to end on the bundled slide, with a 2-step demo model so that it stays fast."""

import json
import subprocess
import sys

from safetensors import safe_open

from exaonepath_hf.demo import LAB_STAINS


def test_demo_writes_every_output(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "exaonepath_hf.demo", "--out", str(out), "--train-steps", "2"],
        capture_output=True,
        text=True,
        timeout=900,
        env={"HF_HUB_OFFLINE": "1", **dict(__import__("os").environ)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for name in (
        "thumbnail.png",
        "tsne.png",
        "feature_collapse.md",
        "feature_collapse.json",
        "features.safetensors",
    ):
        assert (out / name).is_file(), name
    assert "not EXAONEPath" in result.stdout and "kNN slide accuracy" in result.stdout
    with safe_open(str(out / "features.safetensors"), framework="pt") as features:
        raw, macenko = features.get_tensor("raw"), features.get_tensor("macenko")
        slides = features.get_tensor("virtual_slide")
        assert "demo ViT" in features.metadata()["model"]
    num_patches = len(raw) // len(LAB_STAINS)
    assert num_patches == 28, "CMU-1-Small-Region at 0.5 µm/px gives 28 tissue patches"
    assert raw.shape == macenko.shape == (4 * num_patches, 192)
    assert slides.bincount().tolist() == [num_patches] * len(LAB_STAINS)
    collapse = json.loads((out / "feature_collapse.json").read_text())
    assert [entry["setting"] for entry in collapse] == ["raw input", "Macenko input"]
    raw_knn, macenko_knn = (entry["by_group"]["knn_accuracy"] for entry in collapse)
    # The four stainings of a patch are near-identical after Macenko: they become each other's neighbours.
    assert macenko_knn < raw_knn
