"""DINO's multi-crop augmentation on uint8 CHW tensors (the images are already stain-normalized)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from ...image_processing_exaonepath import ExaonePathImageProcessor

__all__ = ["AugmentationConfig", "DINOMultiCrop", "blur_kernel_size"]


@dataclass
class AugmentationConfig:
    global_crop_size: int = 224
    local_crop_size: int = 96
    num_local_crops: int = 8
    global_crop_scale: tuple[float, float] = (0.25, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.25)
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale_p: float = 0.2
    # Blur probability of the first global, second global and every local crop.
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2  # second global crop only

    def __post_init__(self) -> None:
        self.global_crop_scale = tuple(self.global_crop_scale)
        self.local_crop_scale = tuple(self.local_crop_scale)
        self.color_jitter = tuple(self.color_jitter)
        self.blur_p = tuple(self.blur_p)
        self.blur_sigma = tuple(self.blur_sigma)
        for name in ("global_crop_size", "local_crop_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"augmentations.{name} must be positive, got {getattr(self, name)}")


def blur_kernel_size(sigma_max: float) -> int:
    # ±3 sigma holds 99.7% of the Gaussian; PIL's radius-based blur in DINO reaches about as far.
    return 2 * math.ceil(3.0 * sigma_max) + 1


class DINOMultiCrop:
    """2 global + N local crops with DINO's photometric augmentations, each returned as a float normalized tensor.

    Crops are cut first and the colour operations run on the small crops, which keeps the worker cost
    independent of the native patch size. Randomness comes from torch's global generator: seed it per example
    (the data pipeline does) for a pipeline that is reproducible and resumable whatever the worker layout.
    """

    def __init__(self, config: AugmentationConfig | None = None) -> None:
        self.config = config = config or AugmentationConfig()
        brightness, contrast, saturation, hue = config.color_jitter
        flip_and_color = [
            v2.RandomHorizontalFlip(p=config.flip_p),
            v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=config.color_jitter_p),
            v2.RandomGrayscale(p=config.grayscale_p),
        ]
        # The exported model is used through its image processor: training must see the inputs it produces.
        to_model_input = [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(ExaonePathImageProcessor.image_mean), list(ExaonePathImageProcessor.image_std)),
        ]

        def blur(p: float) -> v2.Transform:
            kernel = blur_kernel_size(config.blur_sigma[1])
            return v2.RandomApply([v2.GaussianBlur(kernel, sigma=config.blur_sigma)], p=p)

        def crop(size: int, scale: tuple[float, float]) -> v2.Transform:
            return v2.RandomResizedCrop(
                size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            )

        global_p1, global_p2, local_p = config.blur_p
        self.global_1 = v2.Compose(
            [crop(config.global_crop_size, config.global_crop_scale), *flip_and_color, blur(global_p1)]
            + to_model_input
        )
        self.global_2 = v2.Compose(
            [
                crop(config.global_crop_size, config.global_crop_scale),
                *flip_and_color,
                blur(global_p2),
                v2.RandomSolarize(threshold=128, p=config.solarize_p),
            ]
            + to_model_input
        )
        self.local = v2.Compose(
            [crop(config.local_crop_size, config.local_crop_scale), *flip_and_color, blur(local_p)]
            + to_model_input
        )

    @property
    def num_crops(self) -> int:
        return 2 + self.config.num_local_crops

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        """`image`: uint8 tensor 3×H×W. Returns `num_crops` float tensors (2 global, then the locals)."""
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 3xHxW image tensor, got {tuple(image.shape)} {image.dtype}")
        crops = [self.global_1(image), self.global_2(image)]
        crops.extend(self.local(image) for _ in range(self.config.num_local_crops))
        return crops
