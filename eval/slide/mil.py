"""Multiple-instance heads for slide-level prediction from patch-feature bags, and the collate that pads bags.

Both heads take a padded batch of bags, features [B, N, D] and a boolean mask [B, N] (True on real patches),
and return a `MILOutput`:

- `MeanPoolingHead`: the masked mean of the patch features, then a linear classifier (the field's baseline,
  TRIDENT's `mean-<encoder>`).
- `GatedAttentionHead`: gated attention MIL (Ilse, Tomczak, Welling, ICML 2018),
  a_k = softmax_k(wᵀ(tanh(V h_k) ⊙ σ(U h_k))), z = Σ_k a_k h_k, then a linear classifier. Padding gets
  exactly zero attention (its scores are -inf before the softmax), so a bag's prediction does not depend on
  how much padding its batch needed.

`BagCollator` pads bags of different sizes into one batch and, for training, samples at most `max_patches`
patches per bag without replacement (eva's fixed number of patches per slide), keeping each kept patch's
index in its bag so attention can be mapped back to the slide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

__all__ = ["MILOutput", "MeanPoolingHead", "GatedAttentionHead", "BagCollator", "HEADS", "build_head"]


@dataclass
class MILOutput(ModelOutput):
    """logits [B, C]; embedding [B, D] (the pooled bag); attention [B, N] (attention head; 0 on padding)."""

    logits: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    attention: torch.Tensor | None = None


def _check_bags(features: torch.Tensor, mask: torch.Tensor) -> None:
    if features.ndim != 3 or mask.shape != features.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"expected features [B, N, D] and a boolean mask [B, N]; got {tuple(features.shape)} and "
            f"{tuple(mask.shape)} {mask.dtype}"
        )
    if not mask.any(dim=1).all():
        raise ValueError("a bag in the batch has no patches (its mask row is all False)")


class MeanPoolingHead(nn.Module):
    """Masked mean over the patches of each bag, optional dropout, then a linear classifier."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, num_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        _check_bags(features, mask)
        weights = mask.to(features.dtype)
        embedding = (features * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        return MILOutput(logits=self.classifier(self.dropout(embedding)), embedding=embedding)


class GatedAttentionHead(nn.Module):
    """Gated attention MIL (Ilse et al., 2018) with a linear classifier on the attention-pooled embedding.

    `hidden_dim` is the size of V and U (L in the paper); `dropout` acts on the gated attention features
    and on the pooled embedding before the classifier.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.attention_v = nn.Linear(in_dim, hidden_dim)
        self.attention_u = nn.Linear(in_dim, hidden_dim)
        self.attention_w = nn.Linear(hidden_dim, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, num_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        _check_bags(features, mask)
        gated = torch.tanh(self.attention_v(features)) * torch.sigmoid(self.attention_u(features))
        scores = self.attention_w(self.dropout(gated)).squeeze(-1)  # [B, N]
        attention = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        embedding = torch.bmm(attention.unsqueeze(1), features).squeeze(1)
        return MILOutput(
            logits=self.classifier(self.dropout(embedding)), embedding=embedding, attention=attention
        )


HEADS = {"mean": MeanPoolingHead, "abmil": GatedAttentionHead}


def build_head(
    name: str, in_dim: int, num_classes: int, hidden_dim: int = 128, dropout: float = 0.0
) -> nn.Module:
    """The head `name` ("mean" or "abmil") for `in_dim`-d features and `num_classes` classes."""
    if name == "mean":
        return MeanPoolingHead(in_dim, num_classes, dropout=dropout)
    if name == "abmil":
        return GatedAttentionHead(in_dim, num_classes, hidden_dim=hidden_dim, dropout=dropout)
    raise ValueError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")


@dataclass
class BagCollator:
    """Pads bags (dicts with `features` [N_i, D], `label`, `index`) into one batch.

    Returns `features` [B, N, D] float32, `mask` [B, N] bool, `labels` [B], `indices` [B] (the items'
    `index`) and `patch_indices` [B, N] (each kept patch's row in its bag, -1 on padding). With
    `max_patches`, a larger bag contributes a random subset of that many patches (drawn with `generator`),
    kept in bag order.
    """

    max_patches: int | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.max_patches is not None and self.max_patches < 1:
            raise ValueError(f"max_patches must be at least 1 (or None for all), got {self.max_patches}")

    def _keep(self, count: int) -> torch.Tensor:
        if self.max_patches is None or count <= self.max_patches:
            return torch.arange(count)
        return torch.randperm(count, generator=self.generator)[: self.max_patches].sort().values

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        kept = [self._keep(len(item["features"])) for item in items]
        dims = {tuple(item["features"].shape[1:]) for item in items}
        if len(dims) != 1:
            raise ValueError(f"bags of one batch have different feature shapes {sorted(dims)}")
        if any(len(k) == 0 for k in kept):
            raise ValueError("a bag has no patches")
        longest = max(len(k) for k in kept)
        (dim,) = dims.pop()
        features = torch.zeros(len(items), longest, dim, dtype=torch.float32)
        mask = torch.zeros(len(items), longest, dtype=torch.bool)
        patch_indices = torch.full((len(items), longest), -1, dtype=torch.long)
        for row, (item, keep) in enumerate(zip(items, kept, strict=True)):
            bag = torch.as_tensor(item["features"])
            features[row, : len(keep)] = bag[keep] if len(keep) < len(bag) else bag
            mask[row, : len(keep)] = True
            patch_indices[row, : len(keep)] = keep
        return {
            "features": features,
            "mask": mask,
            "labels": torch.tensor([int(item["label"]) for item in items], dtype=torch.long),
            "indices": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
            "patch_indices": patch_indices,
        }
