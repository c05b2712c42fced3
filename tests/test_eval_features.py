"""Feature extraction and its cache: same numbers as a direct forward pass, no forward pass on a rerun,
resume from finished chunks, bad files counted, keys that change with everything that changes features."""

import dataclasses

import datasets
import pytest
import torch
from PIL import Image

from exaonepath_hf import ExaonePathModel
from exaonepath_hf.eval.common.encoders import Preprocessing, load_encoder
from exaonepath_hf.eval.common.extraction import ForwardSettings
from exaonepath_hf.eval.common.features import cache_dir_for, cache_key, extract_features, load_cached
from exaonepath_hf.stain_normalization import StainReference


@pytest.fixture(scope="module")
def tiles(shared_data):
    paths = sorted((shared_data / "crc-val-he-7k-samples").glob("*.png"))[:10]
    return datasets.Dataset.from_dict(
        {
            "image": [str(p) for p in paths],
            "label": [i % 2 for i in range(len(paths))],
            "slide_id": [p.stem for p in paths],
            "patient_id": [""] * len(paths),
        }
    ).cast_column("image", datasets.Image(decode=False))


class ForwardCounter:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1


def _key(encoder, preprocessing, fingerprint="fp", split="test"):
    return cache_key(encoder, "local/crc", "rev1", fingerprint, split, preprocessing, "fp32")


def test_features_equal_a_direct_forward_pass_and_are_cached(tiny_model_dir, tiles, tmp_path):
    encoder = load_encoder(tiny_model_dir)
    preprocessing = encoder.default_preprocessing(stain_normalize=True)
    counter = ForwardCounter(encoder.model)
    key = _key(encoder, preprocessing)
    first = extract_features(
        encoder,
        tiles,
        preprocessing,
        key,
        tmp_path,
        forward=ForwardSettings(batch_size=4, num_workers=0, progress=False),
        chunk_size=4,
    )
    assert counter.calls == 3 and first.stats["forward_batches"] == 3 and not first.stats["cache_hit"]

    # independent path: the processor on PIL images, the model's pooler_output
    processor = preprocessing.processor()
    images = [Image.open(p["path"]).convert("RGB") for p in tiles["image"]]
    inputs = processor(images, return_tensors="pt")
    with torch.no_grad():
        expected = (
            ExaonePathModel.from_pretrained(tiny_model_dir)
            .eval()(pixel_values=inputs["pixel_values"])
            .pooler_output
        )
    torch.testing.assert_close(first.features, expected, rtol=1e-4, atol=1e-5)
    assert first.labels.tolist() == tiles["label"] and first.slide_ids == tiles["slide_id"]
    assert torch.equal(first.stain_normalized, inputs["stain_normalized"].bool())

    second = extract_features(
        encoder,
        tiles,
        preprocessing,
        key,
        tmp_path,
        forward=ForwardSettings(batch_size=4, num_workers=0, progress=False),
    )
    assert counter.calls == 3, "a rerun must not run the model"
    assert second.stats["cache_hit"] and second.stats["forward_batches"] == 0
    assert torch.equal(second.features, first.features)


def test_resume_recomputes_only_missing_chunks(tiny_model_dir, tiles, tmp_path):
    encoder = load_encoder(tiny_model_dir)
    preprocessing = encoder.default_preprocessing(stain_normalize=False)
    key = _key(encoder, preprocessing)
    full = extract_features(
        encoder,
        tiles,
        preprocessing,
        key,
        tmp_path,
        forward=ForwardSettings(batch_size=2, num_workers=0, progress=False),
        chunk_size=4,
    )
    entry = cache_dir_for(tmp_path, key)
    # an interrupted run: chunk 1 never finished and the merge never happened
    (entry / "meta.json").unlink()
    (entry / "features.safetensors").unlink()
    (entry / "chunks" / "chunk_000001.safetensors").unlink()
    assert load_cached(entry) is None
    counter = ForwardCounter(encoder.model)
    resumed = extract_features(
        encoder,
        tiles,
        preprocessing,
        key,
        tmp_path,
        forward=ForwardSettings(batch_size=2, num_workers=0, progress=False),
        chunk_size=4,
    )
    assert resumed.stats["images_extracted"] == 4 and counter.calls == 2
    torch.testing.assert_close(resumed.features, full.features)


