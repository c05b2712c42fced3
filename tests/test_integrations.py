"""EXAONEPath inside eva, lazyslide and timm: each path gives the features of the folder's own
`AutoImageProcessor` (Macenko with the folder's stain reference) + `AutoModel`, which the frameworks' own
transforms (no Macenko) do not."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROJECT_ROOT
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from exaonepath_hf import (
    DEFAULT_STAIN_REFERENCE,
    ExaonePathConfig,
    ExaonePathImageProcessor,
    ExaonePathModel,
)
from exaonepath_hf.convert import save_folder, timm_architecture
from exaonepath_hf.convert_cli import main as convert_main
from exaonepath_hf.demo import sample_slide

FRAMEWORKS_EXTRA = "pip install 'exaonepath-hf[frameworks]'"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_folder(shared_data, tmp_path_factory) -> Path:
    """A tiny random model saved with a processor whose stain reference was fitted to a real target image, so
    that a path which normalizes to the package's default reference (or not at all) gives other features."""
    torch.manual_seed(0)
    model = ExaonePathModel(ExaonePathConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2))
    processor = ExaonePathImageProcessor()
    processor.fit_stain_reference(Image.open(shared_data / "he-images" / "tiatoolbox_target_image.png"))
    assert processor.stain_reference != DEFAULT_STAIN_REFERENCE.to_dict()
    return save_folder(model, tmp_path_factory.mktemp("integrations") / "tiny", processor=processor)


@pytest.fixture(scope="module")
def patches(shared_data) -> list[Image.Image]:
    """Four real H&E tiles (CRC-VAL-HE-7K, 224²) and a blank one that Macenko cannot normalize."""
    tiles = [
        Image.open(path).convert("RGB") for path in sorted(shared_data.glob("crc-val-he-7k-samples/*.png"))
    ]
    return tiles[::8] + [Image.new("RGB", tiles[0].size, (245, 245, 245))]


def uint8_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])


def reference_features(folder: Path, images, **processor_overrides) -> torch.Tensor:
    processor = AutoImageProcessor.from_pretrained(folder, **processor_overrides)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=processor(images, return_tensors="pt")["pixel_values"]).pooler_output


def test_eva_backbone_from_a_config_runs_the_folders_processor(model_folder, patches):
    pytest.importorskip("eva", reason=f"kaiko-eva is not installed ({FRAMEWORKS_EXTRA})")
    import jsonargparse
    import yaml
    from torch import nn

    # the README's eva config, instantiated the way eva's command line does (jsonargparse, nn.Module type)
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    (config,) = [
        block for block in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL) if "eva_backbone" in block
    ]
    config = config.replace("exaonepath-vitb16", str(model_folder))
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--backbone", type=nn.Module)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    backbone = instantiate(parser.parse_object(yaml.safe_load(config))).backbone
    assert type(backbone).__name__ == "ModelFromFunction"

    expected = reference_features(model_folder, patches)
    batch = uint8_batch(patches)  # eva's datasets yield uint8 C×H×W images when given no transforms
    with torch.no_grad():
        for images in (batch, batch.float() / 255):  # raw, or after ToDtype(scale=True)
            assert (backbone(images) - expected).abs().max() < TOLERANCE
    assert backbone.model.stain_fallbacks == 2, "the blank tile, once per call"
    without_macenko = reference_features(model_folder, patches, do_stain_normalize=False)
    assert (without_macenko[:-1] - expected[:-1]).abs().max() > 100 * TOLERANCE, (
        "Macenko changes the features"
    )

    normalized = (batch.float() / 255 - 0.45) / 0.225  # what eva's ResizeAndCrop would have handed over
    with pytest.raises(ValueError, match="raw pixels"):
        backbone(normalized)


