"""Input checks shared by the neighbour search and the metrics: features as an L2-normalized [N, D] tensor, one
value per sample, groups as integer codes. Bad input raises ``ValueError`` naming it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["group_codes", "per_sample", "unit_features"]


def unit_features(features: Any, name: str = "features") -> torch.Tensor:
    """L2-normalized [N, D] float tensor on the features' device (float64 stays float64)."""
    x = torch.as_tensor(features.detach() if isinstance(features, torch.Tensor) else np.asarray(features))
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d [N, D] array, got shape {tuple(x.shape)}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(
            f"{name} needs at least 2 samples of at least 1 dimension, got shape {tuple(x.shape)}"
        )
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers, got {x.dtype}")
    x = x.double() if x.dtype == torch.float64 else x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contain NaN or infinite values; check the feature extraction")
    return torch.nn.functional.normalize(x, dim=1)


def per_sample(values: Any, name: str, n: int) -> np.ndarray:
    """``values`` as a 1-d numpy array of one value per sample (n of them)."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 1 or len(array) != n:
        raise ValueError(f"{name} must hold one value per sample ({n}), got shape {array.shape}")
    return array


def group_codes(values: np.ndarray) -> np.ndarray:
    """Integer codes 0..G-1 of the distinct values (mixed-type object arrays compared as strings)."""
    if values.dtype == object:
        values = values.astype(str)
    return np.unique(values, return_inverse=True)[1].reshape(-1)
