"""EXAONEPath pretraining: DINO on Macenko-normalized patches with Accelerate, from one CPU to 10 nodes x 8 GPUs.

    # 2 CPU processes, tiny ViT, a few minutes (gloo; no GPU needed)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        train/pretrain_dino.py --config train/configs/cpu_smoke.yaml data.source=../shared/data/crc-val-he-7k-samples
    # one GPU / one node of 8 GPUs
    accelerate launch --config_file train/accelerate_configs/single_gpu.yaml train/pretrain_dino.py \
        --config train/configs/one_gpu.yaml data.source=/data/tiles model.init_weights=/models/vit_b16_imagenet
    accelerate launch --config_file train/accelerate_configs/8_gpus.yaml train/pretrain_dino.py --config ...
    # the paper: 10 nodes x 8 A100, batch 5,120; run on every node with its rank
    accelerate launch --config_file train/accelerate_configs/multi_node.yaml --machine_rank $NODE_RANK \
        --main_process_ip $HEAD_NODE train/pretrain_dino.py --config train/configs/paper.yaml data.source=...
    # continue exactly from the newest checkpoint / only export the teacher of the newest checkpoint
    ... train/pretrain_dino.py --config ... --resume
    ... train/pretrain_dino.py --config ... --export_only --push_to_hub my-org/exaonepath-dino

Any `section.key=value` argument overrides the YAML (e.g. run.max_steps=100 data.num_workers=4).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from ..configuration_exaonepath import ExaonePathConfig
from ..modeling_exaonepath import ExaonePathModel
from ..atomic_io import write_json
from ..convert import load_backbone
from ..stain_normalization import DEFAULT_STAIN_REFERENCE, MacenkoNormalizer, StainReference
from .dino import data as dino_data
from .dino.augmentations import DINOMultiCrop
from .dino.checkpoint import TrainState, export_backbone, latest_checkpoint, save_checkpoint
from .dino.config import PretrainConfig, load_config
from .dino.head import DINOHead
from .dino.loss import DINOLoss
from .dino.model import MultiCropNetwork
from .dino.optim import (
    clip_gradients_per_parameter,
    freeze_last_layer_gradients,
    parameter_groups,
    set_optimizer_hyperparameters,
)
from .dino.teacher import build_teacher, ema_update, weights_digest

logger = logging.getLogger("pretrain_dino")


class NonFiniteLossError(RuntimeError):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML file (train/configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--export_only", action="store_true", help="export the newest checkpoint's teacher")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload the exported backbone")
    parser.add_argument(
        "--stop_at_step",
        type=int,
        help="checkpoint and exit at this step (schedules still span the whole run)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the YAML")
    return parser.parse_args(argv)


def stain_reference_from_config(value) -> StainReference:
    if value is None:
        return DEFAULT_STAIN_REFERENCE
    if isinstance(value, dict):
        return StainReference.from_dict(value)
    # A target image: the reference is fitted on it, like the release's 4096² TCGA target.
    return MacenkoNormalizer().fit(dino_data.decode_image({"path": value, "bytes": None}))


def build_student(cfg: PretrainConfig) -> MultiCropNetwork:
    m = cfg.model
    config = ExaonePathConfig(
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        mlp_ratio=m.mlp_ratio,
        patch_size=m.patch_size,
        image_size=m.image_size,
        drop_path_rate=m.drop_path_rate,
    )
    backbone = load_backbone(m.init_weights, config=config) if m.init_weights else ExaonePathModel(config)
    head = DINOHead(
        m.hidden_size,
        m.out_dim,
        m.head_hidden_dim,
        m.head_bottleneck_dim,
        m.head_num_layers,
        m.norm_last_layer,
    )
    return MultiCropNetwork(backbone.train(), head)


def launched_on_cpus_only() -> bool:
    """A multi-process launch on a machine without an accelerator (e.g. `accelerate launch --multi_gpu` on CPUs).

    Accelerate 1.x then makes every process an independent single-process run unless `cpu=True`, which selects
    the gloo backend; the launcher resets ACCELERATE_USE_CPU, so the script must ask for it.
    """
    devices = getattr(torch, "accelerator", None)  # torch >= 2.6; CUDA only before
    has_accelerator = devices.is_available() if devices is not None else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator


def train_step(
    accelerator, student, teacher, dino_loss, optimizer, batches, values, cfg
) -> tuple[torch.Tensor, list, float]:
    """One optimizer step over `gradient_accumulation_steps` batches.

    Returns the loss and counts summed over ranks ([loss, images, Macenko fallbacks, unreadable]), the ids this
    rank trained on, and the seconds spent waiting for data. Raises `NonFiniteLossError` before the update.
    """
    accum = cfg.run.gradient_accumulation_steps
    unwrapped = accelerator.unwrap_model(student)
    local = torch.zeros(4, device=accelerator.device)
    ids, wait = [], 0.0
    for micro in range(accum):
        before = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - before
        crops = [crop.to(accelerator.device, non_blocking=True) for crop in batch["crops"]]
        with torch.no_grad(), accelerator.autocast():  # only prepared models are autocast for us
            teacher_output = teacher(crops[:2])
        with nullcontext() if micro == accum - 1 else accelerator.no_sync(student):
            loss = dino_loss(student(crops), teacher_output, values.teacher_temp)
            accelerator.backward(loss / accum)
        counts = [len(batch["ids"]), batch["macenko_fallbacks"], batch["unreadable"]]
        local += torch.stack(
            [loss.detach() / accum, *(torch.tensor(float(c), device=local.device) for c in counts)]
        )
        ids.extend(batch["ids"])
    totals = accelerator.reduce(local, reduction="sum")
    if not math.isfinite(totals[0].item()):
        raise NonFiniteLossError(f"loss is {totals[0].item() / accelerator.num_processes}")
    if values.freeze_last_layer:
        freeze_last_layer_gradients(unwrapped.head)
    clip_gradients_per_parameter(student.parameters(), cfg.optim.clip_grad)
    set_optimizer_hyperparameters(optimizer, values.lr, values.weight_decay)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(teacher, unwrapped, values.teacher_momentum)
    return totals, ids, wait


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = Path(cfg.run.output_dir)
    accelerator = Accelerator(
        cpu=launched_on_cpus_only(),
        mixed_precision=cfg.run.mixed_precision,
        log_with="tensorboard",
        project_dir=out,
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(cfg.run.seed, device_specific=True)  # ranks draw different drop-path masks

    student = build_student(cfg)
    optimizer = torch.optim.AdamW(parameter_groups(student), lr=0.0, betas=cfg.optim.betas)
    student, optimizer = accelerator.prepare(student, optimizer)
    teacher = build_teacher(
        accelerator.unwrap_model(student)
    )  # after prepare: all ranks copy the same weights
    transform = DINOMultiCrop(cfg.augmentations)
    dino_loss = DINOLoss(
        cfg.model.out_dim, transform.num_crops, 2, cfg.loss.student_temp, cfg.loss.center_momentum
    ).to(accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(teacher, dino_loss, state)

    checkpoints = out / "checkpoints"
    newest = latest_checkpoint(checkpoints) if args.resume or args.export_only else None
    if newest is not None:
        accelerator.load_state(str(newest))
        logger.info("resumed from %s (step %d)", newest, state.step)
    elif args.export_only:
        raise FileNotFoundError(f"no step_N checkpoint in {checkpoints} to export")
    elif args.resume:  # the same command can start a job and requeue it after a preemption
        logger.warning("--resume: no checkpoint in %s yet, starting from scratch", checkpoints)
    reference = stain_reference_from_config(cfg.data.stain_reference)
    if args.export_only:
        return export(cfg, accelerator, teacher, reference, args.push_to_hub)

    batches, num_samples = dino_data.build_rank_loader(
        cfg.data, transform, MacenkoNormalizer(reference) if cfg.data.stain_normalize else None,
        cfg.run.batch_size_per_device, cfg.run.seed, accelerator.process_index, accelerator.num_processes,
        state.streams, pin_memory=accelerator.device.type == "cuda",
    )  # fmt: skip
    global_batch = (
        cfg.run.batch_size_per_device * accelerator.num_processes * cfg.run.gradient_accumulation_steps
    )
    if cfg.run.max_steps is None and not num_samples:
        raise ValueError(
            "the number of samples of this source is unknown: set data.num_samples or run.max_steps"
        )
    steps_per_epoch = max(1, (num_samples or global_batch) // global_batch)
    total_steps = cfg.run.max_steps or max(1, round(cfg.run.epochs * steps_per_epoch))
    schedules = cfg.schedules(global_batch, steps_per_epoch, total_steps)
    accelerator.init_trackers("dino", config=cfg.flat())
    logger.info(
        "%d steps (%d per epoch), global batch %d, peak lr %.3g, %d loader workers per rank",
        total_steps, steps_per_epoch, global_batch, schedules.lr, batches.state.num_workers,
    )  # fmt: skip

    stop_at = min(args.stop_at_step or total_steps, total_steps)
    seen_ids: list[str] = []
    bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_main_process, desc="dino")
    window = {"time": 0.0, "wait": 0.0, "images": 0.0}
    while state.step < stop_at:
        values = schedules.at(state.step)
        tick = time.perf_counter()
        try:
            totals, ids, wait = train_step(
                accelerator, student, teacher, dino_loss, optimizer, batches, values, cfg
            )
        except NonFiniteLossError as error:
            raise NonFiniteLossError(
                f"{error} at step {state.step}; stopped before the update. The last good checkpoint is "
                f"{latest_checkpoint(checkpoints)}. Usual causes: fp16 (use bf16 or no), too high an lr."
            ) from None
        state.step += 1
        images, fallbacks, unreadable = (int(v) for v in totals[1:].tolist())
        state.images_seen += images
        state.macenko_fallbacks += fallbacks
        state.unreadable_images += unreadable
        if cfg.run.record_samples:
            seen_ids.extend(ids)
        window["time"] += time.perf_counter() - tick
        window["wait"] += wait
        window["images"] += images
        bar.update(1)
        if state.step % cfg.run.log_every == 0 or state.step == stop_at:
            loss = totals[0].item() / accelerator.num_processes
            metrics = {
                "loss": loss,
                "lr": values.lr,
                "weight_decay": values.weight_decay,
                "teacher_momentum": values.teacher_momentum,
                "teacher_temp": values.teacher_temp,
                "images_per_s": window["images"] / window["time"],
                "data_wait_fraction": window["wait"] / window["time"],
                "macenko_fallbacks": state.macenko_fallbacks,
                "unreadable_images": state.unreadable_images,
                "epoch": state.step / steps_per_epoch,
            }
            accelerator.log(metrics, step=state.step)
            if accelerator.is_main_process:  # also plain JSON lines, for scripts and tests
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": state.step, **metrics}) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
            window = {"time": 0.0, "wait": 0.0, "images": 0.0}
        if state.step % cfg.run.checkpoint_every == 0 or state.step == stop_at:
            state.streams = gather_object([batches.state.to_dict()])
            save_checkpoint(accelerator, checkpoints, state.step, cfg.run.keep_last_checkpoints)
    bar.close()

    if cfg.run.record_samples:
        write_rank_record(out, accelerator.process_index, seen_ids, teacher, dino_loss)
    if state.step >= total_steps:
        export(cfg, accelerator, teacher, reference, args.push_to_hub)
    accelerator.end_training()
    return 0


def export(cfg, accelerator, teacher, reference, push_to_hub: str | None) -> int:
    if accelerator.is_main_process:
        target = Path(cfg.run.export_dir or Path(cfg.run.output_dir) / "export")
        export_backbone(
            teacher.backbone,
            target,
            reference,
            push_to_hub or cfg.run.push_to_hub,
            cfg.run.hub_private,
            training_config=cfg.to_dict(),
        )
        logger.info("exported the teacher backbone to %s", target)
    accelerator.wait_for_everyone()
    return 0


def write_rank_record(out: Path, rank: int, ids: list[str], teacher, dino_loss) -> None:
    """Which samples this rank trained on and hashes of its teacher and center (for sharding and sync checks)."""
    record = {
        "rank": rank,
        "teacher_sha256": weights_digest(teacher),
        "center_sha256": weights_digest(dino_loss),
        "samples": ids,
    }
    write_json(out / f"rank_{rank}.json", record)


if __name__ == "__main__":
    sys.exit(main())
