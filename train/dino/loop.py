"""The DINO training loop with Accelerate: the parts of a run (`build_training`), one optimizer step
(`train_step`), checkpoints, logging and export; `pretrain(cfg, options)` runs a whole one. The command
(`train/pretrain_dino.py`, `exaonepath-pretrain`) parses and calls `pretrain`."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import nn

from ...atomic_io import write_json
from ...convert import load_backbone
from ...hub import require_hub
from ...modeling_exaonepath import ExaonePathModel
from ...progress import progress_bar
from ...stain_normalization import DEFAULT_STAIN_REFERENCE, MacenkoNormalizer, StainReference
from . import data as dino_data
from .checkpoint import TrainState, export_backbone, latest_checkpoint, save_checkpoint
from .config import PretrainConfig, RunConfig
from .gpu_augment import Augmentation, build_augmentation
from .head import DINOHead
from .loss import DINOLoss
from .model import MultiCropNetwork
from .optim import (
    build_optimizer,
    clip_gradients_per_parameter,
    freeze_last_layer_gradients,
    set_optimizer_hyperparameters,
)
from .run_folder import config_for_existing_run, save_run_config
from .schedules import DINOSchedules, ScheduleValues
from .teacher import build_teacher, ema_update, weights_digest

__all__ = [
    "NonFiniteLossError",
    "RunOptions",
    "build_student",
    "build_training",
    "pretrain",
    "train_step",
]

logger = logging.getLogger("pretrain_dino")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class RunOptions:
    """What a command asks of a run beyond its configuration."""

    resume: bool = False  # continue from the newest checkpoint, if any
    export_only: bool = False  # export the newest checkpoint's teacher and stop
    push_to_hub: str | None = None  # repo id; overrides run.push_to_hub
    stop_at_step: int | None = None  # checkpoint and exit here (schedules still span the whole run)


@dataclass
class TrainingParts:
    """Everything one optimizer step touches; built once per run by `build_training`."""

    accelerator: Accelerator
    student: nn.Module  # prepared (possibly DDP-wrapped) `MultiCropNetwork`
    teacher: MultiCropNetwork
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    augmentation: Augmentation  # where Macenko and the crops run (`data.augment_on`)
    state: TrainState
    checkpoints: Path


@dataclass(frozen=True)
class StepPlan:
    global_batch: int
    steps_per_epoch: int
    total_steps: int


@dataclass
class MetricsWindow:
    """Sums since the last logged step, for rates that describe the recent past rather than the whole run."""

    images_at_start: int  # the run's image counter when the window opened
    seconds: float = 0.0
    waiting: float = 0.0
    loss: float = 0.0  # sum of the steps' losses (host floats: the finiteness check read them anyway)
    steps: int = 0


@dataclass
class PendingCounts:
    """This rank's counts not yet added to the run's counters. They are summed over ranks, the one read of
    device values besides the loss, only at log and checkpoint steps (`add_pending_counts`)."""

    images: int = 0
    unreadable: int = 0
    macenko_fallbacks: int | torch.Tensor = 0  # a device tensor when Macenko runs on the device

    def add(self, images: int, macenko_fallbacks: int | torch.Tensor, unreadable: int) -> None:
        self.images += images
        self.macenko_fallbacks = self.macenko_fallbacks + macenko_fallbacks
        self.unreadable += unreadable


def pretrain(cfg: PretrainConfig, options: RunOptions = RunOptions()) -> int:
    """Train (or, with `options.export_only`, export) as `cfg` says; returns the exit code.

    Bad input stops the run before anything is built, with a ValueError, FileNotFoundError or FileExistsError
    of one line: a run folder holding checkpoints without `resume` or `export_only` (starting again at step 0
    would append repeated steps to its logs), a resume whose model differs from the run's saved config
    (`run_folder`), an unusable `data.source` (a hub id that cannot be read only once the data is opened), or
    a push while the hub cannot be reached. A fresh or resumed run saves its resolved config in its folder
    once its checkpoint is restored.
    """
    newest = latest_checkpoint(Path(cfg.run.output_dir) / "checkpoints")
    if newest is not None and not (options.resume or options.export_only):
        raise FileExistsError(
            f"{cfg.run.output_dir} holds checkpoints up to {newest.name}: rerun with --resume to continue "
            "from it, or choose another run.output_dir to start a new run"
        )
    if newest is not None:
        cfg = config_for_existing_run(cfg, export_only=options.export_only)
    if not options.export_only:
        dino_data.check_source(cfg.data.source)
    repo_id = options.push_to_hub or cfg.run.push_to_hub
    if repo_id:  # checked first: a run must not find out after days that its upload cannot happen
        require_hub(f"push the exported model to {repo_id}")
    accelerator = start_accelerator(cfg.run)
    reference = stain_reference_from_config(cfg.data.stain_reference)
    parts = build_training(cfg, accelerator, reference, load_init_weights=newest is None)
    restore_checkpoint(parts, resume=options.resume, export_only=options.export_only)
    if options.export_only:
        export(cfg, accelerator, parts.teacher, reference, options.push_to_hub)
    else:
        if accelerator.is_main_process:
            save_run_config(cfg)
        run_training(cfg, parts, reference, options)
    accelerator.end_training()
    return 0


def launched_on_cpus_only() -> bool:
    """A multi-process launch on a machine without an accelerator (e.g. `accelerate launch --multi_gpu` on CPUs).

    Accelerate 1.x then makes every process an independent single-process run unless `cpu=True`, which selects
    the gloo backend; the launcher resets ACCELERATE_USE_CPU, so the script must ask for it.
    """
    devices = getattr(torch, "accelerator", None)  # torch >= 2.6; CUDA only before
    has_accelerator = devices.is_available() if devices is not None else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator


def start_accelerator(run: RunConfig) -> Accelerator:
    accelerator = Accelerator(
        cpu=launched_on_cpus_only(),
        mixed_precision=run.mixed_precision,
        log_with="tensorboard",
        project_dir=Path(run.output_dir),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(run.seed, device_specific=True)  # ranks draw different drop-path masks
    return accelerator


def build_student(cfg: PretrainConfig, load_init_weights: bool = True) -> MultiCropNetwork:
    """The student; `model.init_weights` are read only with `load_init_weights` (a checkpoint that is about to
    be restored overwrites them: an export then needs no copy of the starting weights)."""
    m = cfg.model
    config = m.to_exaonepath_config()
    if m.init_weights and load_init_weights:
        backbone = load_backbone(m.init_weights, config=config)
    else:
        backbone = ExaonePathModel(config)
    head = DINOHead(
        m.hidden_size,
        m.out_dim,
        m.head_hidden_dim,
        m.head_bottleneck_dim,
        m.head_num_layers,
        m.norm_last_layer,
    )
    return MultiCropNetwork(backbone.train(), head)


def build_training(
    cfg: PretrainConfig, accelerator: Accelerator, reference: StainReference, load_init_weights: bool = True
) -> TrainingParts:
    # On the device before the optimizer is built, so that it can choose the fused kernel.
    student = build_student(cfg, load_init_weights).to(accelerator.device)
    optimizer = build_optimizer(student, cfg.optim.betas)
    student, optimizer = accelerator.prepare(student, optimizer)
    # After prepare, from the unwrapped student: built before, each rank would copy different weights.
    teacher = build_teacher(accelerator.unwrap_model(student))
    if cfg.run.compile:  # after the teacher's deep copy, which must copy plain modules
        compile_backbones(accelerator.unwrap_model(student), teacher)
    normalizer = MacenkoNormalizer(reference) if cfg.data.stain_normalize else None
    augmentation = build_augmentation(
        cfg.augmentations, cfg.data.augment_on, normalizer, accelerator.device, cfg.run.compile
    )
    dino_loss = DINOLoss(
        cfg.model.out_dim, augmentation.num_crops, 2, cfg.loss.student_temp, cfg.loss.center_momentum
    ).to(accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(teacher, dino_loss, state)
    checkpoints = Path(cfg.run.output_dir) / "checkpoints"
    return TrainingParts(
        accelerator, student, teacher, dino_loss, optimizer, augmentation, state, checkpoints
    )


def compile_backbones(*networks: MultiCropNetwork) -> None:
    """`torch.compile` each network's backbone in place (`nn.Module.compile`): its state dict keeps its tensor
    names (no `_orig_mod.`), so checkpoints move freely between compiled and uncompiled runs. Static shapes:
    one graph per crop resolution, as many as a run has."""
    for network in networks:
        network.backbone.compile(dynamic=False)


def build_rank_batches(
    cfg: PretrainConfig, parts: TrainingParts
) -> tuple[dino_data.OrderedBatches, int | None]:
    """This rank's batches (resumed where the restored state says) and the samples per epoch, if known."""
    accelerator, augmentation = parts.accelerator, parts.augmentation
    return dino_data.build_rank_loader(
        cfg.data, augmentation.worker_transform, augmentation.worker_normalizer, cfg.run.batch_size_per_device,
        cfg.run.seed, accelerator.process_index, accelerator.num_processes, parts.state.streams,
        pin_memory=accelerator.device.type == "cuda",
    )  # fmt: skip


