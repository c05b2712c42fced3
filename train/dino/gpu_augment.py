"""DINO's multi-crop augmentations batched on the training device (`data.augment_on: gpu`).

The loader workers only decode (`DecodedImages`); the batch of uint8 images goes to the device, where the package
normalizer applies Macenko and `BatchedMultiCrop` cuts the 2 global + N local crops with the photometric
augmentations of `DINOMultiCrop`: the same operations in the same order, with the same probabilities and
parameter distributions, drawn per crop. Unlike the CPU transforms, which round to uint8 after every operation,
the values stay float 0..1 until the final normalization.

How each operation is batched:

- random resized crop, flip and antialiased bicubic resize: for every crop, one matrix per axis holding
  torch's antialiased bicubic weights over the crop box (zero outside it), so the crop is rows @ image @ colsᵀ,
  equal to cropping and then `interpolate(..., mode="bicubic", antialias=True)`; a flip reverses the columns;
- colour jitter, in a random order per crop: brightness, contrast and saturation are each a clamped blend
  a·x + b·gray + c·mean(gray), the identity for crops whose operation at that place is another one; hue, the
  costly one, runs once, between the blends that come before it in each crop's order and those after it;
- Gaussian blur: a per-crop separable kernel in a grouped convolution (a unit impulse where not applied).

Random parameters come from a generator on the device, seeded per batch, and no step reads a value back to
the host, so the device is never made to wait for the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...image_processing_exaonepath import ExaonePathImageProcessor
from .augmentations import AugmentationConfig, DINOMultiCrop, blur_kernel_size

__all__ = [
    "Augmentation",
    "BatchedMultiCrop",
    "CropParams",
    "DecodedImages",
    "PhotometricParams",
    "build_augmentation",
    "resize_weights",
]

# torchvision's RandomResizedCrop (the CPU transform's): aspect ratios drawn in this range, and this many boxes
# tried before its centre-crop fallback
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_SOLARIZE_THRESHOLD = 128 / 255  # the CPU transform's uint8 threshold, on the 0..1 scale
_HUE = 3  # ColorJitter's operations: 0 brightness, 1 contrast, 2 saturation, 3 hue


class DecodedImages:
    """The loader workers' transform under `augment_on: gpu`: the decoded uint8 image itself, as one view."""

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [image]


