"""Throughput of the real DINO training step on one device: images/s, data wait, step time, peak memory.

`measure_dino_throughput` builds a run exactly as `exaonepath-pretrain` does (same parts, loader and
`train_step`), trains warm-up steps (compilation, the loader's first batches, cuDNN's algorithm search) and
then times the measured ones end to end, device work included. Nothing is checkpointed or exported. For one
process: it resets Accelerate's process state before and after, so several calls can compare settings in one
Python session, but it must not run inside a launched multi-process job.

    from exaonepath_hf.train.dino.throughput import measure_dino_throughput
    measure_dino_throughput("one_gpu", "/data/tiles", steps=200, batch_size=256, augment_on="gpu", compile=True)
"""

from __future__ import annotations

import gc
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .config import PretrainConfig, load_config
from .loop import (
    PendingCounts,
    build_rank_batches,
    build_training,
    plan_steps,
    stain_reference_from_config,
    start_accelerator,
    train_step,
)

__all__ = ["measure_dino_throughput"]


def measure_dino_throughput(
    config: str | Path = "one_gpu",
    source: str | Path | None = None,
    steps: int = 50,
    batch_size: int | None = None,
    augment_on: str | None = None,
    compile: bool | None = None,
    warmup_steps: int = 5,
    profile_steps: int = 0,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Time `steps` optimizer steps of `config` (a packaged name or a YAML path) on `source` (`data.source`),
    after `warmup_steps` untimed ones. `batch_size`, `augment_on` and `compile` override the config's
    `run.batch_size_per_device`, `data.augment_on` and `run.compile` when given; `overrides` are further
    `section.key=value` strings (e.g. "data.num_workers=15"). With `profile_steps`, that many more steps run
    under `torch.profiler` and `top_ops` holds its table of the most expensive operators.

    Returns images_per_s, step_time_s (mean), data_wait_fraction (time blocked on the loader / total),
    peak_memory_bytes and peak_reserved_bytes (the device's, None on CPU), loss (of the last step), and the
    settings: device, batch_size, augment_on, compile, num_workers, mixed_precision, steps, warmup_steps.
    """
    chosen = [f"data.source={source}"] if source is not None else []
    chosen += [f"run.batch_size_per_device={batch_size}"] if batch_size is not None else []
    chosen += [f"data.augment_on={augment_on}"] if augment_on is not None else []
    chosen += [f"run.compile={str(compile).lower()}"] if compile is not None else []
    total = warmup_steps + steps + profile_steps
    with tempfile.TemporaryDirectory(prefix="dino_throughput_") as scratch, _fresh_accelerate_state():
        cfg = load_config(
            config, [*overrides, *chosen, f"run.max_steps={total}", f"run.output_dir={scratch}"]
        )
        result = _measure(cfg, steps, warmup_steps, profile_steps)
    return result


@contextmanager
def _fresh_accelerate_state() -> Iterator[None]:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        gc.collect()  # the run's models, optimizer and loader workers, before the next call measures memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _measure(cfg: PretrainConfig, steps: int, warmup_steps: int, profile_steps: int) -> dict[str, Any]:
    accelerator = start_accelerator(cfg.run)
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parts = build_training(cfg, accelerator, stain_reference_from_config(cfg.data.stain_reference))
    batches, num_samples = build_rank_batches(cfg, parts)
    plan = plan_steps(cfg.run, num_samples, accelerator.num_processes)
    schedules = cfg.schedules(plan.global_batch, plan.steps_per_epoch, plan.total_steps)
    pending = PendingCounts()

    def step() -> tuple[float, float]:
        values = schedules.at(parts.state.step)
        loss, _, wait = train_step(
            parts, batches, values, cfg.run.gradient_accumulation_steps, cfg.optim.clip_grad, pending
        )
        parts.state.step += 1
        return loss, wait

    for _ in range(warmup_steps):
        step()
    _synchronize(device)
    start, waiting, loss = time.perf_counter(), 0.0, float("nan")
    for _ in range(steps):
        loss, wait = step()
        waiting += wait
    _synchronize(device)
    seconds = time.perf_counter() - start
    top_ops = _profile(step, profile_steps, device) if profile_steps else None
    result = {
        "images_per_s": steps * plan.global_batch / seconds,
        "step_time_s": seconds / steps,
        "data_wait_fraction": waiting / seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
        "loss": loss,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "batch_size": cfg.run.batch_size_per_device,
        "augment_on": cfg.data.augment_on,
        "compile": cfg.run.compile,
        "num_workers": batches.state.num_workers,
        "mixed_precision": cfg.run.mixed_precision,
        "steps": steps,
        "warmup_steps": warmup_steps,
    }
    if top_ops is not None:
        result["top_ops"] = top_ops
    accelerator.end_training()
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile(step, steps: int, device: torch.device) -> str:
    """The operators that cost most over `steps` steps: a `torch.profiler` table, by device time on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        _synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=20)