def restore_checkpoint(parts: TrainingParts, resume: bool, export_only: bool) -> None:
    newest = latest_checkpoint(parts.checkpoints) if resume or export_only else None
    if newest is not None:
        load_checkpoint(parts.accelerator, newest)
        logger.info("resumed from %s (step %d)", newest, parts.state.step)
    elif export_only:
        raise FileNotFoundError(f"no step_N checkpoint in {parts.checkpoints} to export")
    elif resume:  # the same command can start a job and requeue it after a preemption
        logger.warning("--resume: no checkpoint in %s yet, starting from scratch", parts.checkpoints)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> None:
    """`accelerator.load_state`; a checkpoint of another model shape (a folder from before runs saved their
    config, with another `--config`) is one ValueError naming the first tensor that differs."""
    try:
        accelerator.load_state(str(checkpoint))
    except RuntimeError as error:
        # torch's load_state_dict: "Error(s) in loading state_dict for ...:" then one line per tensor
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if not lines or "state_dict" not in lines[0]:
            raise
        first_difference = lines[1] if len(lines) > 1 else lines[0]
        raise ValueError(
            f"checkpoint {checkpoint} holds another model than --config describes ({first_difference}): "
            "pass the config and overrides the run was trained with"
        ) from None


def stain_reference_from_config(value: str | dict | None) -> StainReference:
    if value is None:
        return DEFAULT_STAIN_REFERENCE
    if isinstance(value, dict):
        return StainReference.from_dict(value)
    # A target image: the reference is fitted on it, like the release's 4096² TCGA target.
    return MacenkoNormalizer().fit(dino_data.decode_image({"path": value, "bytes": None}))


