"""`data.augment_on: gpu`: the batched multi-crop against the CPU transforms it replaces (on CPU tensors).

Not pixel equality (the CPU path rounds to uint8 after every operation and draws its randomness per image):
each batched operation equals its torchvision counterpart for given parameters, the random parameters follow
the CPU transforms' distributions, and whole crops have the CPU path's statistics.
"""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from exaonepath_hf.image_processing_exaonepath import ExaonePathImageProcessor
from exaonepath_hf.train.dino.augmentations import AugmentationConfig, DINOMultiCrop
from exaonepath_hf.train.dino.data import decode_image
from exaonepath_hf.train.dino.gpu_augment import (
    BatchedMultiCrop,
    CropParams,
    DecodedImages,
    adjust_hue,
    build_augmentation,
    color_jitter,
    gaussian_blur,
    grayscale,
    resized_crops,
)

SMALL = AugmentationConfig(global_crop_size=48, local_crop_size=24, num_local_crops=2)
MEAN = torch.tensor(ExaonePathImageProcessor.image_mean).view(3, 1, 1)
STD = torch.tensor(ExaonePathImageProcessor.image_std).view(3, 1, 1)


def _binomial_close(successes: int, trials: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(successes - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p)) + 1e-9


@pytest.fixture(scope="module")
def he_patch(shared_data) -> torch.Tensor:
    """A real 224² H&E patch (uint8 3×H×W)."""
    path = sorted((shared_data / "crc-val-he-7k-samples").glob("TUM-*.png"))[0]
    return decode_image({"path": str(path), "bytes": None})


# ------------------------------------------------------------------------------ each operation, exactly


def test_resized_crops_equal_cropping_then_antialiased_bicubic_resize():
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    # view-major: view 0 of images 0 and 1, then view 1; up- and down-scaling, a flip, the whole image
    params = CropParams(
        top=torch.tensor([3, 0, 10, 0]), left=torch.tensor([5, 7, 0, 0]), height=torch.tensor([40, 64, 20, 64]),
        width=torch.tensor([50, 30, 80, 80]), flip=torch.tensor([False, True, False, True]),
    )  # fmt: skip
    crops = resized_crops(images, params, 24)
    assert crops.shape == (2, 2, 3, 24, 24)
    for index in range(4):
        view, image = divmod(index, 2)
        top, left, height, width = (
            int(v[index]) for v in (params.top, params.left, params.height, params.width)
        )
        box = images[image : image + 1, :, top : top + height, left : left + width]
        expected = F.interpolate(box, size=(24, 24), mode="bicubic", antialias=True, align_corners=False)
        expected = expected.clamp(0, 1).flip(-1) if params.flip[index] else expected.clamp(0, 1)
        torch.testing.assert_close(crops[view, image], expected[0], rtol=0, atol=2e-6)


def test_colour_operations_equal_torchvision_on_float_images():
    images = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    factors = torch.tensor(
        [[1.3, 0.7, 1.1, 0.05], [0.6, 1.4, 0.8, -0.1], [1.0, 0.9, 1.2, 0.02], [1.2, 1.1, 0.9, -0.07]]
    )
    operations = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    jittered = color_jitter(images, order, factors)
    for index in range(4):
        expected = images[index]
        for operation in order[index].tolist():
            expected = operations[operation](expected, float(factors[index, operation]))
        torch.testing.assert_close(jittered[index], expected, rtol=0, atol=5e-6)
    # the identity factors of a crop without jitter leave it as it was
    identity = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(4, 4)
    assert torch.equal(color_jitter(images, order, identity), images)

    for shift in (-0.5, -0.1, 0.03, 0.3):
        torch.testing.assert_close(
            adjust_hue(images, torch.full((4,), shift)), TF.adjust_hue(images, shift), rtol=0, atol=5e-6
        )
    torch.testing.assert_close(grayscale(images), TF.rgb_to_grayscale(images), rtol=0, atol=1e-6)

    sigma = torch.tensor([0.1, 0.7, 2.0, 0.0])
    blurred = gaussian_blur(images, sigma, 13)
    for index in range(3):
        expected = TF.gaussian_blur(images[index], [13, 13], [float(sigma[index])] * 2)
        torch.testing.assert_close(blurred[index], expected, rtol=0, atol=2e-6)
    assert torch.equal(blurred[3], images[3])  # sigma 0: not blurred


# ------------------------------------------------------------------------------ parameter distributions


