"""Shared fixtures: the real H&E data folder and small helpers for every test module."""

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The real H&E data folder: `$EXAONEPATH_TEST_DATA`, else `../shared/data` beside the project."""
    return Path(os.environ.get("EXAONEPATH_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real H&E test data not found at {path}; set EXAONEPATH_TEST_DATA to its folder")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small random EXAONEPath model saved with save_pretrained (64-d, 2 blocks)."""
    from exaonepath_hf import ExaonePathConfig, ExaonePathModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-exaonepath"
    ExaonePathModel(
        ExaonePathConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
    ).save_pretrained(path)
    return path
