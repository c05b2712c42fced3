"""The network DINO trains: the hub backbone (CLS feature) followed by the training-only projection head."""

from __future__ import annotations

from itertools import groupby

import torch
from torch import nn

__all__ = ["MultiCropNetwork"]


class MultiCropNetwork(nn.Module):
    """Runs the backbone once per crop resolution on the concatenated crops, then the head on all features.

    `backbone` is an `ExaonePathModel`: its `pooler_output` (CLS after the final norm) is the feature the
    released model exposes, so the exported teacher backbone yields exactly what was trained.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = []
        start = 0
        for _, group in groupby(crops, key=lambda crop: tuple(crop.shape[-2:])):
            count = len(list(group))
            batch = torch.cat(crops[start : start + count])
            features.append(self.backbone(pixel_values=batch).pooler_output)
            start += count
        return self.head(torch.cat(features))