def test_unreadable_image_is_counted_not_fatal(tiny_model_dir, tiles, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = tiles.cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"] = rows["image"][:3] + [{"bytes": None, "path": str(broken)}]
    for column in ("label", "slide_id", "patient_id"):
        rows[column] = rows[column][:4]
    dataset = datasets.Dataset.from_dict(rows, features=tiles.features)
    encoder = load_encoder(tiny_model_dir)
    preprocessing = encoder.default_preprocessing(stain_normalize=False)
    result = extract_features(
        encoder,
        dataset,
        preprocessing,
        _key(encoder, preprocessing, "broken"),
        tmp_path / "c",
        forward=ForwardSettings(num_workers=0, progress=False),
    )
    assert len(result) == 3 and result.indices.tolist() == [0, 1, 2]
    assert (
        len(result.failed) == 1
        and result.failed[0]["index"] == 3
        and "broken.png" in result.failed[0]["error"]
    )


def test_cache_key_changes_with_everything_that_changes_features(tiny_model_dir, tmp_path):
    encoder = load_encoder(tiny_model_dir)
    base = encoder.default_preprocessing(stain_normalize=True)
    other_reference = StainReference(((0.6, 0.2), (0.7, 0.8), (0.4, 0.55)), (1.9, 1.0))
    variants = [
        _key(encoder, base),
        _key(encoder, dataclasses.replace(base, stain_normalize=False)),
        _key(encoder, dataclasses.replace(base, stain_reference=other_reference)),
        _key(encoder, dataclasses.replace(base, crop_size=192)),
        _key(encoder, dataclasses.replace(base, resize_shortest_edge=224)),
        _key(encoder, base, fingerprint="other-data"),
        _key(encoder, base, split="train"),
        _key(dataclasses.replace(encoder, revision="sha256:other"), base),
        _key(dataclasses.replace(encoder, pooling="mean"), base),
    ]
    directories = {cache_dir_for(tmp_path, key) for key in variants}
    assert len(directories) == len(variants)
    assert base.to_dict()["stain_reference"]["max_concentrations"] == [1.9705, 1.0308]
    assert Preprocessing(stain_normalize=False).to_dict()["stain_reference"] is None


def test_any_automodel_encoder_uses_the_cls_token(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    vit = ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    )
    vit.save_pretrained(tmp_path / "vit")
    encoder = load_encoder(tmp_path / "vit")
    assert encoder.kind == "transformers" and encoder.pooling == "cls" and encoder.feature_dim == 32
    assert encoder.revision.startswith("sha256:")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = (
            ViTModel.from_pretrained(tmp_path / "vit").eval()(pixel_values=pixels).last_hidden_state[:, 0]
        )
    torch.testing.assert_close(encoder.features(pixels), expected)


def test_timm_state_dict_loads_as_exaonepath(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    reference = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        embed_dim=128,
        depth=2,
        num_heads=2,  # 64-d heads, as the file loader assumes
    ).eval()
    save_file(reference.state_dict(), tmp_path / "vit.safetensors")
    encoder = load_encoder(tmp_path / "vit.safetensors")
    assert encoder.kind == "exaonepath" and encoder.feature_dim == 128
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(encoder.features(pixels), reference(pixels), rtol=1e-4, atol=1e-4)


_DISTRIBUTED_SCRIPT = """
import sys
import datasets, torch
from exaonepath_hf.eval.common.extraction import ForwardSettings
from exaonepath_hf.eval.common.features import cache_key, distributed_state, extract_features
from exaonepath_hf.eval.common.encoders import load_encoder

model_dir, cache, out, *paths = sys.argv[1:]
state = distributed_state()
dataset = datasets.Dataset.from_dict(
    {"image": paths, "label": [0] * len(paths), "slide_id": paths, "patient_id": [""] * len(paths)}
).cast_column("image", datasets.Image(decode=False))
encoder = load_encoder(model_dir)
preprocessing = encoder.default_preprocessing(stain_normalize=False)
key = cache_key(encoder, "local/crc", "rev1", "distributed", "test", preprocessing, "fp32")
result = extract_features(encoder, dataset, preprocessing, key, cache, forward=ForwardSettings(num_workers=0, progress=False), chunk_size=3, state=state)
torch.save({"rank": state.process_index, "extracted": result.stats["images_extracted"]}, f"{out}.{state.process_index}")
if state.is_main_process:
    torch.save(result.features, out)
state.destroy_process_group()
"""


def test_extraction_is_shared_across_processes(tiny_model_dir, tiles, tmp_path):
    """Under `accelerate launch` with 2 processes, each extracts every other chunk and the merge is complete."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "extract.py"
    script.write_text(_DISTRIBUTED_SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    paths = [p["path"] for p in tiles["image"]]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
        "127.0.0.1", "--main_process_port", str(port), str(script), str(tiny_model_dir), str(tmp_path / "cache"),
        str(tmp_path / "features.pt"), *paths,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    shares = sorted(torch.load(tmp_path / f"features.pt.{rank}")["extracted"] for rank in (0, 1))
    assert shares == [4, 6]  # 10 rows in chunks of 3: rank 0 takes chunks 0 and 2, rank 1 chunks 1 and 3

    encoder = load_encoder(tiny_model_dir)
    preprocessing = encoder.default_preprocessing(stain_normalize=False)
    single = extract_features(
        encoder,
        tiles,
        preprocessing,
        _key(encoder, preprocessing, "single"),
        tmp_path / "single",
        forward=ForwardSettings(num_workers=0, progress=False),
    )
    torch.testing.assert_close(torch.load(tmp_path / "features.pt"), single.features, rtol=1e-4, atol=1e-5)


def test_timm_hub_encoder_uses_timms_pooled_features(monkeypatch):
    """`hf-hub:` / `timm:` sources go through timm (weights faked offline: pretrained=False, same architecture)."""
    timm = pytest.importorskip("timm")
    created = {}
    original = timm.create_model

    def offline_create_model(name, pretrained=False, **kwargs):
        created["name"], created["pretrained"] = name, pretrained
        torch.manual_seed(0)
        return original("vit_tiny_patch16_224", pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    encoder = load_encoder("hf-hub:org/some-pathology-vit")
    assert created == {"name": "hf-hub:org/some-pathology-vit", "pretrained": True}
    assert (
        encoder.kind == "timm"
        and encoder.feature_dim == 192
        and encoder.source == "hf-hub:org/some-pathology-vit"
    )
    pixels = torch.randn(2, 3, 224, 224)
    reference = encoder.model  # timm's own forward with num_classes=0 returns the pooled pre-logits feature
    with torch.no_grad():
        torch.testing.assert_close(encoder.features(pixels), reference(pixels))
    assert load_encoder("timm:vit_tiny_patch16_224").source == "timm:vit_tiny_patch16_224"


def test_the_model_folders_non_he_check_is_the_one_extraction_uses(tiny_model_dir, tmp_path):
    """A folder whose processor switches the non-H&E check off is extracted that way: noise, which the
    default check passes through, is stain-normalized by that folder's preprocessing."""
    import shutil

    from exaonepath_hf import ExaonePathImageProcessor

    default = load_encoder(tiny_model_dir).default_preprocessing()
    assert default.max_stain_angle == ExaonePathImageProcessor().max_stain_angle is not None
    folder = tmp_path / "check-off"
    shutil.copytree(tiny_model_dir, folder)
    ExaonePathImageProcessor(max_stain_angle=None).save_pretrained(folder)
    preprocessing = load_encoder(folder).default_preprocessing()
    assert preprocessing.max_stain_angle is None and preprocessing.processor().max_stain_angle is None
    assert _key(load_encoder(folder), preprocessing) != _key(load_encoder(tiny_model_dir), default)
    noise = torch.randint(
        0, 256, (1, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    assert not default.processor()(noise, return_tensors="pt")["stain_normalized"].any()  # grey: not H&E
    assert preprocessing.processor()(noise, return_tensors="pt")["stain_normalized"].all()
