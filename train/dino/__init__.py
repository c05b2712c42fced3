"""DINO pretraining parts: head, loss, schedules, EMA teacher, multi-crop augmentations, streaming data,
checkpoints. `loop` runs them with Accelerate; `exaonepath_hf.train.pretrain_dino` is the command."""

from .augmentations import AugmentationConfig, DINOMultiCrop
from .config import PretrainConfig, load_config
from .head import DINOHead
from .loss import DINOLoss
from .model import MultiCropNetwork
from .schedules import DINOSchedules, cosine_schedule
from .teacher import build_teacher, ema_update

__all__ = [
    "AugmentationConfig",
    "DINOHead",
    "DINOLoss",
    "DINOMultiCrop",
    "DINOSchedules",
    "MultiCropNetwork",
    "PretrainConfig",
    "build_teacher",
    "cosine_schedule",
    "ema_update",
    "load_config",
]
