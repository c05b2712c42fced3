"""ExaonePathImageProcessor against the release's preprocessing, its input handling, saving and the fit CLI."""

import copy
import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import transformers
from PIL import Image
from test_stain_normalization import bench_stain, non_he_images, read_chw, release_macenko
from torchstain.torch.normalizers import TorchMacenkoNormalizer
from transformers import AutoImageProcessor, BatchFeature
from transformers.image_processing_backends import TorchvisionBackend
from transformers.processing_utils import ImagesKwargs

from exaonepath_hf.fit_stain_cli import main as fit_stain_main
from exaonepath_hf.image_processing_exaonepath import ExaonePathImageProcessor, _on_device
from exaonepath_hf.stain_normalization import (
    DEFAULT_MAX_STAIN_ANGLE,
    DEFAULT_STAIN_REFERENCE,
    MacenkoNormalizer,
    StainReference,
)

RELEASE_AFTER_MACENKO = T.Compose(
    [
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ]
)
# real images of several sizes and aspect ratios (non-square ones exercise the resize and crop rounding)
IMAGES = [
    "crc-val-he-7k-samples/TUM-TCGA-DRHQMTQA.png",
    "crc-val-he-7k-samples/LYM-TCGA-FTVCYFDV.png",
    "he-images/gigapath_prov_normal_000_1.png",
    "he-images/slideflow_norm_tile.jpg",
    "he-images/stardist_histo.jpg",
    "he-images/torchstain_source.png",
    "stain-templates/template2.png",
    "tiles/tcga-red-pen.png",
    "tiles/no-tissue.png",
    "tiles/almost-white-1.png",
    "tcga-tiles/TCGA-3X-AAVA-01Z-00-DX1/0_0_1_506.jpg",
]


