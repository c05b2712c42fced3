"""kaiko-eva: a backbone that runs the model folder's own processor, for `eva.models.ModelFromFunction`.

eva's stock backbones get images that eva's dataset transforms resized (bilinear, to 224) and normalized, with no
Macenko. This backbone wants the dataset's raw images instead (the dataset's `transforms` left out or only
`ToImage`/`ToDtype(scale=True)`); in a config::

    backbone:
      class_path: eva.models.ModelFromFunction
      init_args:
        path: exaonepath_hf.integrations.eva_backbone
        arguments:
          model_name_or_path: exaonepath-vitb16
"""

from __future__ import annotations

from torch import nn

from .encoder import ProcessorEncoder

__all__ = ["eva_backbone"]


def eva_backbone(model_name_or_path: str, dtype: str | None = None, token: str | None = None) -> nn.Module:
    """A module mapping a batch of raw images (uint8 0..255, or float in [0, 1]) to (N, hidden) features with
    the folder's own preprocessing; eva calls it with the `arguments` of `ModelFromFunction` (`dtype` as
    transformers spells it: "bfloat16", "auto"). eva itself is not imported: this only builds a torch module."""
    return ProcessorEncoder(model_name_or_path, dtype=dtype, token=token)
