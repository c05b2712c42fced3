"""Image processor for EXAONEPath: the release's inference preprocessing, batched and on any device.

Per image, in the release's order: Macenko stain normalization of the full tile (on the 0..255 image) → resize
so that the shortest edge is 256 (bicubic, antialiased, on the float image) → center crop 224 → rescale to 0..1
→ ImageNet mean/std normalization. The stain reference and the Macenko parameters are stored in
``preprocessor_config.json``; fit a reference to your own target image with :meth:`fit_stain_reference` or
``exaonepath-fit-stain TARGET --out DIR``.

Accepted inputs: PIL images, numpy HWC / HW arrays, torch CHW / HW tensors, lists of those, and N×C×H×W /
N×H×W×C batches; uint8, 16-bit (uint16 and 16-bit PIL modes, scaled by 255/65535), other integer types with
values in 0..255, and float in [0, 1] (an image whose maximum is <= 1) or [0, 255]. Grayscale is replicated to
RGB. Alpha (RGBA, grey+alpha) is composited over white, as transmitted light through empty glass is white, so
transparent pixels become background that Macenko ignores; a fully opaque alpha channel is simply dropped.

The processor keeps the :class:`MacenkoNormalizer` of its last call (and so its working buffers) for the next
call with the same stain settings; it is not part of the saved configuration.

This file is shipped with saved processors (``trust_remote_code``): it imports only torch, torchvision,
transformers and its sibling ``stain_normalization.py`` (which imports ``stain_engine.py``). Of transformers'
image-processing base it overrides the public ``process_image``, ``center_crop`` and ``to_dict`` and the
documented hooks ``_preprocess_image_like_inputs`` and ``_preprocess`` (pinned by
``tests/test_image_processing.py::test_private_transformers_hooks_the_processor_relies_on``).
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_transforms import group_images_by_shape, reorder_images
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageType,
    PILImageResampling,
    SizeDict,
    get_image_type,
    is_pil_image,
)
from transformers.processing_utils import ImagesKwargs

from .stain_normalization import (
    DEFAULT_MAX_STAIN_ANGLE,
    DEFAULT_MIN_TISSUE_FRACTION,
    DEFAULT_STAIN_REFERENCE,
    MacenkoNormalizer,
    StainReference,
    _group_by_shape,
    _validated_max_stain_angle,
)

__all__ = ["ExaonePathImageProcessor", "ExaonePathImageProcessorKwargs"]

# PIL modes holding more than 8 bits per pixel; 16-bit PNGs open as "I;16*" or "I"
_WIDE_PIL_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SIXTEEN_BIT_DIVISOR = 257.0  # 65535 / 257 = 255


class ExaonePathImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments of :class:`ExaonePathImageProcessor` beyond the standard image-processor ones.

    Attributes:
        do_stain_normalize: Macenko-normalize every image first (the release does).
        stain_reference: ``{"stain_matrix": 3x2, "max_concentrations": 2}``, see :class:`StainReference`.
        stain_io: transmitted light intensity of the Macenko model.
        stain_alpha: percentile (in percent) of the stain-vector angles.
        stain_beta: optical density below which a pixel is background.
        min_tissue_fraction: images with a smaller tissue fraction are not stain-normalized (0 = the release's
            rule); see ``stain_normalization.DEFAULT_MIN_TISSUE_FRACTION``.
        max_stain_angle: images whose tissue is not H&E-coloured (IHC, ink, dark fluorescence-like images, noise:
            a stain angle above this many degrees) are not stain-normalized; see
            ``stain_normalization.DEFAULT_MAX_STAIN_ANGLE``. ``None`` given to the processor (or ``null`` in
            ``preprocessor_config.json``) switches the check off, as in the release; a config without the key
            gets the default. In a call, ``None`` means the processor's setting, as for every argument.
    """

    do_stain_normalize: bool | None
    stain_reference: dict | None
    stain_io: int | float | None
    stain_alpha: int | float | None
    stain_beta: int | float | None
    min_tissue_fraction: int | float | None
    max_stain_angle: int | float | None


