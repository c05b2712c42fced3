"""Every README code block runs as written, in order, in a workspace holding the files it names.

A block is preceded by `<!-- readme-test: run -->` or `<!-- readme-test: skip (reason) -->` (or is the test
command itself); `<!-- readme-test: run if importable MODULE -->` runs where an optional framework is installed
and is reported as a skip elsewhere. The workspace gets small stand-ins for the user's files: a tiny ViT saved in the release
checkpoint layout as `EXAONEPath.ckpt`, real H&E images as `patch.png` / `target.png`, the bundled slide in
`slides/`, and CRC-VAL-HE-7K samples as an imagefolder (class subfolders).
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT

from exaonepath_hf import ExaonePathConfig, ExaonePathModel
from exaonepath_hf.demo import sample_slide

BLOCK = re.compile(r"(?:<!-- (?P<marker>[^>]*) -->\n)?```(?P<language>\w+)\n(?P<code>.*?)```", re.DOTALL)
RUNNABLE_LANGUAGES = {"bash", "python"}
RUN_IF_IMPORTABLE = re.compile(r"readme-test: run if importable (?P<module>[\w.]+)")


def readme_blocks() -> list[dict]:
    text = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    return [match.groupdict() for match in BLOCK.finditer(text)]


def test_every_code_block_says_whether_it_runs():
    for block in readme_blocks():
        if block["language"] not in RUNNABLE_LANGUAGES:
            continue
        marker = block["marker"] or ""
        assert (
            marker == "test-command"
            or marker == "readme-test: run"
            or RUN_IF_IMPORTABLE.fullmatch(marker)
            or re.fullmatch(r"readme-test: skip \(.+\)", marker)
        ), f"README block without a readme-test marker:\n{block['code']}"


def runs_here(marker: str) -> bool:
    match = RUN_IF_IMPORTABLE.fullmatch(marker)
    return marker == "readme-test: run" or bool(match and importlib.util.find_spec(match["module"]))


def optional_modules() -> list[str]:
    markers = (RUN_IF_IMPORTABLE.fullmatch(block["marker"] or "") for block in readme_blocks())
    return sorted({match["module"] for match in markers if match})


@pytest.mark.parametrize("module", optional_modules())
def test_blocks_of_optional_frameworks_run_where_installed(module):
    """`test_readme_blocks_run_as_written` runs them where `module` is installed; elsewhere this says so."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(
            f"{module} is not installed: its README blocks were not run (pip install '.[frameworks]')"
        )


@pytest.fixture(scope="module")
def workspace(shared_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    tiny = ExaonePathModel(ExaonePathConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1))
    torch.save(
        {"state_dict": {f"module.backbone.{k}": v for k, v in tiny.state_dict().items()}},
        root / "EXAONEPath.ckpt",
    )
    shutil.copyfile(shared_data / "crc-val-he-7k-samples" / "TUM-TCGA-DRHQMTQA.png", root / "patch.png")
    shutil.copyfile(shared_data / "he-images" / "tiatoolbox_target_image.png", root / "target.png")
    (root / "slides").mkdir()
    shutil.copyfile(sample_slide(), root / "slides" / sample_slide().name)
    for image in sorted((shared_data / "crc-val-he-7k-samples").glob("*.png")):
        class_folder = root / "crc-samples" / image.name.split("-")[0]
        class_folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, class_folder / image.name)
    return root


def test_readme_blocks_run_as_written(workspace, tmp_path):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "EXAONEPATH_FEATURE_CACHE": str(tmp_path / "feature-cache"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": str(workspace),
    }
    ran = 0
    for block in readme_blocks():
        if not runs_here(block["marker"] or ""):
            continue
        command = (
            ["bash", "-euo", "pipefail", "-c", block["code"]]
            if block["language"] == "bash"
            else [sys.executable, "-c", block["code"]]
        )
        result = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (
            f"README block failed:\n{block['code']}\n--- stderr ---\n{result.stderr[-4000:]}"
        )
        ran += 1
    assert ran >= 9
    for expected in (
        "exaonepath-vitb16/model.safetensors",
        "my-stain-reference/preprocessor_config.json",
        "tiles/manifest.json",
        "runs/cpu_smoke/export/config.json",
        "results/robustness/tsne_by_center.png",
        "results/robustness/features.safetensors",
        "walkthrough/results/heatmaps/case-7.png",
        "walkthrough/results/heatmaps/case-7/top04.png",
    ):
        assert (workspace / expected).is_file(), expected
    assert list((workspace / "results" / "linear_probe").rglob("*.record.json"))
