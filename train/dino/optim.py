"""Optimizer parameter groups and DINO's gradient surgery (per-parameter clipping, last-layer freeze)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = [
    "REGULARIZED_GROUP",
    "build_optimizer",
    "clip_gradients_per_parameter",
    "freeze_last_layer_gradients",
    "parameter_groups",
    "set_optimizer_hyperparameters",
]

REGULARIZED_GROUP = 0


def parameter_groups(model: nn.Module) -> list[dict]:
    """Weight decay on matrices only: biases and 1-D parameters (norms, gains, tokens' scales) are not decayed."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    # Group order is relied on by `set_optimizer_hyperparameters`.
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over `parameter_groups(model)` (lr and weight decay are set every step by the schedules).

    Fused (one kernel for all parameters) when every parameter is on CUDA: the foreach implementation
    launches several kernels per parameter group and step. Elsewhere torch's default, as before.
    """
    groups = parameter_groups(model)
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, fused=True if on_cuda else None)


def set_optimizer_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Apply this step's scheduled values (a prepared LR scheduler would step once per process instead)."""
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if index == REGULARIZED_GROUP:
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """DINO's clipping: every parameter's gradient is rescaled to L2 norm <= max_norm on its own.

    Not the global norm: one exploding layer does not shrink the updates of the others.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    # multi-tensor kernels: a few launches per step rather than a few per parameter
    scales = torch._foreach_norm(grads, 2.0)
    torch._foreach_add_(scales, 1e-6)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, max_norm)
    torch._foreach_clamp_max_(scales, 1.0)
    torch._foreach_mul_(grads, scales)


def freeze_last_layer_gradients(head: nn.Module) -> None:
    """Drop the last layer's gradients: with `grad=None` AdamW neither updates nor decays it this step."""
    for param in head.last_layer.parameters():
        param.grad = None
