"""exaonepath-convert: the release's layouts, timm and DINO weights → a folder that loads like any HF model."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from exaonepath_hf import ExaonePathConfig, ExaonePathImageProcessor, ExaonePathModel
from exaonepath_hf.convert import CheckpointMismatchError, load_backbone, push_folder_to_hub
from exaonepath_hf.convert_cli import main as convert_main
from exaonepath_hf.hub import http_client

RELEASE_HUB_CONFIG = {
    "img_size": [224],
    "patch_size": 16,
    "in_chans": 3,
    "num_classes": 0,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4,
    "qkv_bias": True,
    "qk_scale": None,
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "drop_path_rate": 0.1,
}


def dino_head(prefix: str, dim: int = 768) -> dict[str, torch.Tensor]:
    """The tensors of a DINO projection head (3-layer MLP + weight-normalised last layer), small out_dim."""
    head = {f"{prefix}mlp.{i}.weight": torch.randn(dim if i else 32, dim) for i in (0, 2)}
    head.update({f"{prefix}mlp.{i}.bias": torch.randn(dim if i else 32) for i in (0, 2)})
    head[f"{prefix}last_layer.weight_g"] = torch.ones(16, 1)
    head[f"{prefix}last_layer.weight_v"] = torch.randn(16, 8)
    return head


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()


@pytest.fixture(scope="module")
def pixel_values():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def timm_features(timm_vit, pixel_values):
    with torch.no_grad():
        return timm_vit(pixel_values)


@pytest.fixture(scope="module")
def release_ckpt(timm_vit, tmp_path_factory) -> Path:
    """The release checkpoint layout: Lightning-style `state_dict`, wrapped names, a DINO head beside them."""
    state_dict = {f"module.backbone.{key}": value for key, value in timm_vit.state_dict().items()}
    state_dict.update(dino_head("module.head."))
    path = tmp_path_factory.mktemp("release") / "EXAONEPath.ckpt"
    torch.save({"state_dict": state_dict, "epoch": 10}, path)
    return path


@pytest.fixture(scope="module")
def converted(release_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "exaonepath"
    assert convert_main([str(release_ckpt), "--out", str(out), "--weights_source", "exaonepath-release"]) == 0
    return out


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_release_ckpt_converts_to_timm_features(converted, pixel_values, timm_features, attn_implementation):
    model = AutoModel.from_pretrained(converted, attn_implementation=attn_implementation).eval()
    assert isinstance(model, ExaonePathModel)
    assert model.config._attn_implementation == attn_implementation
    with torch.no_grad():
        features = model(pixel_values).pooler_output
    assert (features - timm_features).abs().max() < 1e-5


CODE_FILES = {
    "configuration_exaonepath.py",
    "modeling_exaonepath.py",
    "image_processing_exaonepath.py",
    "stain_normalization.py",
}
FOLDER_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} | CODE_FILES


def test_converted_folder_contents(converted):
    names = {path.name for path in converted.iterdir()}
    assert FOLDER_FILES <= names
    processor_config = json.loads((converted / "preprocessor_config.json").read_text())
    assert processor_config["auto_map"] == {
        "AutoImageProcessor": "image_processing_exaonepath.ExaonePathImageProcessor"
    }
    assert processor_config["do_stain_normalize"] is True
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "exaonepath" and config["layer_norm_eps"] == 1e-6
    assert config["auto_map"] == {
        "AutoConfig": "configuration_exaonepath.ExaonePathConfig",
        "AutoModel": "modeling_exaonepath.ExaonePathModel",
    }
    card = (converted / "README.md").read_text()
    assert card.startswith("---\nlicense: other") and "pipeline_tag: image-feature-extraction" in card
    assert "2408.00380" in card and "not for clinical diagnosis" in card.lower()
    assert not list(converted.parent.glob(".exaonepath.*")), "staging folder left behind"


def test_release_hub_layout_converts(timm_vit, tmp_path, pixel_values, timm_features):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(RELEASE_HUB_CONFIG))
    save_file(
        {key: value.contiguous() for key, value in timm_vit.state_dict().items()}, hub / "model.safetensors"
    )
    model = load_backbone(hub)
    assert model.config.layer_norm_eps == 1e-6, "the release's own loader uses 1e-5; training used 1e-6"
    with torch.no_grad():
        assert (model(pixel_values).pooler_output - timm_features).abs().max() < 1e-5


def test_timm_classifier_and_dino_full_checkpoint(tmp_path):
    torch.manual_seed(1)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10).eval()
    timm_file = tmp_path / "vit_small.pth"
    torch.save(vit.state_dict(), timm_file)
    model = load_backbone(timm_file)
    assert (model.config.hidden_size, model.config.num_attention_heads) == (384, 6)
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = vit.forward_head(vit.forward_features(pixel_values), pre_logits=True)
        assert (model(pixel_values).pooler_output - expected).abs().max() < 1e-5

    backbone = {
        f"backbone.{key}": value for key, value in vit.state_dict().items() if not key.startswith("head")
    }
    dino_file = tmp_path / "dino_full.pth"
    torch.save({"teacher": {**backbone, **dino_head("head.", 384)}, "student": {}, "epoch": 3}, dino_file)
    with torch.no_grad():
        assert (load_backbone(dino_file)(pixel_values).pooler_output - expected).abs().max() < 1e-5


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return ExaonePathModel(
        ExaonePathConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
    ).state_dict()


@pytest.mark.parametrize(
    ("corrupt", "named"),
    [
        (
            lambda sd: sd.update({"blocks.1.attn.qkv.weight": torch.zeros(10, 64)}),
            "mis-shaped (1): blocks.1.attn.qkv.weight",
        ),
        (lambda sd: sd.pop("blocks.0.mlp.fc2.bias"), "missing (1): blocks.0.mlp.fc2.bias"),
        (
            lambda sd: sd.update({"fc_norm.weight": torch.ones(64), "reg_token": torch.zeros(1, 4, 64)}),
            "unexpected (2): fc_norm.weight, reg_token",
        ),
    ],
)
def test_mismatched_checkpoints_name_the_keys(tmp_path, corrupt, named):
    state_dict = tiny_state_dict()
    corrupt(state_dict)
    path = tmp_path / "bad.safetensors"
    save_file(state_dict, path)
    config = ExaonePathConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(CheckpointMismatchError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_backbone(path, config=config)


def test_missing_block_is_an_error(tmp_path):
    state_dict = {key: value for key, value in tiny_state_dict().items() if not key.startswith("blocks.0.")}
    path = tmp_path / "no_block0.safetensors"
    save_file(state_dict, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing \(12\): blocks\.0\.attn\.proj\.bias"):
        load_backbone(
            path, config=ExaonePathConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
        )


def test_pickles_with_code_are_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": tiny_state_dict(), "hook": subprocess.Popen}, path)
    with pytest.raises(ValueError, match="weights-only"):
        load_backbone(path)


def error_lines(stderr: str) -> list[str]:
    """The command's own error lines; a traceback would add others."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("exaonepath-convert: error:")]


