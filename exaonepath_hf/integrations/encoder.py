"""A module that takes raw images and returns EXAONEPath features, running the folder's own processor first."""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModel

__all__ = ["ProcessorEncoder"]


class ProcessorEncoder(nn.Module):
    """Raw images in, features out: the model folder's `AutoImageProcessor` (Macenko with the folder's stain
    reference → resize → crop → normalize), then its `AutoModel`; the feature is `pooler_output` (the CLS token
    after the final LayerNorm).

    `forward` takes what frameworks hand a backbone: a uint8 N×3×H×W batch (0..255), a float batch in [0, 1]
    (e.g. after `ToDtype(scale=True)`), or anything else the processor accepts (a list of PIL images, numpy
    arrays). Not inputs that were already normalized with a mean and std: Macenko needs the pixels. Images that
    Macenko cannot normalize (background) pass through unchanged and are counted in `stain_fallbacks`.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        dtype: str | torch.dtype | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__()
        self.processor = AutoImageProcessor.from_pretrained(model_name_or_path, token=token)
        self.model = AutoModel.from_pretrained(model_name_or_path, dtype=dtype, token=token).eval()
        self.stain_fallbacks = 0

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    def forward(self, images: torch.Tensor | list) -> torch.Tensor:
        parameter = next(self.model.parameters())
        if isinstance(images, torch.Tensor):
            # frameworks hand tv_tensors; the processor wants plain tensors
            images = images.as_subclass(torch.Tensor)
            if images.is_floating_point() and images.numel() and images.min() < 0:
                raise ValueError(
                    "the images are mean/std-normalized; give the EXAONEPath backbone raw pixels (uint8, or float "
                    "in [0, 1]): its processor applies Macenko, resize, crop and normalization itself"
                )
        inputs = self.processor(images, return_tensors="pt", device=parameter.device)
        self.stain_fallbacks += int((~inputs["stain_normalized"]).sum())
        pixel_values = inputs["pixel_values"].to(parameter.device, parameter.dtype)
        return self.model(pixel_values=pixel_values).pooler_output