@pytest.mark.parametrize("height, width", [(224, 224), (96, 300), (20, 400)])
def test_crop_boxes_follow_torchvisions_random_resized_crop(height, width):
    """Area fraction, aspect ratio and box centre of the crops: two-sample KS tests against torchvision's own
    draws (the 20×400 image exercises the centre-crop fallback)."""
    count, scale = 3000, (0.05, 0.4)
    batched = BatchedMultiCrop(AugmentationConfig())
    ours = batched.sample_crops(
        count, height, width, scale, torch.Generator().manual_seed(2), torch.device("cpu")
    )
    cpu = v2.RandomResizedCrop(32, scale=scale)
    torch.manual_seed(3)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    theirs = [cpu.make_params([image]) for _ in range(count)]

    def features(top, left, box_h, box_w):
        top, left, box_h, box_w = (np.asarray(v, dtype=float) for v in (top, left, box_h, box_w))
        return {
            "area": box_h * box_w / (height * width),
            "aspect": np.log(box_w / box_h),
            "centre_y": (top + box_h / 2) / height,
            "centre_x": (left + box_w / 2) / width,
        }

    a = features(ours.top, ours.left, ours.height, ours.width)
    b = features(*zip(*[(p["top"], p["left"], p["height"], p["width"]) for p in theirs], strict=True))
    for name in a:
        if np.ptp(a[name]) == 0 and np.ptp(b[name]) == 0:  # the fallback: one box, the same for both
            assert a[name][0] == pytest.approx(b[name][0]), name
            continue
        assert stats.ks_2samp(a[name], b[name]).pvalue > 1e-4, name
    assert ((ours.top >= 0) & (ours.top + ours.height <= height)).all()
    assert ((ours.left >= 0) & (ours.left + ours.width <= width)).all()
    assert _binomial_close(int(ours.flip.sum()), count, 0.5)