def refuse_to_read(*args, **kwargs):
    raise AssertionError("the checkpoint was read before the command refused")


def test_existing_output_is_refused_before_the_checkpoint_is_read(converted, release_ckpt, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    with mock.patch("exaonepath_hf.convert.load_backbone", refuse_to_read):
        assert convert_main([str(release_ckpt), "--out", str(converted)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert str(converted) in line and "--overwrite" in line
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before


def test_converted_card_claims_nothing_about_other_weights(timm_vit, tmp_path):
    """timm/ImageNet or random weights: no LG licence, no "pretrained on H&E", the source named."""
    weights = tmp_path / "vit_base_imagenet.safetensors"
    save_file({key: value.contiguous() for key, value in timm_vit.state_dict().items()}, weights)
    out = tmp_path / "converted"
    assert convert_main([str(weights), "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert "license" not in front_matter and "library_name: transformers" in front_matter
    assert "LG AI Research" not in card and "H&E" not in card and "285,153,903" not in card
    assert (
        "# EXAONEPath-architecture ViT (converted weights)" in card
        and "`vit_base_imagenet.safetensors`" in card
    )
    assert "not declared to be the released EXAONEPath weights" in card and "768-d, 12 blocks" in card
    assert "AutoModel.from_pretrained" in card, "the loading instructions are kept"


def test_release_claim_needs_the_release_architecture(tmp_path, capsys):
    weights = tmp_path / "tiny.safetensors"
    save_file(tiny_state_dict(), weights)
    out = tmp_path / "claimed"
    assert convert_main([str(weights), "--out", str(out), "--weights_source", "exaonepath-release"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "ViT-B/16" in line and "hidden_size 64 (release 768)" in line
    assert not out.exists()


def test_folder_source_keeps_its_stain_reference(converted, shared_data, tmp_path):
    """Reconverting a folder (e.g. a pretraining export) keeps the stain reference it was trained with."""
    processor = ExaonePathImageProcessor()
    processor.fit_stain_reference(Image.open(shared_data / "he-images" / "tiatoolbox_target_image.png"))
    source = tmp_path / "source"
    shutil.copytree(converted, source)
    processor.save_pretrained(source)
    out = tmp_path / "reconverted"
    assert convert_main([str(source), "--out", str(out)]) == 0
    assert ExaonePathImageProcessor.from_pretrained(out).stain_reference == processor.stain_reference


def test_offline_push_is_refused_in_one_line_before_converting(release_ckpt, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "pushed"
    with mock.patch("exaonepath_hf.convert.load_backbone", refuse_to_read):
        assert (
            convert_main([str(release_ckpt), "--out", str(out), "--push_to_hub", "lab/exaonepath-test"]) == 2
        )
    (line,) = error_lines(capsys.readouterr().err)
    assert "cannot push to lab/exaonepath-test" in line and "HF_HUB_OFFLINE" in line
    assert not out.exists()


def unauthorized() -> Exception:
    from huggingface_hub.errors import HfHubHTTPError

    url = "https://huggingface.co/api/repos/create"
    http = http_client()
    response = http.Response(401, request=http.Request("POST", url))
    return HfHubHTTPError(
        f"401 Client Error: Unauthorized for url: {url}\n(Request ID: x)", response=response
    )


@pytest.mark.parametrize(
    "failure",
    [lambda: http_client().ConnectError("[Errno -2] Name or service not known"), unauthorized],
    ids=["network", "unauthorized"],
)
def test_failed_upload_is_one_line_and_keeps_the_folder(tmp_path, capsys, monkeypatch, failure):
    monkeypatch.setattr("exaonepath_hf.hub.hub_unreachable_reason", lambda: None)  # the hub answers the probe
    weights = tmp_path / "tiny.safetensors"
    save_file(tiny_state_dict(), weights)
    out = tmp_path / "pushed"
    with mock.patch("huggingface_hub.HfApi.create_repo", side_effect=failure()):
        assert convert_main([str(weights), "--out", str(out), "--push_to_hub", "lab/exaonepath-test"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"hf upload lab/exaonepath-test {out}" in line
    assert FOLDER_FILES <= {path.name for path in out.iterdir()}, "the folder is kept for a later upload"


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["exaonepath_hf"] = None  # the package is installed here; make it unimportable
    try:
        import exaonepath_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("exaonepath_hf is still importable")
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, pipeline

    folder, out = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    for loaded in (model, processor):
        assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8))
    with torch.no_grad():
        features = model(**processor(image, return_tensors="pt")).pooler_output
    extractor = pipeline("image-feature-extraction", model=folder, trust_remote_code=True)
    pooled = extractor(image, pool=True, return_tensors=True)
    tokens = extractor(image, return_tensors=True)
    torch.save({"features": features, "pooled": pooled, "tokens": tokens}, out)
    """
)


def test_folder_loads_with_remote_code_and_pipeline_without_the_package(converted, tmp_path):
    outputs_file = tmp_path / "outputs.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(converted), str(outputs_file)],
        check=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    outputs = torch.load(outputs_file, weights_only=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8))
    processor = AutoImageProcessor.from_pretrained(converted)
    assert isinstance(processor, ExaonePathImageProcessor)
    with torch.no_grad():
        expected = AutoModel.from_pretrained(converted).eval()(**processor(image, return_tensors="pt"))
    assert torch.allclose(outputs["features"], expected.pooler_output, atol=1e-5)
    assert torch.allclose(outputs["pooled"], expected.pooler_output, atol=1e-5)
    assert torch.allclose(outputs["tokens"], expected.last_hidden_state, atol=1e-5)
    assert outputs["tokens"].shape == (1, 197, 768)


def test_push_to_hub_uploads_the_whole_folder(converted):
    uploaded = {}

    def fake_upload_folder(self, *, repo_id, folder_path, commit_message):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(path.name for path in Path(folder_path).iterdir())
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    with (
        mock.patch("huggingface_hub.HfApi.create_repo") as create_repo,
        mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload_folder),
    ):
        url = push_folder_to_hub(converted, "lab/exaonepath-test", private=True)
    create_repo.assert_called_once_with("lab/exaonepath-test", repo_type="model", private=True, exist_ok=True)
    assert url.endswith("/commit/abc") and uploaded["repo_id"] == "lab/exaonepath-test"
    assert FOLDER_FILES <= set(uploaded["files"])


def test_auto_config_registration():
    config = AutoConfig.for_model("exaonepath", hidden_size=384, num_attention_heads=6)
    assert isinstance(config, ExaonePathConfig) and config.hidden_size == 384