@dataclass
class CropParams:
    """Random resized crops and flips, one entry per crop (int64 boxes in pixels, a bool flip)."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor


@dataclass
class PhotometricParams:
    """The colour operations of each crop."""

    jitter_order: torch.Tensor  # (n, 4): a permutation of brightness, contrast, saturation, hue
    jitter_factors: torch.Tensor  # (n, 4); the identity (1, 1, 1, 0) where colour jitter is not applied
    grayscale: torch.Tensor  # bool
    blur_sigma: torch.Tensor  # 0 where blur is not applied
    solarize: torch.Tensor  # bool


class BatchedMultiCrop:
    """`DINOMultiCrop` on a batch: float 0..1 images N×3×H×W (or a list of 3×H×W of several sizes) → `num_crops`
    normalized float tensors N×3×s×s, 2 global then the locals. Images of several sizes are cropped size by size:
    the samples then come grouped by size, in the same order in every view."""

    def __init__(self, config: AugmentationConfig | None = None, compile: bool = False) -> None:
        self.config = config or AugmentationConfig()
        # compiled, the many elementwise passes of the colour operations fuse into a few kernels
        self._resized_crops = torch.compile(resized_crops, dynamic=False) if compile else resized_crops
        self._photometric = torch.compile(self.photometric, dynamic=False) if compile else self.photometric

    @property
    def num_crops(self) -> int:
        return 2 + self.config.num_local_crops

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], generator: torch.Generator) -> list:
        config = self.config
        groups = [images] if isinstance(images, torch.Tensor) else _stacks_by_size(images)
        blur_1, blur_2, blur_local = config.blur_p
        kinds = [
            (config.global_crop_size, config.global_crop_scale, (blur_1, blur_2), (0.0, config.solarize_p)),
            (config.local_crop_size, config.local_crop_scale, (blur_local,) * config.num_local_crops,
             (0.0,) * config.num_local_crops),
        ]  # fmt: skip
        views = []
        for size, scale, blur_p, solarize_p in kinds:
            if not blur_p:
                continue
            count = len(blur_p)  # views of this kind; crops below are view-major: (view, sample)
            crops = torch.cat([self.crop(group, count, size, scale, generator) for group in groups], dim=1)
            params = self.sample_photometric(crops.shape[1], blur_p, solarize_p, generator, crops.device)
            crops = self._photometric(crops.flatten(0, 1), params)
            views.extend(crops.unflatten(0, (count, -1)).unbind(0))
        return views

    def crop(
        self,
        images: torch.Tensor,
        count: int,
        size: int,
        scale: tuple[float, float],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """`count` random resized, randomly flipped crops of each of `images` (n×3×H×W) → count×n×3×size×size."""
        params = self.sample_crops(count * len(images), *images.shape[-2:], scale, generator, images.device)
        return self._resized_crops(images, params, size)

    def sample_crops(
        self,
        count: int,
        height: int,
        width: int,
        scale: tuple[float, float],
        generator: torch.Generator,
        device: torch.device,
    ) -> CropParams:
        """torchvision's `RandomResizedCrop` boxes (and flips) for `count` crops of a height×width image."""
        draws = torch.rand(count, _CROP_ATTEMPTS, 2, generator=generator, device=device)
        target_area = height * width * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
        low, high = math.log(_RATIO[0]), math.log(_RATIO[1])
        aspect = torch.exp(low + (high - low) * draws[..., 1])
        box_w, box_h = torch.sqrt(target_area * aspect).round(), torch.sqrt(target_area / aspect).round()
        fits = (box_w >= 1) & (box_w <= width) & (box_h >= 1) & (box_h <= height)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first box that fits, as torchvision
        found = fits.any(dim=1)
        fallback_h, fallback_w = _centre_fallback(height, width)
        box_h = torch.where(found, box_h.gather(1, first).squeeze(1), fallback_h).long()
        box_w = torch.where(found, box_w.gather(1, first).squeeze(1), fallback_w).long()
        offsets = torch.rand(count, 3, generator=generator, device=device)
        top = torch.minimum((offsets[:, 0] * (height - box_h + 1)).long(), height - box_h)
        left = torch.minimum((offsets[:, 1] * (width - box_w + 1)).long(), width - box_w)
        top = torch.where(found, top, (height - box_h) // 2)
        left = torch.where(found, left, (width - box_w) // 2)
        return CropParams(top, left, box_h, box_w, offsets[:, 2] < self.config.flip_p)

    def sample_photometric(
        self,
        samples: int,
        blur_p: tuple[float, ...],
        solarize_p: tuple[float, ...],
        generator: torch.Generator,
        device: torch.device,
    ) -> PhotometricParams:
        """Colour parameters of `len(blur_p)` views of `samples` images, view-major; `blur_p` and `solarize_p`
        hold one probability per view."""
        config, count = self.config, len(blur_p) * samples

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator, device=device) * (high - low) + low

        def per_view(probabilities: tuple[float, ...]) -> torch.Tensor:  # no tensor of them built on the host
            draws = uniform(0, 1, len(probabilities), samples)
            return torch.cat([draws[view] < p for view, p in enumerate(probabilities)])

        brightness, contrast, saturation, hue = config.color_jitter
        factors = torch.stack(
            [
                uniform(max(0.0, 1 - brightness), 1 + brightness, count),
                uniform(max(0.0, 1 - contrast), 1 + contrast, count),
                uniform(max(0.0, 1 - saturation), 1 + saturation, count),
                uniform(-hue, hue, count),
            ],
            dim=1,
        )
        identity = torch.ones_like(factors[0])
        identity[_HUE] = 0.0
        jitter = uniform(0, 1, count) < config.color_jitter_p
        return PhotometricParams(
            jitter_order=uniform(0, 1, count, 4).argsort(dim=1),  # a uniformly random permutation per crop
            jitter_factors=torch.where(jitter[:, None], factors, identity),
            grayscale=uniform(0, 1, count) < config.grayscale_p,
            blur_sigma=torch.where(per_view(blur_p), uniform(*config.blur_sigma, count), 0.0),
            solarize=per_view(solarize_p),
        )

    def photometric(self, crops: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
        """Colour jitter, grayscale, blur and solarize on float 0..1 crops, then the model's normalization."""
        crops = color_jitter(crops, params.jitter_order, params.jitter_factors)
        crops = torch.where(params.grayscale[:, None, None, None], grayscale(crops).expand_as(crops), crops)
        crops = gaussian_blur(crops, params.blur_sigma, blur_kernel_size(self.config.blur_sigma[1]))
        solarized = params.solarize[:, None, None, None] & (crops >= _SOLARIZE_THRESHOLD)
        crops = torch.where(solarized, 1 - crops, crops)
        mean, std = ExaonePathImageProcessor.image_mean, ExaonePathImageProcessor.image_std
        for channel in range(3):  # Python scalars: no host-to-device copy of a mean/std tensor
            crops[:, channel].sub_(mean[channel]).div_(std[channel])
        return crops


def _centre_fallback(height: int, width: int) -> tuple[int, int]:
    """torchvision's crop when no random box fits: the whole image, cut to the nearest allowed aspect ratio."""
    ratio = width / height
    if ratio < _RATIO[0]:
        return int(round(width / _RATIO[0])), width
    if ratio > _RATIO[1]:
        return height, int(round(height * _RATIO[1]))
    return height, width


def _stacks_by_size(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    by_size: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for image in images:
        by_size.setdefault(tuple(image.shape), []).append(image)
    return [torch.stack(group) for group in by_size.values()]


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    """torch's antialiasing bicubic filter (a = -0.5, as PIL)."""
    a, t = -0.5, t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, 0.0))


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(n, out_size, in_size) matrices resampling each crop [start, start + length) of an axis of `in_size`
    pixels to `out_size` as `interpolate(mode="bicubic", antialias=True, align_corners=False)` does."""
    device = start.device
    scale = (length / out_size)[:, None, None]
    centres = (torch.arange(out_size, device=device) + 0.5)[None, :, None] * scale
    offsets = (torch.arange(in_size, device=device)[None, :] - start[:, None])[:, None, :]
    weights = _bicubic((offsets + 0.5 - centres) / scale.clamp(min=1.0))
    weights = weights * ((offsets >= 0) & (offsets < length[:, None, None]))
    return weights / weights.sum(dim=-1, keepdim=True)


def resized_crops(images: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
    """The crops of `params` (view-major over `images`, n×3×H×W float) resized to size², clamped to 0..1 as the
    uint8 CPU path is → views×n×3×size×size."""
    n, channels, height, width = images.shape
    rows = resize_weights(params.top, params.height, height, size)  # (views·n, size, H)
    cols = resize_weights(params.left, params.width, width, size)  # (views·n, size, W)
    cols = torch.where(params.flip[:, None, None], cols.flip(1), cols)
    views = len(rows) // n
    # rows @ image for every view of an image: one product per image, its views stacked (images not copied)
    rows = rows.unflatten(0, (views, n)).transpose(0, 1).reshape(n, views * size, height)
    resized = rows @ images.permute(0, 2, 1, 3).reshape(n, height, channels * width)
    resized = resized.view(n * views, size * channels, width)  # (image, view) pairs, rows × (channel, column)
    cols = cols.unflatten(0, (views, n)).transpose(0, 1).reshape(n * views, size, width)
    out = (resized @ cols.transpose(1, 2)).view(n, views, size, channels, size)
    return out.permute(1, 0, 3, 2, 4).clamp(0.0, 1.0)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """n×1×h×w luma of n×3×h×w images, with torchvision's weights."""
    red, green, blue = images.unbind(1)
    return (red * _GRAY[0] + green * _GRAY[1] + blue * _GRAY[2]).unsqueeze(1)


def _blend_slot(images: torch.Tensor, operation: torch.Tensor, factors: torch.Tensor, active: torch.Tensor):
    """One place of the jitter order: each crop's brightness, contrast or saturation blend where `active` and the
    operation is not hue; the identity elsewhere."""
    factor = factors.gather(1, operation[:, None]).squeeze(1)
    blends = active & (operation != _HUE)
    keep = torch.where(blends, factor, 1.0)[:, None, None, None]
    gray_weight = torch.where(blends & (operation == 2), 1 - factor, 0.0)[:, None, None, None]
    mean_weight = torch.where(blends & (operation == 1), 1 - factor, 0.0)[:, None, None, None]
    gray = grayscale(images)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    # x·keep + gray·gray_weight + mean·mean_weight, in torchvision's order (x·f first), in two passes
    return torch.addcmul(mean * mean_weight, images, keep).addcmul_(gray, gray_weight).clamp_(0.0, 1.0)


def color_jitter(images: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with per-crop factors (brightness, contrast, saturation, hue) and order."""
    hue_place = (order == _HUE).to(torch.uint8).argmax(dim=1)
    for place in range(3):  # the blends before hue
        images = _blend_slot(images, order[:, place], factors, place < hue_place)
    shift = factors[:, _HUE]
    images = torch.where((shift != 0)[:, None, None, None], adjust_hue(images, shift), images)
    for place in range(1, 4):  # the blends after it
        images = _blend_slot(images, order[:, place], factors, place > hue_place)
    return images


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each crop by `shift` (turns), as torchvision's adjust_hue on float images."""
    value, _ = images.max(dim=1)
    minimum, _ = images.min(dim=1)
    spread = value - minimum
    grey = spread == 0
    saturation = spread / torch.where(grey, 1.0, value)
    distances = (value.unsqueeze(1) - images) / torch.where(grey, 1.0, spread).unsqueeze(1)
    red_d, green_d, blue_d = distances.unbind(1)
    red, green, _ = images.unbind(1)
    is_red, is_green = value == red, (value == green) & (value != red)
    hue = torch.where(
        is_red, blue_d - green_d, torch.where(is_green, 2 + red_d - blue_d, 4 + green_d - red_d)
    )
    hue = torch.where(grey, 0.0, hue) / 6 + 1  # hue in turns, shifted positive
    hue = (hue + shift[:, None, None]).remainder(1.0) * 6
    # HSV -> RGB: channel n is v - v·s·clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1
    k = torch.stack([(hue + n).remainder(6.0) for n in (5.0, 3.0, 1.0)], dim=1)
    ramp = torch.minimum(k, 4 - k).clamp(0.0, 1.0)
    return value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * ramp)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding) with a sigma per crop; sigma 0 leaves a crop unchanged."""
    n, channels, height, width = images.shape
    half = kernel_size // 2
    limit = (kernel_size - 1) / (2.0 * math.sqrt(2.0))  # torchvision's taps: softmax(-(x / sigma)^2)
    taps = torch.linspace(-limit, limit, kernel_size, device=images.device)
    kernels = torch.softmax(-((taps / sigma.clamp(min=1e-3)[:, None]) ** 2), dim=1)
    kernels = kernels.repeat_interleave(channels, dim=0)
    padded = F.pad(images.reshape(1, n * channels, height, width), (half, half, half, half), mode="reflect")
    blurred = F.conv2d(padded, kernels.view(n * channels, 1, kernel_size, 1), groups=n * channels)
    blurred = F.conv2d(blurred, kernels.view(n * channels, 1, 1, kernel_size), groups=n * channels)
    return torch.where((sigma > 0)[:, None, None, None], blurred.view(n, channels, height, width), images)


@dataclass
class Augmentation:
    """Where a run's images are stain-normalized and cropped: what the loader workers run and what turns one of
    their batches into crops on the device, with the number of Macenko fallbacks (an int, or a device tensor)."""

    worker_transform: Callable[[torch.Tensor], list[torch.Tensor]]
    worker_normalizer: Any
    to_device: Callable[[dict[str, Any]], tuple[list[torch.Tensor], int | torch.Tensor]]
    num_crops: int


class _OnDevice:
    """`augment_on: gpu`: a batch of decoded uint8 images → Macenko and multi-crop on `device`."""

    def __init__(
        self, config: AugmentationConfig, normalizer: Any, device: torch.device, compile: bool
    ) -> None:
        self.crops = BatchedMultiCrop(config, compile)
        self.normalizer = normalizer
        self.device = device
        self.generator = torch.Generator(device=device)

    def __call__(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], int | torch.Tensor]:
        images = batch["crops"][0]  # the workers' one view: the decoded images (a list when of several sizes)
        if isinstance(images, torch.Tensor):
            images = images.to(self.device, non_blocking=True)
        else:
            images = [image.to(self.device, non_blocking=True) for image in images]
        self.generator.manual_seed(batch["seed"])
        if self.normalizer is None:  # the 0..1 floats the normalizer would return
            unit = (
                images.float() / 255 if torch.is_tensor(images) else [image.float() / 255 for image in images]
            )
            return self.crops(unit, self.generator), 0
        output = self.normalizer.normalize(images)
        return self.crops(output.images, self.generator), (~output.normalized).sum()


def _crops_to_device(device: torch.device) -> Callable[[dict[str, Any]], tuple[list[torch.Tensor], int]]:
    def to_device(batch: dict[str, Any]) -> tuple[list[torch.Tensor], int]:
        return [crop.to(device, non_blocking=True) for crop in batch["crops"]], batch["macenko_fallbacks"]

    return to_device


def build_augmentation(
    config: AugmentationConfig,
    augment_on: str,
    normalizer: Any,
    device: torch.device | str,
    compile: bool = False,
) -> Augmentation:
    """`augment_on` "cpu": Macenko and crops in the loader workers; "gpu": the workers decode and the rest runs
    batched on `device` (which may be a CPU, e.g. in tests), its crop and colour stages `torch.compile`d with
    `compile`. `normalizer`: a `MacenkoNormalizer` or None."""
    device = torch.device(device)
    if augment_on == "gpu":
        on_device = _OnDevice(config, normalizer, device, compile)
        return Augmentation(DecodedImages(), None, on_device, on_device.crops.num_crops)
    if augment_on != "cpu":
        raise ValueError(f"augment_on must be 'cpu' or 'gpu', got {augment_on!r}")
    transform = DINOMultiCrop(config)
    return Augmentation(transform, normalizer, _crops_to_device(device), transform.num_crops)