class ExaonePathImageProcessor(TorchvisionBackend):
    r"""EXAONEPath preprocessing: Macenko → resize 256 (bicubic) → center crop 224 → rescale → ImageNet normalize.

    Returns a :class:`~transformers.BatchFeature` with ``pixel_values`` and ``stain_normalized`` (bool per image:
    False where Macenko left the image unchanged, e.g. background, or tissue that is not H&E such as IHC or pen
    ink; see :class:`~exaonepath_hf.stain_normalization.MacenkoNormalizer`). Pass ``device="cuda"`` to run on a
    GPU. ``ExaonePathImageProcessor(max_stain_angle=None)`` stain-normalizes non-H&E images too, as the release
    does.

    Example::

        processor = ExaonePathImageProcessor()
        inputs = processor(images, return_tensors="pt")
        features = model(inputs["pixel_values"]).pooler_output
    """

    valid_kwargs = ExaonePathImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_convert_rgb = True
    do_stain_normalize = True
    stain_reference = DEFAULT_STAIN_REFERENCE.to_dict()
    stain_io = 240.0
    stain_alpha = 1.0
    stain_beta = 0.15
    min_tissue_fraction = DEFAULT_MIN_TISSUE_FRACTION
    max_stain_angle = DEFAULT_MAX_STAIN_ANGLE

    def __init__(self, **kwargs):
        reference = kwargs.get("stain_reference")
        if isinstance(reference, StainReference):
            kwargs["stain_reference"] = reference.to_dict()
        # transformers replaces a None argument with the class default; for this key None means "off" (a saved
        # config says null), so it is kept apart
        stain_angle_off = "max_stain_angle" in kwargs and kwargs["max_stain_angle"] is None
        super().__init__(**kwargs)
        if stain_angle_off:
            self.max_stain_angle = None
        # validate early: a bad reference in a config should fail at load time, not at the first batch
        self.stain_reference = StainReference.from_dict(self.stain_reference).to_dict()
        self.max_stain_angle = _validated_max_stain_angle(self.max_stain_angle)

    # ------------------------------------------------------------------------------------------------ stain API
    def stain_normalizer(self, **overrides: Any) -> MacenkoNormalizer:
        """A new :class:`MacenkoNormalizer` with this processor's settings (keyword overrides as in ``__call__``)."""
        return MacenkoNormalizer(**self._normalizer_settings(overrides))

    def fit_stain_reference(self, images, device: str | torch.device | None = None) -> StainReference:
        """Fit the stain reference to one or more target images (any accepted input), store and return it."""
        reference = self.stain_normalizer().fit(self._prepared_images(images, device=device))
        self.stain_reference = reference.to_dict()
        return reference

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("_kept_normalizer", None)  # working memory, not configuration
        return output

    def _normalizer_settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        settings = {
            "stain_reference": self.stain_reference,
            "stain_io": self.stain_io,
            "stain_alpha": self.stain_alpha,
            "stain_beta": self.stain_beta,
            "min_tissue_fraction": self.min_tissue_fraction,
            "max_stain_angle": self.max_stain_angle,
        }
        settings.update({key: value for key, value in overrides.items() if value is not None})
        return {
            "reference": StainReference.from_dict(settings["stain_reference"]),
            "io": float(settings["stain_io"]),
            "alpha": float(settings["stain_alpha"]),
            "beta": float(settings["stain_beta"]),
            "min_tissue_fraction": float(settings["min_tissue_fraction"]),
            "max_stain_angle": settings["max_stain_angle"],  # validated by MacenkoNormalizer
        }

    def _normalizer_for(self, **overrides: Any) -> MacenkoNormalizer:
        """The normalizer of the last call, if it had the same settings: it keeps its working buffers between
        calls. Several threads may share it (each call takes its own buffers)."""
        settings = self._normalizer_settings(overrides)
        kept = self.__dict__.get("_kept_normalizer")
        if kept is None or kept[0] != settings:
            kept = (settings, MacenkoNormalizer(**settings))
            self._kept_normalizer = kept
        return kept[1]

    # ------------------------------------------------------------------------------------------- input handling
    def _preprocess_image_like_inputs(self, images, *args, **kwargs) -> BatchFeature:
        # the hook transformers documents for custom orchestration; this processor flattens any nesting of images
        # and batches itself, and its errors name the image that failed
        return self._preprocess(self._prepared_images(images, **kwargs), *args, **kwargs)

    def _prepared_images(
        self, images, device: str | torch.device | None = None, **kwargs
    ) -> list[torch.Tensor]:
        """Every image of ``images`` (an image, a batch, nested lists) as ``process_image`` returns it, on
        ``device`` (default: where each image is)."""
        if _is_rgb_uint8_batch(images, kwargs.get("input_data_format")):
            # what process_image would make of each image, without its per-image work: a batch that came
            # stacked (e.g. from a loader) is processed at the speed of the device
            return list((images if device is None else images.to(device)).unbind(0))
        flat = _flatten_images(self.fetch_images(images))
        if not flat:
            raise ValueError("no images given: pass an image, a list of images or a batch")
        prepared = []
        for index, image in enumerate(flat):
            try:
                prepared.append(self.process_image(image, **kwargs))
            except (ValueError, TypeError) as error:
                raise type(error)(f"image {index}: {error}") from error
        return prepared if device is None else _on_device(prepared, torch.device(device))

    def process_image(
        self,
        image,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """One input image → an RGB 3×H×W tensor, uint8 or float32 on the 0..255 scale, on ``device``."""
        image_type = get_image_type(image)
        sixteen_bit = False
        if image_type == ImageType.PIL:
            sixteen_bit = image.mode in _WIDE_PIL_MODES
            if image.mode not in ("RGB", "RGBA", "L", "LA") and not sixteen_bit:
                has_alpha = "transparency" in image.info or "A" in image.getbands()
                image = image.convert("RGBA" if has_alpha else "RGB")
            tensor = tvF.pil_to_tensor(image)  # C×H×W
            channels_first = True
        elif image_type == ImageType.NUMPY:
            # torch cannot wrap read-only or negatively strided arrays (e.g. np.flipud views)
            usable = image.flags.writeable and min(image.strides, default=0) >= 0
            tensor = torch.from_numpy(image if usable else image.copy())
            channels_first = _channels_first(tensor, image_type, input_data_format)
        elif image_type == ImageType.TORCH:
            tensor = image
            channels_first = _channels_first(tensor, image_type, input_data_format)
        else:
            raise TypeError(f"unsupported image type {type(image).__name__}; use PIL, numpy or torch images")

        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
        elif not channels_first:
            tensor = tensor.permute(2, 0, 1)
        if device is not None:
            tensor = tensor.to(device)
        tensor = _to_0_255_scale(tensor, sixteen_bit or tensor.dtype == torch.uint16)
        return _to_rgb(tensor, do_convert_rgb is not False)  # a view is fine: images are stacked next

    # --------------------------------------------------------------------------------------------- processing
    def center_crop(self, image: torch.Tensor, size: SizeDict, **kwargs) -> torch.Tensor:
        # torchvision's rounding of the crop offset (the release uses transforms.CenterCrop), not int()
        return tvF.center_crop(image, [size.height, size.width])

    def _preprocess(
        self,
        images: list[torch.Tensor],
        do_stain_normalize: bool,
        stain_reference: dict,
        stain_io: float,
        stain_alpha: float,
        stain_beta: float,
        min_tissue_fraction: float,
        max_stain_angle: float | None,
        do_resize: bool,
        size: SizeDict,
        resample,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        disable_grouping: bool | None,
        return_tensors,
        **kwargs,
    ) -> BatchFeature:
        scale = rescale_factor if do_rescale else 1.0
        if do_stain_normalize:
            scale *= 255.0  # Macenko returns 0..1
            normalizer = self._normalizer_for(
                stain_reference=stain_reference,
                stain_io=stain_io,
                stain_alpha=stain_alpha,
                stain_beta=stain_beta,
                min_tissue_fraction=min_tissue_fraction,
                max_stain_angle=max_stain_angle,
            )

        def resize_crop_normalize(stacked: torch.Tensor) -> torch.Tensor:
            stacked = stacked.float()  # the release resizes the float image, not a requantized one
            if do_resize:
                stacked = self.resize(stacked, size=size, resample=resample, antialias=True)
            if do_center_crop:
                stacked = self.center_crop(stacked, crop_size)
            return self.rescale_and_normalize(
                stacked, scale != 1.0, scale, do_normalize, image_mean, image_std
            )

        # transformers leaves CPU images ungrouped by default; batched Macenko is what makes this processor fast
        processed, flags = {}, {}
        if do_stain_normalize:
            # On CPU Macenko stacks each group chunk by chunk into memory it reuses (a stacked copy of 256
            # patches first took a tenth of the time) and resizes, crops and normalizes each chunk right away,
            # while it is in cache; all groups in one call: their chunks share the worker threads (mixed sizes
            # come as small groups). On a GPU a group is stacked at once (one copy kernel): its chunks are large.
            groups, grouped_index = _group_indices(images, disable_grouping=bool(disable_grouping))
            stacks = [_stacked_off_cpu([images[i] for i in indices]) for indices in groups.values()]
            results = normalizer.normalize_stacks(stacks, then=resize_crop_normalize)
            for key, result in zip(groups, results, strict=True):
                processed[key], flags[key] = result.images, result.normalized
        else:
            grouped, grouped_index = group_images_by_shape(images, disable_grouping=bool(disable_grouping))
            for key, stacked in grouped.items():
                processed[key] = resize_crop_normalize(stacked)
                flags[key] = torch.zeros(len(stacked), dtype=torch.bool, device=stacked.device)
        stain_normalized = torch.stack(reorder_images(flags, grouped_index))
        if len(processed) == 1 and return_tensors is not None:  # already one batch in input order
            pixel_values = next(iter(processed.values()))
        else:
            pixel_values = reorder_images(processed, grouped_index)
        return BatchFeature(
            data={"pixel_values": pixel_values, "stain_normalized": stain_normalized},
            tensor_type=return_tensors,
        )


def _group_indices(
    images: list[torch.Tensor], disable_grouping: bool
) -> tuple[dict[tuple, list[int]], dict[int, tuple]]:
    """``group_images_by_shape`` without stacking: image indices per (dtype, device, shape), or one group per
    image, and each image's (group, position) for ``reorder_images``."""
    groups = (
        {(index,): [index] for index in range(len(images))} if disable_grouping else _group_by_shape(images)
    )
    grouped_index = {
        index: (key, position) for key, indices in groups.items() for position, index in enumerate(indices)
    }
    return groups, grouped_index


def _is_rgb_uint8_batch(images, input_data_format) -> bool:
    return (
        isinstance(images, torch.Tensor)
        and images.dim() == 4
        and images.shape[1] == 3
        and images.dtype == torch.uint8
        and (input_data_format is None or ChannelDimension(input_data_format) == ChannelDimension.FIRST)
    )


def _stacked_off_cpu(group: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
    return group if group[0].device.type == "cpu" else torch.stack(group)


def _on_device(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``images`` moved to ``device``. CPU images bound for a GPU go per (shape, dtype) as one stacked copy from
    pinned memory, which the host does not wait for: one transfer per group instead of one per image (the
    caching host allocator keeps the pinned block until the copy is done)."""
    moved = list(images)
    for indices in _group_by_shape(images).values():
        first = images[indices[0]]
        if first.device == device or first.device.type != "cpu" or device.type == "cpu" or len(indices) == 1:
            for index in indices:
                moved[index] = images[index].to(device)
            continue
        pinned = device.type == "cuda"
        staging = torch.empty((len(indices), *first.shape), dtype=first.dtype, pin_memory=pinned)
        torch.stack([images[index] for index in indices], out=staging)
        uploaded = staging.to(device, non_blocking=pinned)
        for index, image in zip(indices, uploaded.unbind(0), strict=True):
            moved[index] = image
    return moved


def _flatten_images(images) -> list:
    """A flat list of single images from an image, a batch (4-D), or (nested) lists of those."""
    if is_pil_image(images):
        return [images]
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if hasattr(images, "ndim") and hasattr(images, "shape"):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ValueError(
            f"an image must have 2 to 4 dimensions (H×W, H×W×C, C×H×W or a batch); got {images.shape}"
        )
    raise TypeError(f"unsupported image type {type(images).__name__}; use PIL, numpy or torch images")


def _channels_first(tensor: torch.Tensor, image_type: ImageType, input_data_format) -> bool:
    if tensor.dim() == 2:
        return True
    if input_data_format is not None:
        return ChannelDimension(input_data_format) == ChannelDimension.FIRST
    first, last = tensor.shape[0] in (1, 2, 3, 4), tensor.shape[-1] in (1, 2, 3, 4)
    if not (first or last):
        raise ValueError(
            f"cannot find the channel dimension of an image of shape {tuple(tensor.shape)}: expected 1 (grey), "
            "2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels first or last"
        )
    # numpy images are conventionally H×W×C and torch images C×H×W
    return first and not (image_type == ImageType.NUMPY and last)


def _to_0_255_scale(tensor: torch.Tensor, sixteen_bit: bool) -> torch.Tensor:
    """uint8 stays as it is (the fast, exact Macenko path); everything else becomes float32 on the 0..255 scale."""
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype == torch.bool:
        raise TypeError("boolean images are masks, not H&E images")
    if tensor.is_complex():
        raise TypeError(f"complex images are not supported (dtype {tensor.dtype})")
    if sixteen_bit:
        return tensor.to(torch.float32) / _SIXTEEN_BIT_DIVISOR
    values = tensor.to(torch.float32)
    if tensor.numel() == 0:
        raise ValueError(f"empty image of shape {tuple(tensor.shape)}")
    low, high = torch.aminmax(values)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise ValueError("the image contains NaN or infinite values; clean or drop it before preprocessing")
    if low < 0 or high > 255:
        raise ValueError(
            f"image values must lie in [0, 1] or [0, 255] (16-bit images as uint16); got [{float(low):.4g}, "
            f"{float(high):.4g}] with dtype {tensor.dtype}"
        )
    if tensor.is_floating_point() and high <= 1:  # a float image in [0, 1]
        values = values * 255.0
    return values


def _to_rgb(tensor: torch.Tensor, convert: bool) -> torch.Tensor:
    """C×H×W with 1 to 4 channels → 3 channels; alpha is composited over white (empty glass)."""
    channels = tensor.shape[0]
    if channels == 3:
        return tensor
    if not convert:
        raise ValueError(
            f"expected an RGB image (3 channels) with do_convert_rgb=False; got {channels} channels"
        )
    if channels not in (1, 2, 4):
        raise ValueError(f"expected 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels; got {channels}")
    color, alpha = (tensor[:1], None) if channels == 1 else (tensor[:-1], tensor[-1:])
    if alpha is not None and not bool((alpha == 255).all()):
        weight = alpha.to(torch.float32) / 255.0
        color = color.to(torch.float32) * weight + 255.0 * (1.0 - weight)
    return color.expand(3, -1, -1) if color.shape[0] == 1 else color


ExaonePathImageProcessor.register_for_auto_class("AutoImageProcessor")
