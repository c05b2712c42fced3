"""Shared fixtures: the real H&E data folder and small helpers for every test module."""

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = PROJECT_ROOT / "exaonepath_hf" / "data" / "CMU-1-Small-Region.svs"
SAMPLE_SLIDE_PATCHES = 28  # tissue patches of the sample slide at the default 256 px / 0.5 µm/px


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


def extraction_settings(inputs, model, output_dir, **overrides):
    """`SlideExtractionSettings` for a test: in-process loading, batches of 16, no progress bars; `overrides`
    of `ForwardSettings` fields (e.g. tokens) go there."""
    import dataclasses

    from exaonepath_hf.eval.common.extraction import ForwardSettings
    from exaonepath_hf.eval.slide.features import SlideExtractionSettings

    forward_fields = {f.name for f in dataclasses.fields(ForwardSettings)}
    forward = {"num_workers": 0, "batch_size": 16, "progress": False}
    forward.update({key: value for key, value in overrides.items() if key in forward_fields})
    values = {key: value for key, value in overrides.items() if key not in forward_fields}
    return SlideExtractionSettings(
        inputs=tuple(inputs),
        model=str(model),
        output_dir=output_dir,
        forward=ForwardSettings(**forward),
        **values,
    )


def extraction_argv(inputs, model, output_dir) -> list[str]:
    """`exaonepath-extract` arguments for a test: in-process loading, no progress bars."""
    return [
        *map(str, inputs),
        "--model",
        str(model),
        "--output_dir",
        str(output_dir),
        "--num_workers",
        "0",
        "--quiet",
    ]