def plan_steps(run: RunConfig, num_samples: int | None, num_processes: int) -> StepPlan:
    global_batch = run.batch_size_per_device * num_processes * run.gradient_accumulation_steps
    if run.max_steps is None and not num_samples:
        raise ValueError(
            "the number of samples of this source is unknown: set data.num_samples or run.max_steps"
        )
    steps_per_epoch = max(1, (num_samples or global_batch) // global_batch)
    total_steps = run.max_steps or max(1, round(run.epochs * steps_per_epoch))
    return StepPlan(global_batch, steps_per_epoch, total_steps)


def run_training(
    cfg: PretrainConfig, parts: TrainingParts, reference: StainReference, options: RunOptions
) -> None:
    accelerator = parts.accelerator
    batches, num_samples = build_rank_batches(cfg, parts)
    plan = plan_steps(cfg.run, num_samples, accelerator.num_processes)
    schedules = cfg.schedules(plan.global_batch, plan.steps_per_epoch, plan.total_steps)
    accelerator.init_trackers("dino", config=cfg.flat())
    logger.info(
        "%d steps (%d per epoch), global batch %d, peak lr %.3g, %d loader workers per rank",
        plan.total_steps, plan.steps_per_epoch, plan.global_batch, schedules.lr, batches.state.num_workers,
    )  # fmt: skip
    stop_at = min(options.stop_at_step or plan.total_steps, plan.total_steps)
    seen_ids = train_until(cfg, parts, batches, schedules, plan, stop_at)
    if cfg.run.record_samples:
        write_rank_record(
            Path(cfg.run.output_dir), accelerator.process_index, seen_ids, parts.teacher, parts.dino_loss
        )
    if parts.state.step >= plan.total_steps:
        export(cfg, accelerator, parts.teacher, reference, options.push_to_hub)


def train_until(
    cfg: PretrainConfig,
    parts: TrainingParts,
    batches: dino_data.OrderedBatches,
    schedules: DINOSchedules,
    plan: StepPlan,
    stop_at: int,
) -> list[str]:
    """Optimizer steps from the current one to `stop_at`, logging and checkpointing; returns the ids trained on
    (when `run.record_samples`)."""
    run = cfg.run
    state, seen_ids, pending = parts.state, [], PendingCounts()
    window = MetricsWindow(state.images_seen)
    bar = progress_bar(
        total=plan.total_steps, initial=state.step, enabled=parts.accelerator.is_main_process, desc="dino"
    )
    while state.step < stop_at:
        values = schedules.at(state.step)
        tick = time.perf_counter()
        try:
            loss, ids, wait = train_step(
                parts, batches, values, run.gradient_accumulation_steps, cfg.optim.clip_grad, pending
            )
        except NonFiniteLossError as error:
            raise NonFiniteLossError(
                f"{error} at step {state.step}; stopped before the update. The last good checkpoint is "
                f"{latest_checkpoint(parts.checkpoints)}. Usual causes: fp16 (use bf16 or no), too high an lr."
            ) from None
        state.step += 1
        if run.record_samples:
            seen_ids.extend(ids)
        window.seconds += time.perf_counter() - tick
        window.waiting += wait
        window.loss += loss
        window.steps += 1
        bar.update(1)
        log_now = state.step % run.log_every == 0 or state.step == stop_at
        checkpoint_now = state.step % run.checkpoint_every == 0 or state.step == stop_at
        if log_now or checkpoint_now:
            add_pending_counts(parts, pending)
        if log_now:
            metrics = log_metrics(parts, Path(run.output_dir), values, window, plan.steps_per_epoch)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
            window = MetricsWindow(state.images_seen)
        if checkpoint_now:
            state.streams = gather_object([batches.state.to_dict()])
            save_checkpoint(parts.accelerator, parts.checkpoints, state.step, run.keep_last_checkpoints)
    bar.close()
    return seen_ids


def train_step(
    parts: TrainingParts,
    batches: Iterator[dict[str, Any]],
    values: ScheduleValues,
    accumulation_steps: int,
    clip_grad: float,
    pending: PendingCounts,
) -> tuple[float, list[str], float]:
    """One optimizer step over `accumulation_steps` batches; their counts go to `pending`.

    Returns the loss averaged over ranks, the ids this rank trained on, and the seconds spent waiting for data.
    Raises `NonFiniteLossError` before the update. Reading the loss for that check is the step's only wait for
    the device: everything else is queued, so the device runs ahead while the host fetches the next batch.
    """
    accelerator, student = parts.accelerator, parts.student
    loss_sum = torch.zeros(1, device=accelerator.device)
    ids, wait = [], 0.0
    for micro in range(accumulation_steps):
        before = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - before
        crops, fallbacks = parts.augmentation.to_device(batch)
        with torch.no_grad(), accelerator.autocast():  # only prepared models are autocast for us
            teacher_output = parts.teacher(crops[:2])
        # Gradients are all-reduced only on the last micro-batch.
        with nullcontext() if micro == accumulation_steps - 1 else accelerator.no_sync(student):
            loss = parts.dino_loss(student(crops), teacher_output, values.teacher_temp)
            accelerator.backward(loss / accumulation_steps)
        loss_sum += loss.detach() / accumulation_steps
        pending.add(len(batch["ids"]), fallbacks, batch["unreadable"])
        ids.extend(batch["ids"])
    total = accelerator.reduce(loss_sum, reduction="sum").item()
    if not math.isfinite(total):
        raise NonFiniteLossError(f"loss is {total / accelerator.num_processes}")
    update_weights(parts, values, clip_grad)
    return total / accelerator.num_processes, ids, wait


def update_weights(parts: TrainingParts, values: ScheduleValues, clip_grad: float) -> None:
    """DINO's gradient surgery, the optimizer step, then the teacher's EMA step."""
    unwrapped = parts.accelerator.unwrap_model(parts.student)
    if values.freeze_last_layer:
        freeze_last_layer_gradients(unwrapped.head)
    clip_gradients_per_parameter(parts.student.parameters(), clip_grad)
    set_optimizer_hyperparameters(parts.optimizer, values.lr, values.weight_decay)
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    ema_update(parts.teacher, unwrapped, values.teacher_momentum)


def add_pending_counts(parts: TrainingParts, pending: PendingCounts) -> None:
    """Adds every rank's pending counts to the run's counters and clears them (one collective, one read)."""
    accelerator, state = parts.accelerator, parts.state
    local = torch.tensor(
        [pending.images, 0, pending.unreadable], dtype=torch.int64, device=accelerator.device
    )
    local[1] += pending.macenko_fallbacks
    images, fallbacks, unreadable = accelerator.reduce(local, reduction="sum").tolist()
    state.images_seen += images
    state.macenko_fallbacks += fallbacks
    state.unreadable_images += unreadable
    pending.images = pending.unreadable = pending.macenko_fallbacks = 0


def log_metrics(
    parts: TrainingParts,
    out: Path,
    values: ScheduleValues,
    window: MetricsWindow,
    steps_per_epoch: int,
) -> dict[str, float]:
    """Logs the window's means and rates (after `add_pending_counts`): loss, images/s, data-wait fraction."""
    accelerator, state = parts.accelerator, parts.state
    metrics = {
        "loss": window.loss / window.steps,
        "lr": values.lr,
        "weight_decay": values.weight_decay,
        "teacher_momentum": values.teacher_momentum,
        "teacher_temp": values.teacher_temp,
        "images_per_s": (state.images_seen - window.images_at_start) / window.seconds,
        "data_wait_fraction": window.waiting / window.seconds,
        "macenko_fallbacks": state.macenko_fallbacks,
        "unreadable_images": state.unreadable_images,
        "epoch": state.step / steps_per_epoch,
    }
    accelerator.log(metrics, step=state.step)
    if accelerator.is_main_process:  # also plain JSON lines, for scripts and tests
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": state.step, **metrics}) + "\n")
    return metrics


def export(
    cfg: PretrainConfig,
    accelerator: Accelerator,
    teacher: MultiCropNetwork,
    reference: StainReference,
    push_to_hub: str | None,
) -> None:
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


def write_rank_record(out: Path, rank: int, ids: list[str], teacher: nn.Module, dino_loss: nn.Module) -> None:
    """Which samples this rank trained on and hashes of its teacher and center (for sharding and sync checks)."""
    record = {
        "rank": rank,
        "teacher_sha256": weights_digest(teacher),
        "center_sha256": weights_digest(dino_loss),
        "samples": ids,
    }
    write_json(out / f"rank_{rank}.json", record)
