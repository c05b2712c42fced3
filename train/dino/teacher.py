"""The EMA teacher: a frozen copy of the student updated as teacher ← m·teacher + (1−m)·student."""

from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

__all__ = ["build_teacher", "ema_update", "weights_digest"]


def build_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of the (unwrapped) student that takes no gradients and stays in eval mode (no drop path).

    Build it after `accelerator.prepare`: DDP broadcasts rank 0's student weights when wrapping, so a teacher
    copied before that would differ between ranks.
    """
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In-place EMA of every student parameter into the teacher parameter of the same name.

    Parameters frozen in the student (the head's fixed weight-norm gain) are averaged too; they are equal in
    both networks, so the average leaves them unchanged.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"teacher momentum must lie in [0, 1], got {momentum}")
    student_params = dict(student.named_parameters())
    teacher_params = dict(teacher.named_parameters())
    if student_params.keys() != teacher_params.keys():
        missing = sorted(student_params.keys() ^ teacher_params.keys())[:5]
        raise ValueError(
            f"teacher and student parameters differ (e.g. {missing}); build the teacher from the student"
        )
    names = list(student_params)
    targets = [teacher_params[n] for n in names]
    sources = [student_params[n].detach() for n in names]
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, sources, alpha=1.0 - momentum)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (bit-exact comparison of networks across processes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
