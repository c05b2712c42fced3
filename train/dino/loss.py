"""The DINO self-distillation loss with its centering buffer synchronised across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over every pair of different views.

    `student_output` holds `num_crops` chunks of the batch (global crops first), `teacher_output` the 2 global
    chunks. The center is an EMA of the teacher outputs averaged over *all* ranks, so every rank keeps the same
    center; it is a buffer, so it is saved and restored with the module's state dict.
    Everything runs in fp32 whatever the autocast state.
    """

    def __init__(
        self,
        out_dim: int,
        num_crops: int,
        num_global_crops: int = 2,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if not 1 <= num_global_crops <= num_crops:
            raise ValueError(f"need 1 <= num_global_crops ({num_global_crops}) <= num_crops ({num_crops})")
        self.num_crops = num_crops
        self.num_global_crops = num_global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            student_output = student_output.float()
            teacher_output = teacher_output.detach().float()
            student_log_probs = F.log_softmax(student_output / self.student_temp, dim=-1).chunk(
                self.num_crops
            )
            teacher_probs = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)
            teacher_probs = teacher_probs.chunk(self.num_global_crops)

            total = student_output.new_zeros(())
            num_pairs = 0
            for teacher_view, q in enumerate(teacher_probs):
                for student_view, log_p in enumerate(student_log_probs):
                    if student_view == teacher_view:
                        continue
                    total = total + torch.sum(-q * log_p, dim=-1).mean()
                    num_pairs += 1
            self.update_center(teacher_output)
        return total / num_pairs

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        # One collective for the sum and the row count (ranks may hold different batch sizes). The count is
        # filled on the device: a tensor made from a Python list would be a blocking host-to-device copy.
        teacher_output = teacher_output.float()
        rows = teacher_output.new_full((1,), teacher_output.shape[0])
        packed = torch.cat([teacher_output.sum(dim=0), rows])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        batch_center = (packed[:-1] / packed[-1]).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