def test_lazyslide_feature_extraction_runs_the_folders_processor(model_folder):
    pytest.importorskip("lazyslide", reason=f"lazyslide is not installed ({FRAMEWORKS_EXTRA})")
    import lazyslide as zs
    from lazyslide_models import MODEL_REGISTRY

    from exaonepath_hf.integrations import lazyslide_model, register_lazyslide

    model_class = register_lazyslide()
    assert register_lazyslide() is model_class and MODEL_REGISTRY["exaonepath"] is model_class
    wsi = zs.open_wsi(sample_slide())
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, 256, mpp=0.5)
    options = {"device": "cpu", "pbar": False, "return_features": True}
    features = zs.tl.feature_extraction(wsi, "exaonepath", model_path=str(model_folder), **options)
    assert "exaonepath_tiles" in wsi.tables

    dataset = wsi.ds.tile_images()  # the tiles as lazyslide reads them, no transform
    tiles = [dataset[index]["image"] for index in range(len(dataset))]
    expected = reference_features(model_folder, tiles)
    assert features.shape == tuple(expected.shape) and len(tiles) > 10
    assert np.abs(features - expected.numpy()).max() < TOLERANCE

    instance = lazyslide_model(model_folder)  # passed as an object, without the registry
    again = zs.tl.feature_extraction(wsi, instance, key_added="again", **options)
    assert np.abs(again - features).max() < TOLERANCE


@pytest.fixture(scope="module")
def timm_folder(model_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("timm") / "tiny-timm"
    assert convert_main([str(model_folder), "--out", str(out), "--format", "timm"]) == 0
    return out


def test_timm_export_loads_with_timm_and_equals_pooler_output(model_folder, timm_folder, patches):
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")

    vit = timm.create_model(f"local-dir:{timm_folder}", pretrained=True).eval()
    processor = AutoImageProcessor.from_pretrained(model_folder)
    pixel_values = processor(patches, return_tensors="pt")["pixel_values"]  # Macenko-normalized input
    with torch.no_grad():
        expected = AutoModel.from_pretrained(model_folder).eval()(pixel_values=pixel_values).pooler_output
        assert (vit(pixel_values) - expected).abs().max() < 1e-5

    # timm's own transforms, from the exported pretrained_cfg, on Macenko output give the processor's pixels
    exported = ExaonePathImageProcessor.from_pretrained(timm_folder)
    assert exported.stain_reference == processor.stain_reference, (
        "the stain reference travels with the weights"
    )
    normalized = exported.stain_normalizer().normalize(uint8_batch(patches)).images
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=vit))
    timm_pixels = torch.stack([transform(image) for image in normalized])
    assert (timm_pixels - pixel_values).abs().max() < 1e-5

    config = json.loads((timm_folder / "config.json").read_text())
    assert config["num_classes"] == 0 and config["architecture"] == "vit_base_patch16_224"
    assert config["model_args"]["embed_dim"] == 64
    assert not {"tag", "license"} & set(config["pretrained_cfg"]), "timm's ImageNet tag and licence dropped"
    card = (timm_folder / "README.md").read_text()
    assert "library_name: timm" in card and "timm does not apply Macenko" in card
    assert "ExaonePathImageProcessor.from_pretrained" in card and "stain_normalizer()" in card
    assert "license:" not in card and "pretrained on H&E" not in card


def test_timm_architecture_names():
    pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    assert timm_architecture(ExaonePathConfig()) == ("vit_base_patch16_224", {})
    small = ExaonePathConfig(hidden_size=384, num_attention_heads=6)
    assert timm_architecture(small) == ("vit_small_patch16_224", {})


def test_timm_export_without_timm_is_one_line(model_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    out = tmp_path / "no-timm"
    assert convert_main([str(model_folder), "--out", str(out), "--format", "timm"]) == 2
    assert "needs timm: pip install timm" in capsys.readouterr().err
    assert not out.exists()


def test_integrations_import_no_framework():
    """`import exaonepath_hf.integrations` works where none of the frameworks is installed."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('eva', 'lazyslide', 'lazyslide_models', 'timm'):\n"
        "    sys.modules[name] = None\n"
        "import exaonepath_hf.integrations\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
