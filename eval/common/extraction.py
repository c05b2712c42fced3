"""The one path from images to features: patch datasets (`features`), slides (`eval.slide`) and the demo use it.

A source is a map-style `torch.utils.data.Dataset` whose items are `(key, image, error)`: the image decoded in
a loader worker (PIL, H×W×3 uint8 array or 3×H×W uint8 tensor), or None with the reason it could not be read.
`stream_features` batches a source, runs the model folder's own preprocessing (the `Preprocessing` of the
encoder, i.e. its processor with its stain reference) and the forward pass, and yields `FeatureBatch`es in the
source's order.

Where the processor runs: on a GPU, the workers only decode and stack; a batch travels as uint8 (one pinned
copy per image size) and Macenko, resize, crop and normalization run on the GPU, batched, many times faster than
in the workers. On the CPU the processor runs in the workers, which spreads it over processes. An image that
cannot be decoded or preprocessed is left out of its batch and reported with its error (the rest of the batch is
preprocessed again without it): one bad image never costs its batch or the job.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as tvF

from ...progress import progress_bar
from .cli import DEFAULT_BATCH_SIZE, Precision, PreprocessOn
from .encoders import Encoder, Preprocessing, Tokens

__all__ = ["ForwardSettings", "FeatureBatch", "ForwardTimes", "preprocess_isolating", "stream_features"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardSettings:
    """How images reach the encoder. `precision="auto"` is bf16 on CUDA, fp32 elsewhere; `compile` wraps the
    model in `torch.compile` (static shapes: the last, smaller batch compiles once more)."""

    batch_size: int = DEFAULT_BATCH_SIZE
    num_workers: int = 4
    precision: Precision = "auto"
    tokens: Tokens = "cls"
    preprocess_on: PreprocessOn = "auto"
    compile: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError(
                f"batch_size must be >= 1 and num_workers >= 0; got {self.batch_size}, {self.num_workers}"
            )
        if self.precision not in get_args(Precision):
            raise ValueError(f"precision must be one of {get_args(Precision)}, got {self.precision!r}")
        if self.preprocess_on not in get_args(PreprocessOn):
            raise ValueError(
                f"preprocess_on must be one of {get_args(PreprocessOn)}, got {self.preprocess_on!r}"
            )
        if self.tokens not in ("cls", "cls+mean"):
            raise ValueError(f"tokens must be 'cls' or 'cls+mean', got {self.tokens!r}")

    def uses_bf16(self, device: torch.device) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")

    def preprocesses_on_device(self, device: torch.device) -> bool:
        return self.preprocess_on == "device" or (self.preprocess_on == "auto" and device.type == "cuda")


@dataclass
class FeatureBatch:
    """Features of the images of one batch that made it, in source order, and the ones that did not."""

    keys: list[Any]
    features: torch.Tensor  # [n, D] float32, CPU
    stain_normalized: torch.Tensor  # [n] bool, CPU: False where Macenko fell back (or is off)
    failed: list[tuple[Any, str]]  # (key, error)


@dataclass
class ForwardTimes:
    """Where a stream's time went: waiting for the loader, and preprocessing plus forward on the device."""

    images: int = 0
    batches: int = 0
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    # when the first batch was done, and its images: the rate after it is the steady state, without the
    # start of the loader workers and the first (compiling, allocating) forward pass
    first_batch_at: float | None = None
    first_batch_images: int = 0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def steady_images_per_second(self) -> float | None:
        if self.first_batch_at is None or self.images <= self.first_batch_images:
            return None
        return (self.images - self.first_batch_images) / (time.perf_counter() - self.first_batch_at)

    def to_dict(self) -> dict[str, Any]:
        seconds, steady = self.seconds, self.steady_images_per_second()
        first = None if self.first_batch_at is None else self.first_batch_at - self.started
        return {
            "images": self.images,
            "batches": self.batches,
            "seconds": round(seconds, 3),
            "first_batch_seconds": None if first is None else round(first, 3),
            "wait_seconds": round(self.wait_seconds, 3),
            "compute_seconds": round(self.compute_seconds, 3),
            "data_wait_fraction": round(self.wait_seconds / seconds, 4) if seconds > 0 else None,
            "images_per_second": round(self.images / seconds, 2) if seconds > 0 and self.images else None,
            "steady_images_per_second": None if steady is None else round(steady, 2),
        }