def open_rgb(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def release_pixel_values(normalizer: TorchMacenkoNormalizer, image: Image.Image) -> tuple[torch.Tensor, bool]:
    """The release's inference transform: Macenko on ToTensor()*255, then Resize/CenterCrop/Normalize."""
    normalized, ok = release_macenko(normalizer, torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return RELEASE_AFTER_MACENKO(normalized), ok


@pytest.fixture(scope="module")
def pil_images(shared_data):
    return [open_rgb(shared_data / name) for name in IMAGES]


@pytest.fixture(scope="module")
def patch(shared_data):
    return open_rgb(shared_data / IMAGES[0])


def test_defaults_are_the_release_preprocessing():
    processor = ExaonePathImageProcessor()
    assert processor.do_stain_normalize and processor.stain_reference == DEFAULT_STAIN_REFERENCE.to_dict()
    assert (processor.stain_io, processor.stain_alpha, processor.stain_beta) == (240.0, 1.0, 0.15)
    assert processor.size.shortest_edge == 256 and (
        processor.crop_size.height,
        processor.crop_size.width,
    ) == (224, 224)
    assert tuple(processor.image_mean) == (0.485, 0.456, 0.406) and tuple(processor.image_std) == (
        0.229,
        0.224,
        0.225,
    )
    assert processor.resample == 3  # bicubic


def test_matches_release_pipeline(pil_images):
    release = TorchMacenkoNormalizer()
    expected = [release_pixel_values(release, image) for image in pil_images]
    output = ExaonePathImageProcessor(min_tissue_fraction=0)(pil_images, return_tensors="pt")
    assert isinstance(output, BatchFeature)
    assert output["pixel_values"].shape == (len(pil_images), 3, 224, 224)
    assert output["stain_normalized"].tolist() == [ok for _, ok in expected]
    assert not all(output["stain_normalized"].tolist())  # almost-white-1.png falls back, as in the release
    difference = (output["pixel_values"] - torch.stack([values for values, _ in expected])).abs()
    assert (difference <= 1e-2).float().mean() >= 0.999
    one_by_one = ExaonePathImageProcessor(min_tissue_fraction=0)(
        pil_images, return_tensors="pt", disable_grouping=True
    )
    torch.testing.assert_close(one_by_one["pixel_values"], output["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(one_by_one["stain_normalized"], output["stain_normalized"])


def test_without_stain_normalization_is_plain_torchvision(pil_images):
    output = ExaonePathImageProcessor(do_stain_normalize=False)(pil_images[:4], return_tensors="pt")
    expected = torch.stack([RELEASE_AFTER_MACENKO(T.functional.to_tensor(image)) for image in pil_images[:4]])
    torch.testing.assert_close(output["pixel_values"], expected, atol=1e-5, rtol=0)
    assert not output["stain_normalized"].any()


def test_input_formats_agree(patch):
    processor = ExaonePathImageProcessor()
    hwc = np.asarray(patch)
    chw = torch.from_numpy(hwc.copy()).permute(2, 0, 1)
    reference = processor(patch, return_tensors="pt")["pixel_values"]
    for variant in (
        hwc,
        chw,
        chw[None],  # a batch tensor
        [chw],
        chw.float() / 255,  # float in [0, 1]
        hwc.astype(np.float32),  # float in [0, 255]
        chw.double(),
        chw.to(torch.int64),  # integers on the 0..255 scale
    ):
        values = processor(variant, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(values, reference, atol=1e-4, rtol=0)
    batch = processor([patch, hwc, chw], return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 3, 224, 224) and batch["stain_normalized"].all()
    unbatched = processor([patch, hwc, chw])["pixel_values"]
    assert isinstance(unbatched, list) and len(unbatched) == 3


def test_grayscale_is_replicated_to_rgb(patch):
    processor = ExaonePathImageProcessor()
    grey = patch.convert("L")
    replicated = Image.merge("RGB", (grey, grey, grey))
    for variant in (grey, np.asarray(grey), torch.from_numpy(np.asarray(grey).copy())[None]):
        output = processor(variant, return_tensors="pt")
        expected = processor(replicated, return_tensors="pt")
        torch.testing.assert_close(output["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)


def test_alpha_is_composited_over_white(patch):
    processor = ExaonePathImageProcessor()
    rgb = np.asarray(patch).astype(np.float64)
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).round(), (rgb.shape[0], 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), mode="RGBA")
    composited = rgb * (alpha[..., None] / 255) + 255 * (
        1 - alpha[..., None] / 255
    )  # independent: over white
    output = processor(rgba, return_tensors="pt")["pixel_values"]
    expected = processor(composited.astype(np.float32), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(output, expected, atol=1e-4, rtol=0)
    opaque = Image.fromarray(np.dstack([rgb, np.full(alpha.shape, 255)]).astype(np.uint8), mode="RGBA")
    torch.testing.assert_close(
        processor(opaque, return_tensors="pt")["pixel_values"],
        processor(patch, return_tensors="pt")["pixel_values"],
    )


def test_sixteen_bit_images(patch, tmp_path):
    processor = ExaonePathImageProcessor()
    grey8 = np.asarray(patch.convert("L"))
    grey16 = grey8.astype(np.uint16) * 257  # the same picture on the 16-bit scale
    path = tmp_path / "grey16.png"
    Image.fromarray(grey16).save(path)
    with Image.open(path) as loaded:
        assert loaded.mode.startswith("I")
        from_png = processor(loaded, return_tensors="pt")["pixel_values"]
    expected = processor(grey8, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_png, expected, atol=1e-4, rtol=0)
    rgb16 = np.asarray(patch).astype(np.uint16) * 257
    torch.testing.assert_close(
        processor(rgb16, return_tensors="pt")["pixel_values"],
        processor(patch, return_tensors="pt")["pixel_values"],
        atol=1e-4,
        rtol=0,
    )


def test_images_that_cannot_be_normalized(patch):
    processor = ExaonePathImageProcessor()
    white = np.full((300, 300, 3), 255, dtype=np.uint8)
    black = np.zeros((224, 224, 3), dtype=np.uint8)
    colour = np.broadcast_to(np.array([150, 60, 170], dtype=np.uint8), (224, 224, 3)).copy()
    tiny = np.asarray(patch)[:8, :8]
    output = processor([white, patch, black, colour, tiny], return_tensors="pt")
    assert output["stain_normalized"].tolist() == [False, True, False, False, True]
    assert output["pixel_values"].shape == (5, 3, 224, 224) and torch.isfinite(output["pixel_values"]).all()
    unchanged = ExaonePathImageProcessor(do_stain_normalize=False)(
        [white, black, colour], return_tensors="pt"
    )
    torch.testing.assert_close(
        output["pixel_values"][[0, 2, 3]], unchanged["pixel_values"], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.full((3, 16, 16), float("nan")), ValueError, "image 0: .*NaN"),
        (
            [np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), np.inf, np.float32)],
            ValueError,
            "image 1: .*NaN",
        ),
        (np.zeros((16, 16, 5), dtype=np.uint8), ValueError, "channel"),
        (torch.zeros((6, 16, 16), dtype=torch.uint8), ValueError, "channel"),
        ([], ValueError, "no images"),
        (np.full((16, 16, 3), -3.0, dtype=np.float32), ValueError, r"\[0, 1\] or \[0, 255\]"),
        (np.zeros((16, 16, 3), dtype=bool), TypeError, "boolean"),
        (np.zeros((2, 2, 16, 16, 3), dtype=np.uint8), ValueError, "dimensions"),
    ],
)
def test_clear_errors(images, error, match):
    with pytest.raises(error, match=match):
        ExaonePathImageProcessor()(images, return_tensors="pt")


def test_device_argument(patch):
    output = ExaonePathImageProcessor()(patch, return_tensors="pt", device="cpu")
    assert output["pixel_values"].device.type == "cpu"
    if torch.cuda.is_available():
        on_gpu = ExaonePathImageProcessor()(patch, return_tensors="pt", device="cuda")
        assert on_gpu["pixel_values"].is_cuda
        torch.testing.assert_close(on_gpu["pixel_values"].cpu(), output["pixel_values"], atol=1e-3, rtol=0)


def test_images_go_to_the_device_in_their_order_one_copy_per_size():
    """CPU images bound for another device travel per (shape, dtype) as one stacked copy and come back in the
    caller's order; the meta device stands in for a GPU (the CUDA test below checks the values)."""
    images = [torch.full((3, 8, 8), i, dtype=torch.uint8) for i in range(3)]
    images.insert(1, torch.full((3, 4, 6), 7.0))
    moved = _on_device(images, torch.device("meta"))
    assert [(m.device.type, tuple(m.shape), m.dtype) for m in moved] == [
        ("meta", tuple(i.shape), i.dtype) for i in images
    ]
    assert _on_device(images, torch.device("cpu"))[2] is images[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_list_of_cpu_images_equals_one_batch_on_the_gpu(pil_images):
    tensors = [
        torch.from_numpy(np.asarray(image.resize((256, 256)))).permute(2, 0, 1) for image in pil_images
    ]
    processor = ExaonePathImageProcessor()
    from_list = processor(tensors, return_tensors="pt", device="cuda")
    from_batch = processor(torch.stack(tensors).cuda(), return_tensors="pt")
    on_cpu = processor(tensors, return_tensors="pt")
    torch.testing.assert_close(from_list["pixel_values"], from_batch["pixel_values"], atol=1e-5, rtol=0)
    torch.testing.assert_close(from_list["pixel_values"].cpu(), on_cpu["pixel_values"], atol=1e-3, rtol=0)
    assert torch.equal(from_list["stain_normalized"].cpu(), on_cpu["stain_normalized"])


def test_fit_save_and_load_keep_the_reference(shared_data, patch, tmp_path):
    target = open_rgb(shared_data / "he-images" / "tiatoolbox_target_image.png")
    processor = ExaonePathImageProcessor()
    reference = processor.fit_stain_reference(target)
    assert reference == MacenkoNormalizer().fit(
        read_chw(shared_data / "he-images" / "tiatoolbox_target_image.png")
    )
    assert reference != DEFAULT_STAIN_REFERENCE
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["stain_reference"] == reference.to_dict()
    assert config["auto_map"] == {
        "AutoImageProcessor": "image_processing_exaonepath.ExaonePathImageProcessor"
    }
    assert {"image_processing_exaonepath.py", "stain_normalization.py", "stain_engine.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = ExaonePathImageProcessor.from_pretrained(tmp_path)
    assert StainReference.from_dict(loaded.stain_reference) == reference
    torch.testing.assert_close(
        loaded(patch, return_tensors="pt")["pixel_values"],
        processor(patch, return_tensors="pt")["pixel_values"],
    )
    differs = ExaonePathImageProcessor()(patch, return_tensors="pt")["pixel_values"]
    assert not torch.allclose(differs, processor(patch, return_tensors="pt")["pixel_values"], atol=1e-2)


def test_trust_remote_code_load_in_a_fresh_python_without_the_package(patch, tmp_path):
    processor = ExaonePathImageProcessor(min_tissue_fraction=0.05, max_stain_angle=None)
    processor.save_pretrained(tmp_path / "processor")
    Image.fromarray(np.asarray(patch)).save(tmp_path / "patch.png")
    expected = processor(patch, return_tensors="pt")["pixel_values"]
    script = textwrap.dedent(
        """
        import sys
        sys.modules["exaonepath_hf"] = None  # an editable install must not help
        try:
            import exaonepath_hf
        except ImportError:
            pass
        else:
            raise SystemExit("exaonepath_hf is importable")
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained("processor", trust_remote_code=True)
        assert type(processor).__name__ == "ExaonePathImageProcessor", type(processor)
        assert processor.min_tissue_fraction == 0.05 and processor.max_stain_angle is None
        output = processor(Image.open("patch.png"), return_tensors="pt")
        torch.save({"pixel_values": output["pixel_values"], "flags": output["stain_normalized"]}, "out.pt")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(remote["pixel_values"], expected)
    assert remote["flags"].tolist() == [True]


def test_auto_image_processor_with_remote_code_in_process(tmp_path):
    ExaonePathImageProcessor().save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "ExaonePathImageProcessor"


def test_fit_stain_cli(shared_data, tmp_path, capsys):
    target = shared_data / "stain-templates" / "template4.png"
    assert fit_stain_main([str(target), "--out", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = MacenkoNormalizer().fit(read_chw(target))
    assert StainReference.from_dict(printed) == expected
    loaded = ExaonePathImageProcessor.from_pretrained(tmp_path / "out")
    assert StainReference.from_dict(loaded.stain_reference) == expected
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]
    # start from a saved processor and override a parameter
    assert (
        fit_stain_main(
            [
                str(target),
                "--out",
                str(tmp_path / "beta"),
                "--processor",
                str(tmp_path / "out"),
                "--beta",
                "0.2",
            ]
        )
        == 0
    )
    assert ExaonePathImageProcessor.from_pretrained(tmp_path / "beta").stain_beta == 0.2
    capsys.readouterr()
    assert fit_stain_main([str(tmp_path / "missing.png"), "--out", str(tmp_path / "x")]) == 2
    assert "exaonepath-fit-stain: error: cannot read target image" in capsys.readouterr().err
    white = tmp_path / "white.png"
    Image.fromarray(np.full((64, 64, 3), 255, dtype=np.uint8)).save(white)
    assert fit_stain_main([str(white), "--out", str(tmp_path / "y")]) == 2
    assert "too few tissue pixels" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# The private hooks of transformers' image-processing base that ExaonePathImageProcessor relies on, with the
# parameters it uses. `preprocess` calls `_preprocess_image_like_inputs(images, *args, **kwargs)` with every
# standardized kwarg; the processor overrides it and `_preprocess`. Pin `transformers` accordingly.
PRIVATE_HOOKS = {
    "_preprocess_image_like_inputs": ("images",),
    "_preprocess": ("images",),
}
# the standard kwargs that ExaonePathImageProcessor._preprocess takes by name
STANDARD_KWARGS = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "disable_grouping", "return_tensors", "device",
    "do_convert_rgb", "input_data_format",
)  # fmt: skip


def test_private_transformers_hooks_the_processor_relies_on(patch, monkeypatch):
    version = transformers.__version__
    for name, parameters in PRIVATE_HOOKS.items():
        assert hasattr(TorchvisionBackend, name), (
            f"transformers {version}: TorchvisionBackend has no {name}, which ExaonePathImageProcessor overrides "
            "and relies on being called; pin a transformers version that has it"
        )
        signature = inspect.signature(getattr(TorchvisionBackend, name))
        missing = [parameter for parameter in parameters if parameter not in signature.parameters]
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        assert not missing and takes_kwargs, (
            f"transformers {version}: {name}{signature} lacks {missing or '**kwargs'}, which "
            "ExaonePathImageProcessor relies on"
        )
    missing = [name for name in STANDARD_KWARGS if name not in ImagesKwargs.__annotations__]
    assert not missing, (
        f"transformers {version}: ImagesKwargs has no {missing}, which _preprocess takes by name"
    )
    # and `preprocess` really goes through the hook, with the standardized kwargs
    calls = []
    hook = ExaonePathImageProcessor._preprocess_image_like_inputs

    def recording(self, images, *args, **kwargs):
        calls.append(kwargs)
        return hook(self, images, *args, **kwargs)

    monkeypatch.setattr(ExaonePathImageProcessor, "_preprocess_image_like_inputs", recording)
    output = ExaonePathImageProcessor()(patch, return_tensors="pt")
    assert len(calls) == 1, (
        f"transformers {version}: preprocess() no longer calls _preprocess_image_like_inputs"
    )
    assert set(STANDARD_KWARGS) <= set(calls[0]) and calls[0]["crop_size"].height == 224
    assert output["pixel_values"].shape == (1, 3, 224, 224)


def test_processor_keeps_its_normalizer_between_calls_but_not_in_its_config(patch, tmp_path):
    processor = ExaonePathImageProcessor()
    first = processor(patch, return_tensors="pt")["pixel_values"]
    normalizer = processor._normalizer_for()
    assert normalizer.cached_bytes() > 0
    torch.testing.assert_close(processor(patch, return_tensors="pt")["pixel_values"], first, atol=0, rtol=0)
    assert processor._normalizer_for() is normalizer
    processor(patch, return_tensors="pt", stain_beta=0.2)  # other settings: another normalizer
    assert processor._normalizer_for() is not normalizer
    assert processor.stain_normalizer() is not processor._normalizer_for()  # the public one is always new
    assert "_kept_normalizer" not in processor.to_dict()
    copied = copy.deepcopy(processor)
    torch.testing.assert_close(copied(patch, return_tensors="pt")["pixel_values"], first, atol=0, rtol=0)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert "_kept_normalizer" not in config and "stain_beta" in config
    loaded = ExaonePathImageProcessor.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(patch, return_tensors="pt")["pixel_values"], first, atol=0, rtol=0)


def test_mixed_sizes_in_one_call_equal_each_image_alone(shared_data):
    """Mixed-size inputs (groups whose chunks share the workers) give the pixel values of one call per image."""
    tiles = bench_stain.mixed_size_tiles(shared_data, count=12)
    images = [Image.fromarray(tile.permute(1, 2, 0).numpy()) for tile in tiles]
    processor = ExaonePathImageProcessor()
    together = processor(images, return_tensors="pt")
    for index, image in enumerate(images):
        alone = processor(image, return_tensors="pt")
        assert torch.equal(together["pixel_values"][index], alone["pixel_values"][0]), index
        assert together["stain_normalized"][index] == alone["stain_normalized"][0]


def test_non_he_images_are_reported_and_left_unnormalized(patch):
    images = [image.permute(1, 2, 0).numpy() for image in non_he_images()]
    output = ExaonePathImageProcessor()([*images, patch], return_tensors="pt")
    assert output["stain_normalized"].tolist() == [False] * len(images) + [True]
    unchanged = ExaonePathImageProcessor(do_stain_normalize=False)(images, return_tensors="pt")
    torch.testing.assert_close(output["pixel_values"][:-1], unchanged["pixel_values"], atol=1e-5, rtol=0)
    # switched off: today's behaviour, every image recoloured like H&E; the H&E patch is the same either way
    today = ExaonePathImageProcessor(max_stain_angle=None)([*images, patch], return_tensors="pt")
    assert today["stain_normalized"].all()
    assert torch.equal(today["pixel_values"][-1], output["pixel_values"][-1])
    # per call: a number overrides the processor's setting, None keeps it
    processor = ExaonePathImageProcessor()
    assert processor(images, return_tensors="pt", max_stain_angle=90)["stain_normalized"].all()
    assert not processor(images, return_tensors="pt", max_stain_angle=None)["stain_normalized"].any()


def test_max_stain_angle_is_saved_reloaded_and_defaults_on_for_old_configs(tmp_path):
    assert ExaonePathImageProcessor().max_stain_angle == DEFAULT_MAX_STAIN_ANGLE
    config_file = tmp_path / "preprocessor_config.json"
    for value in (None, 7.5, DEFAULT_MAX_STAIN_ANGLE):
        ExaonePathImageProcessor(max_stain_angle=value).save_pretrained(tmp_path)
        assert json.loads(config_file.read_text())["max_stain_angle"] == value
        loaded = ExaonePathImageProcessor.from_pretrained(tmp_path)
        assert loaded.max_stain_angle == value and loaded.stain_normalizer().max_stain_angle == value
    # switched off when loading, as a user keeps the release's behaviour for a saved model
    assert AutoImageProcessor.from_pretrained(tmp_path, max_stain_angle=None).max_stain_angle is None
    # a config saved before the setting existed gets the check
    config = json.loads(config_file.read_text())
    del config["max_stain_angle"]
    config_file.write_text(json.dumps(config))
    assert ExaonePathImageProcessor.from_pretrained(tmp_path).max_stain_angle == DEFAULT_MAX_STAIN_ANGLE
    with pytest.raises(ValueError, match="max_stain_angle must be an angle"):
        ExaonePathImageProcessor(max_stain_angle=False)
