"""Training checkpoints (explicit, atomic `step_N` folders, last K kept) and the teacher backbone export."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ...atomic_io import publish_directory

__all__ = ["TrainState", "export_backbone", "latest_checkpoint", "save_checkpoint"]

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """Counters restored on resume (registered with `accelerator.register_for_checkpointing`).

    `streams` holds every rank's data-stream position (gathered before saving: Accelerate writes custom
    objects from the main process only), indexed by rank.
    """

    step: int = 0
    images_seen: int = 0
    macenko_fallbacks: int = 0
    unreadable_images: int = 0
    streams: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "macenko_fallbacks": self.macenko_fallbacks,
            "unreadable_images": self.unreadable_images,
            "streams": self.streams,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.images_seen = int(state["images_seen"])
        self.macenko_fallbacks = int(state["macenko_fallbacks"])
        self.unreadable_images = int(state["unreadable_images"])
        self.streams = list(state["streams"])


def checkpoint_steps(checkpoint_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in `checkpoint_dir`, ascending (temporary folders are ignored)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(steps)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    steps = checkpoint_steps(checkpoint_dir)
    return Path(checkpoint_dir) / f"step_{steps[-1]}" if steps else None


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: str | Path, step: int, keep_last: int) -> Path:
    """Every rank writes into `.step_N.tmp`; the main process publishes it as `step_N` and prunes old ones.

    The staging name is deterministic (not `atomic_directory`'s unique one) because every rank must write its
    share of the state into the same folder. A run killed mid-save leaves only a temporary folder that
    `latest_checkpoint` ignores, so the previous checkpoint stays the one to resume from.
    """
    root = Path(checkpoint_dir)
    final = root / f"step_{step}"
    staging = root / f".step_{step}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_directory(staging, final)  # re-saving a step after a resume replaces the old state
        for old in checkpoint_steps(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(root / f"step_{old}", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


#: What the pretraining export's card says its weights are (`convert.architecture_card` claims no licence).
TRAINED_MODEL_ABOUT = """\
A backbone pretrained with [exaonepath-hf](https://github.com/exaonepath-hf/exaonepath-hf)'s DINO recipe
(arXiv 2408.00380): Macenko stain normalization of every patch before the DINO augmentations. These are not the
released EXAONEPath weights; the licence is the author's choice, within that of the initialization weights.
The processor carries the stain reference used in training (`preprocessor_config.json`).
"""


def export_backbone(
    backbone,
    out_dir: str | Path,
    stain_reference,
    push_to_hub: str | None = None,
    private: bool = True,
    training_config: dict | None = None,
) -> Path:
    """Write the backbone with an image processor carrying the training stain reference, atomically.

    The folder loads with `AutoModel` / `AutoImageProcessor` (after `import exaonepath_hf`, or with
    `trust_remote_code=True` from the hub) and has a model card with `training_config`. `push_to_hub` uploads
    the folder to that model repo id.
    """
    from ...convert import architecture_card, push_folder_to_hub, save_folder
    from ...image_processing_exaonepath import ExaonePathImageProcessor

    processor = ExaonePathImageProcessor(stain_reference=stain_reference.to_dict())
    config_text = json.dumps(training_config or {}, indent=2, default=str)
    card = architecture_card(
        "EXAONEPath-architecture ViT pretrained with DINO",
        TRAINED_MODEL_ABOUT,
        tags=("pathology", "histopathology", "vision-transformer", "dino", "macenko", "exaonepath"),
        details=f"## Training configuration\n\n```json\n{config_text}\n```",
    )
    out_dir = save_folder(backbone, out_dir, processor=processor, overwrite=True, model_card=card)
    if push_to_hub:  # a failed upload is one ValueError saying how to upload the folder later
        push_folder_to_hub(
            out_dir,
            push_to_hub,
            private=private,
            commit_message="Upload EXAONEPath backbone pretrained with DINO",
        )
    return out_dir