def _uint8_chw(image: Any) -> torch.Tensor:
    """A decoded image as 3×H×W uint8 (a PIL image is copied once, straight into channels-first order)."""
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, Image.Image):
        return tvF.pil_to_tensor(image.convert("RGB"))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _stacked_by_size(images: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """(positions, [n, 3, H, W]) per image size: one contiguous tensor each, which the loader pins whole."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(position)
    return [(positions, torch.stack([images[p] for p in positions])) for positions in groups.values()]


def _run_processor(processor, images, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    out = processor(images, return_tensors="pt", device=device)
    return out["pixel_values"], out["stain_normalized"].bool()


def preprocess_isolating(
    processor, keys: list[Any], images: Sequence[Any] | torch.Tensor, device: torch.device | None = None
) -> tuple[list[Any], torch.Tensor | None, torch.Tensor | None, list[tuple[Any, str]]]:
    """(kept keys, pixel values, stain flags, failures) of `images` (a list, or an [N, 3, H, W] batch): the
    batch at once, or, when the processor rejects it, image by image so that only the offending ones are left
    out."""
    if not len(images):
        return [], None, None, []
    try:
        pixel_values, flags = _run_processor(processor, images, device)
        return list(keys), pixel_values, flags, []
    except Exception:  # find the offending image(s) instead of losing the batch
        logger.debug("a batch failed preprocessing; retrying image by image", exc_info=True)
    kept, parts, failed = [], [], []
    for key, image in zip(keys, images, strict=True):
        try:
            parts.append(_run_processor(processor, [image], device))
            kept.append(key)
        except Exception as error:
            failed.append((key, f"preprocessing: {type(error).__name__}: {error}"))
    if not parts:
        return [], None, None, failed
    return kept, torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts]), failed


class _Collate:
    """In the loader workers: split off unreadable items; then either run the processor (CPU) or only stack the
    decoded uint8 images per size for one upload (GPU)."""

    def __init__(self, processor) -> None:
        self.processor = processor  # None: the device preprocesses

    def __call__(self, items: Sequence[tuple[Any, Any, str | None]]) -> dict[str, Any]:
        keys, images, failed = [], [], []
        for key, image, error in items:
            if image is None:
                failed.append((key, error or "unreadable"))
            else:
                keys.append(key)
                images.append(image)
        if self.processor is None:
            return {
                "keys": keys,
                "groups": _stacked_by_size([_uint8_chw(i) for i in images]),
                "failed": failed,
            }
        keys, pixel_values, flags, rejected = preprocess_isolating(self.processor, keys, images)
        return {
            "keys": keys,
            "pixel_values": pixel_values,
            "stain_normalized": flags,
            "failed": failed + rejected,
        }


def _device_inputs(groups: list[tuple[list[int], torch.Tensor]], device: torch.device) -> Any:
    """The batch's images on `device`: the one stacked tensor, or the images of several sizes in batch order."""
    uploaded = [(positions, tensor.to(device, non_blocking=True)) for positions, tensor in groups]
    if len(uploaded) == 1:
        return uploaded[0][1]
    images: list[torch.Tensor | None] = [None] * sum(len(positions) for positions, _ in uploaded)
    for positions, tensor in uploaded:
        for position, image in zip(positions, tensor.unbind(0), strict=True):
            images[position] = image
    return images


class _Forward:
    """Preprocessing on the device (when the workers did not do it) and the encoder's forward pass."""

    def __init__(self, encoder: Encoder, preprocessing: Preprocessing, settings: ForwardSettings, device):
        self.device = device
        self.settings = settings
        self.use_bf16 = settings.uses_bf16(device)
        self.processor = preprocessing.processor() if settings.preprocesses_on_device(device) else None
        model = torch.compile(encoder.model, dynamic=False) if settings.compile else encoder.model
        self.encoder = dataclasses.replace(encoder, model=model)

    def __call__(self, batch: dict[str, Any]) -> FeatureBatch:
        keys, failed = batch["keys"], list(batch["failed"])
        pixel_values, flags = batch.get("pixel_values"), batch.get("stain_normalized")
        if self.processor is not None and keys:
            inputs = _device_inputs(batch["groups"], self.device)
            keys, pixel_values, flags, rejected = preprocess_isolating(
                self.processor, keys, inputs, self.device
            )
            failed += rejected
        if not keys:
            dim = self.encoder.feature_dim * (2 if self.settings.tokens == "cls+mean" else 1)
            return FeatureBatch([], torch.zeros(0, dim), torch.zeros(0, dtype=torch.bool), failed)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16),
        ):
            features = self.encoder.features(
                pixel_values.to(self.device, non_blocking=True), tokens=self.settings.tokens
            )
        return FeatureBatch(keys, features.float().cpu(), flags.cpu(), failed)  # .cpu() synchronizes


def stream_features(
    encoder: Encoder,
    preprocessing: Preprocessing,
    source: Dataset,
    settings: ForwardSettings,
    device: torch.device,
    times: ForwardTimes | None = None,
    desc: str = "features",
) -> Iterator[FeatureBatch]:
    """Features of every item of `source` (see the module docstring), batch by batch in source order.

    `times`, if given, is filled as the stream goes (images, batches, loader wait, compute).
    """
    times = times if times is not None else ForwardTimes()
    forward = _Forward(encoder, preprocessing, settings, device)
    encoder.model.to(device)
    loader = DataLoader(
        source,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        collate_fn=_Collate(None if forward.processor is not None else preprocessing.processor()),
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if settings.num_workers else None,
    )
    total = len(source)
    with progress_bar(total=total, desc=desc, unit="img", enabled=settings.progress and total > 0) as bar:
        waited = time.perf_counter()
        for batch in loader:
            started = time.perf_counter()
            times.wait_seconds += started - waited
            result = forward(batch)
            waited = time.perf_counter()
            times.compute_seconds += waited - started
            times.batches += 1
            times.images += len(result.keys)
            if times.first_batch_at is None:
                times.first_batch_at, times.first_batch_images = waited, times.images
            bar.update(len(result.keys) + len(result.failed))
            yield result
