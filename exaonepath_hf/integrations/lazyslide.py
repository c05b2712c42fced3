"""lazyslide (0.13, whose models live in the lazyslide-models package): EXAONEPath as an `ImageModel` that runs
the model folder's own processor on the uint8 tiles lazyslide reads, instead of lazyslide's default transform
(resize to 224, ImageNet mean/std, no Macenko)::

    register_lazyslide()  # once per process
    zs.tl.feature_extraction(wsi, "exaonepath", model_path="exaonepath-vitb16")

or `zs.tl.feature_extraction(wsi, lazyslide_model("exaonepath-vitb16"))` without registering.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from .encoder import ProcessorEncoder

__all__ = ["LAZYSLIDE_KEY", "lazyslide_model", "register_lazyslide", "tile_to_tensor"]

#: The name `register_lazyslide` gives the model in lazyslide's registry by default.
LAZYSLIDE_KEY = "exaonepath"


def tile_to_tensor(tile: np.ndarray) -> torch.Tensor:
    """A tile as lazyslide reads it (H×W×C uint8) → C×H×W uint8, values untouched: the processor does the rest.
    A module-level function, so that lazyslide's loader workers can pickle it."""
    return torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)


@functools.cache
def _image_model_class() -> type:
    """The `ImageModel` subclass, defined on first use: its base class comes from lazyslide-models."""
    try:
        from lazyslide_models import ImageModel
    except ImportError as error:
        raise ImportError("the lazyslide integration needs lazyslide>=0.13: pip install lazyslide") from error

    class ExaonePathImageModel(ImageModel):
        """EXAONEPath features of lazyslide tiles, with the model folder's own preprocessing (Macenko first)."""

        def __init__(
            self,
            model_path: str | os.PathLike | None = None,
            token: str | None = None,
            dtype: str | torch.dtype | None = None,
        ) -> None:
            if model_path is None:
                raise ValueError(
                    "the EXAONEPath lazyslide model needs model_path=: a model folder (exaonepath-convert writes "
                    "one) or a hub id"
                )
            self.model = ProcessorEncoder(model_path, dtype=dtype, token=token)

        @property
        def name(self) -> str:
            return LAZYSLIDE_KEY

        def get_transform(self):
            return tile_to_tensor

        @torch.inference_mode()
        def encode_image(self, image: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return self.model(image)

    return ExaonePathImageModel


def lazyslide_model(
    model_name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = None, token: str | None = None
):
    """An `ImageModel` for `zs.tl.feature_extraction(wsi, model)`: the folder's processor, then its model."""
    return _image_model_class()(model_path=model_name_or_path, token=token, dtype=dtype)


def register_lazyslide(key: str = LAZYSLIDE_KEY) -> type:
    """Register the model in lazyslide's registry under `key` (idempotent); then
    `zs.tl.feature_extraction(wsi, key, model_path=FOLDER_OR_HUB_ID)` loads it. Returns the class."""
    from lazyslide_models import MODEL_REGISTRY, ModelTask, register

    model_class = _image_model_class()
    if MODEL_REGISTRY.get(key) is not model_class:
        register(
            key=key,
            task=ModelTask.vision,
            description="EXAONEPath (or a ViT of its architecture) with its own Macenko preprocessing",
            paper_url="https://arxiv.org/abs/2408.00380",
        )(model_class)
    return model_class