def test_photometric_parameters_follow_the_configuration():
    config = AugmentationConfig()
    samples = 4000
    params = BatchedMultiCrop(config).sample_photometric(
        samples, (1.0, 0.1), (0.0, 0.2), torch.Generator().manual_seed(4), torch.device("cpu")
    )
    count = 2 * samples
    jittered = (params.jitter_factors != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(dim=1)
    assert _binomial_close(int(jittered.sum()), count, config.color_jitter_p)
    assert _binomial_close(int(params.grayscale.sum()), count, config.grayscale_p)
    blurred, solarized = (params.blur_sigma > 0).view(2, samples), params.solarize.view(2, samples)
    assert blurred[0].all() and _binomial_close(int(blurred[1].sum()), samples, 0.1)
    assert not solarized[0].any() and _binomial_close(int(solarized[1].sum()), samples, config.solarize_p)
    sigma = params.blur_sigma[params.blur_sigma > 0]
    assert stats.kstest(sigma.numpy(), stats.uniform(0.1, 1.9).cdf).pvalue > 1e-4
    # factors uniform in ColorJitter's ranges; every operation equally likely at every place of the order
    for column, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        values = params.jitter_factors[jittered, column].numpy()
        assert stats.kstest(values, stats.uniform(low, high - low).cdf).pvalue > 1e-4, column
    assert all(sorted(row) == [0, 1, 2, 3] for row in params.jitter_order.tolist())
    places = torch.stack([(params.jitter_order == operation).float().mean(0) for operation in range(4)])
    torch.testing.assert_close(places, torch.full((4, 4), 0.25), rtol=0, atol=0.03)


# ------------------------------------------------------------------------------ whole crops


def _crop_statistics(views: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Per crop, on the 0..1 scale, for the first global, second global and local views: per channel its mean,
    spread and left-to-right slope (flips and crop scales show there on a gradient), whether it is gray, and the
    mean absolute difference of horizontal neighbours (lowered by blur)."""
    result = {}
    for name, crops in (("global_1", views[0]), ("global_2", views[1]), ("local", torch.cat(views[2:]))):
        unit = crops * STD + MEAN
        slope = unit[..., -4:].mean(dim=(2, 3)) - unit[..., :4].mean(dim=(2, 3))
        for channel in range(3):
            result[f"{name}_mean_{channel}"] = unit[:, channel].mean(dim=(1, 2)).numpy()
            result[f"{name}_std_{channel}"] = unit[:, channel].std(dim=(1, 2)).numpy()
            result[f"{name}_slope_{channel}"] = slope[:, channel].numpy()
        result[f"{name}_gray"] = (
            (unit - unit.mean(1, keepdim=True)).abs().amax(dim=(1, 2, 3)) < 2e-3
        ).numpy()
        result[f"{name}_edges"] = (unit[..., 1:] - unit[..., :-1]).abs().mean(dim=(1, 2, 3)).numpy()
    return result


def _gradient_image(height: int = 160, width: int = 200) -> torch.Tensor:
    """Colour ramps across and down the image, with some texture: direction and extent of a crop show."""
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    noise = 0.05 * torch.randn(3, height, width, generator=torch.Generator().manual_seed(0))
    image = torch.stack([0.15 + 0.7 * x, 0.2 + 0.6 * y, 0.5 + 0.3 * (x - y)]) + noise
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("image_name", ["he_patch", "gradient"])
def test_crops_have_the_cpu_transforms_statistics(image_name, request):
    """Two-sample KS tests of every per-crop statistic (binomial tests of the gray rates), 400 crops per view
    and path. On these two images they tell apart, e.g., blur probabilities swapped between the global views,
    solarize 0.5, grayscale 0.3, colour jitter 0.5, flip 0.2, local scales (0.1, 0.4) or brightness 0.6."""
    image = request.getfixturevalue("he_patch") if image_name == "he_patch" else _gradient_image()
    samples = 400
    cpu_transform = DINOMultiCrop(SMALL)
    cpu_views = []
    for seed in range(samples):
        torch.manual_seed(seed)
        cpu_views.append(cpu_transform(image))
    cpu = _crop_statistics([torch.stack(view) for view in zip(*cpu_views, strict=True)])
    batch = (image.float() / 255).expand(samples, -1, -1, -1).contiguous()
    gpu_views = BatchedMultiCrop(SMALL)(batch, torch.Generator().manual_seed(5))
    assert [tuple(view.shape) for view in gpu_views] == [(samples, 3, 48, 48)] * 2 + [
        (samples, 3, 24, 24)
    ] * 2
    assert all(view.dtype == torch.float32 for view in gpu_views)
    low, high = ((0 - MEAN) / STD).min(), ((1 - MEAN) / STD).max()
    assert all(view.min() >= low - 1e-5 and view.max() <= high + 1e-5 for view in gpu_views)
    for name, ours in _crop_statistics(gpu_views).items():
        theirs = cpu[name]
        if ours.dtype == bool:
            assert _binomial_close(int(ours.sum()), len(ours), max(theirs.mean(), 1 / len(theirs))), name
        else:
            assert stats.ks_2samp(ours, theirs).pvalue > 1e-4, name


# ------------------------------------------------------------------------------ the on-device stage of training


def _png(width: int, height: int, colour=(180, 90, 160)) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(width).integers(-30, 30, (height, width, 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_on_device_stage_is_seeded_by_the_batch_and_leaves_the_training_rng_alone(he_patch):
    from exaonepath_hf.stain_normalization import MacenkoNormalizer

    augmentation = build_augmentation(SMALL, "gpu", MacenkoNormalizer(), "cpu")
    assert isinstance(augmentation.worker_transform, DecodedImages) and augmentation.worker_normalizer is None
    assert augmentation.num_crops == 4
    background = torch.full_like(he_patch, 235)  # no tissue: Macenko falls back
    batch = {"crops": [torch.stack([he_patch, background, he_patch])], "seed": 11}
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    crops, fallbacks = augmentation.to_device(batch)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert int(fallbacks) == 1
    again, _ = augmentation.to_device(batch)
    assert all(torch.equal(a, b) for a, b in zip(crops, again, strict=True))
    other, _ = augmentation.to_device({**batch, "seed": 12})
    assert not torch.equal(crops[0], other[0])
    # the same seed, one image: per-sample parameters differ within the batch
    assert not torch.equal(crops[0][0], crops[0][2])


def test_images_of_several_sizes_are_cropped_size_by_size():
    images = [decode_image({"bytes": _png(w, h), "path": None}) for w, h in [(64, 64), (80, 50), (64, 64)]]
    augmentation = build_augmentation(SMALL, "gpu", None, "cpu")
    crops, fallbacks = augmentation.to_device({"crops": [images], "seed": 0})
    assert fallbacks == 0
    assert [tuple(c.shape) for c in crops] == [(3, 3, 48, 48)] * 2 + [(3, 3, 24, 24)] * 2


def test_the_cpu_placement_moves_the_workers_crops():
    augmentation = build_augmentation(SMALL, "cpu", None, "cpu")
    assert isinstance(augmentation.worker_transform, DINOMultiCrop)
    batch = {"crops": [torch.zeros(2, 3, 48, 48)], "macenko_fallbacks": 3}
    crops, fallbacks = augmentation.to_device(batch)
    assert fallbacks == 3 and torch.equal(crops[0], batch["crops"][0])
    with pytest.raises(ValueError, match="augment_on"):
        build_augmentation(SMALL, "tpu", None, "cpu")


@pytest.mark.slow
def test_compiled_crops_equal_the_eager_ones():
    """`run.compile` also compiles the crop and colour stages (inductor on this CPU: about a minute uncached)."""
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    eager = BatchedMultiCrop(SMALL)(images, torch.Generator().manual_seed(0))
    compiled = BatchedMultiCrop(SMALL, compile=True)(images, torch.Generator().manual_seed(0))
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: host syncs exist only with a device")
def test_batched_crops_never_wait_for_the_device(he_patch):
    images = (he_patch.cuda().float() / 255).expand(8, -1, -1, -1).contiguous()
    generator = torch.Generator(device="cuda").manual_seed(0)
    crops = BatchedMultiCrop(AugmentationConfig())
    crops(images, generator)  # first call: allocations and library set-up may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = crops(images, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(views) == 10 and views[0].is_cuda
