"""Slide-level prediction: a MIL head trained on per-slide feature bags, over several seeds, with Accelerate
(`run_slide_probe(SlideProbeSettings(...))`). What a run does and writes: `eval.slide.cli.SLIDE_PROBE_DESCRIPTION`,
the help of `exaonepath-slide-probe`."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import get_cosine_schedule_with_warmup

from ...atomic_io import atomic_save_tensors, atomic_write_bytes, write_json
from ...progress import progress_bar
from ..common.metrics import METRIC_KEYS, METRIC_PATH, load_metric
from ..common.metrics.pathology_metrics import classification_metrics
from ..common.records import environment, slugify, summarize_seeds, summary_cell
from .data import Bag, SlideDataset, load_bags, load_slide_dataset
from .heatmaps import require_drawable, write_heatmaps
from .mil import BagCollator, build_head
from .settings import HeadTrainingConfig, SlideProbeSettings

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = [
    "SLIDE_RECORD_SUFFIX",
    "HeadFit",
    "fit_head",
    "predict_bags",
    "write_slide_report",
    "run_slide_probe",
]

logger = logging.getLogger(__name__)

SLIDE_RECORD_SUFFIX = ".slide_record.json"


class _BagItems(Dataset):
    """Bags as the items `BagCollator` pads: features, label, and the bag's position (`index`)."""

    def __init__(self, bags: Sequence[Bag]):
        self.bags = bags

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> dict[str, Any]:
        bag = self.bags[index]
        return {"features": bag.features, "label": bag.label, "index": index}


@dataclass
class HeadFit:
    """A trained head (the selected state, unwrapped, in eval mode) and how it was selected."""

    head: nn.Module
    seed: int
    selected_step: int
    selected_val_score: float
    steps: int
    stopped_early: bool
    history: list[dict[str, float]]
    # wall time of the training steps (collate, forward, backward, update), validation excluded
    train_seconds: float


@torch.no_grad()
def predict_bags(
    head: nn.Module, loader: DataLoader, accelerator: Accelerator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities [N, C] (float32, CPU) and labels [N] of every bag of `loader`'s dataset, in
    dataset order (gathered across processes)."""
    head.eval()
    probabilities, labels, indices = [], [], []
    for batch in loader:
        logits = head(batch["features"], batch["mask"]).logits.float()
        gathered = accelerator.gather_for_metrics(
            (F.softmax(logits, dim=-1), batch["labels"], batch["indices"])
        )
        probabilities.append(gathered[0].cpu())
        labels.append(gathered[1].cpu())
        indices.append(gathered[2].cpu())
    order = torch.cat(indices).argsort()
    return torch.cat(probabilities)[order], torch.cat(labels)[order]


def _loader(
    bags: Sequence[Bag], batch_size: int, collate: BagCollator, generator: torch.Generator | None
) -> DataLoader:
    return DataLoader(
        _BagItems(bags),
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        collate_fn=collate,
    )


@dataclass
class _Training:
    """One head's training state under Accelerate: the prepared head, optimizer and loaders, the schedule, and
    the optimizer steps taken out of `total`."""

    head: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    val_loader: DataLoader
    total: int
    step: int = 0


def _prepare_training(
    train: Sequence[Bag],
    val: Sequence[Bag],
    config: HeadTrainingConfig,
    num_classes: int,
    seed: int,
    accelerator: Accelerator,
) -> _Training:
    in_dim = train[0].features.shape[1]
    head = build_head(config.head, in_dim, num_classes, hidden_dim=config.hidden_dim, dropout=config.dropout)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    patch_sampler = torch.Generator().manual_seed(seed * 1_000_003 + accelerator.process_index)
    train_loader = _loader(
        train,
        config.batch_size,
        BagCollator(config.max_patches, patch_sampler),
        torch.Generator().manual_seed(seed),
    )
    val_loader = _loader(val, config.eval_batch_size, BagCollator(), None)
    head, optimizer, train_loader, val_loader = accelerator.prepare(head, optimizer, train_loader, val_loader)
    total = min(config.max_steps, config.max_epochs * len(train_loader))
    # built on the prepared optimizer and stepped by hand: one step per optimizer step of this process
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_fraction * total), total)
    return _Training(head, optimizer, scheduler, train_loader, val_loader, total)


def _train_epoch(training: _Training, accelerator: Accelerator, bar: tqdm) -> list[float]:
    """One pass over the training bags, or what is left of the step budget; the loss of every step."""
    training.head.train()
    losses = []
    for batch in training.train_loader:
        logits = training.head(batch["features"], batch["mask"]).logits.float()
        loss = F.cross_entropy(logits, batch["labels"])
        accelerator.backward(loss)
        training.optimizer.step()
        training.scheduler.step()
        training.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        training.step += 1
        bar.update()
        if training.step == training.total:
            break
    return losses


def _validate(training: _Training, accelerator: Accelerator, num_classes: int) -> tuple[float, float]:
    """Balanced accuracy and mean cross-entropy of the head on the validation bags."""
    probabilities, labels = predict_bags(training.head, training.val_loader, accelerator)
    score = classification_metrics(
        probabilities.argmax(dim=1).numpy(), labels.numpy(), num_classes=num_classes
    )["balanced_accuracy"]
    return score, F.nll_loss(probabilities.clamp_min(1e-12).log(), labels).item()


@dataclass
class _Selection:
    """The best head so far on validation, and how many evaluations have passed without a better one."""

    score: float = -math.inf
    loss: float = math.inf
    step: int = 0
    state: dict[str, torch.Tensor] | None = None
    stale: int = 0

    def offer(self, score: float, loss: float, step: int, head: nn.Module) -> bool:
        """Keep a copy of `head` if it is the best so far; whether it was."""
        # balanced accuracy moves in steps of 1 / (class size) on a small validation set; between equal
        # scores the lower loss is the better-trained head
        if score > self.score or (score == self.score and loss < self.loss):
            self.score, self.loss, self.step, self.stale = score, loss, step, 0
            self.state = copy.deepcopy(head.state_dict())
            return True
        self.stale += 1
        return False


def fit_head(
    train: Sequence[Bag],
    val: Sequence[Bag],
    config: HeadTrainingConfig,
    num_classes: int,
    seed: int,
    accelerator: Accelerator,
) -> HeadFit:
    """Train one head of `config` with `seed`; select it on `val` balanced accuracy (module docstring)."""
    if not train or not val:
        raise ValueError(f"training needs bags in train and val; got {len(train)} and {len(val)}")
    set_seed(seed)
    training = _prepare_training(train, val, config, num_classes, seed, accelerator)
    selection, history, epoch, stopped_early, train_seconds = _Selection(), [], 0, False, 0.0
    with progress_bar(
        total=training.total,
        desc=f"{config.head} seed {seed}",
        unit="step",
        enabled=accelerator.is_local_main_process,
    ) as bar:
        while training.step < training.total and not stopped_early:
            epoch_started = time.perf_counter()
            losses = _train_epoch(training, accelerator, bar)
            train_seconds += time.perf_counter() - epoch_started
            epoch += 1
            if epoch % config.eval_every_epochs and training.step < training.total:
                continue
            score, val_loss = _validate(training, accelerator, num_classes)
            history.append(
                {
                    "epoch": epoch,
                    "step": training.step,
                    "train_loss": float(np.mean(losses)),
                    "val_balanced_accuracy": score,
                    "val_loss": val_loss,
                }
            )
            bar.set_postfix(val_bacc=f"{score:.3f}", val_loss=f"{val_loss:.3f}")
            if not selection.offer(score, val_loss, training.step, accelerator.unwrap_model(training.head)):
                stopped_early = config.patience is not None and selection.stale >= config.patience
    trained = accelerator.unwrap_model(training.head)
    trained.load_state_dict(selection.state)
    trained.eval()
    accelerator.free_memory()
    return HeadFit(
        trained, seed, selection.step, selection.score, training.step, stopped_early, history, train_seconds
    )


def _patch_stats(bags: Sequence[Bag]) -> dict[str, Any]:
    counts = np.array([len(b) for b in bags])
    return {
        "bags": len(bags),
        "patches_min": int(counts.min()),
        "patches_median": float(np.median(counts)),
        "patches_max": int(counts.max()),
        "patches_total": int(counts.sum()),
    }


def load_slide_records(root: str | Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(root).rglob(f"*{SLIDE_RECORD_SUFFIX}"))]


def write_slide_report(root: str | Path) -> Path:
    """`root/report.md`: every slide record under `root`, one summary row each, then each run's seeds."""
    records = load_slide_records(root)
    if not records:
        raise FileNotFoundError(f"no slide records (*{SLIDE_RECORD_SUFFIX}) under {root}")
    lines = [
        "# Slide-level prediction",
        "",
        "Test metrics, mean ± sd over seeds; bags selected on validation balanced accuracy.",
        "",
        "| Task | Head | Level | Seeds | Bags train / val / test | Balanced acc. | Macro-F1 | AUROC | Top-1 "
        "|",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        test, sizes = record["test"], record["data"]["sizes"]
        lines.append(
            f"| {record['task']['name']} | {record['head']['head']} | {record['task']['level']} | "
            f"{len(record['per_seed'])} | "
            f"{sizes['train']['bags']} / {sizes['val']['bags']} / {sizes['test']['bags']} | "
            + " | ".join(summary_cell(test[k]) for k in ("balanced_accuracy", "macro_f1", "auroc", "top1"))
            + " |"
        )
    for record in records:
        lines += [
            "",
            f"## {record['task']['name']}, {record['head']['head']}",
            "",
            f"Classes: {', '.join(record['task']['class_names'])}. "
            f"Features: {record['data']['feature_dim']}-d, "
            f"test bags of {record['data']['patches']['test']['patches_median']:.0f} patches (median).",
            "",
            "| Seed | Steps | Selected step | Val balanced acc. | Test balanced acc. | Macro-F1 | AUROC |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in record["per_seed"]:
            auroc = "–" if run["auroc"] is None else f"{run['auroc']:.3f}"
            lines.append(
                f"| {run['seed']} | {run['steps']}{' (early stop)' if run['stopped_early'] else ''} | "
                f"{run['selected_step']} | {run['selected_val_balanced_accuracy']:.3f} | "
                f"{run['balanced_accuracy']:.3f} | {run['macro_f1']:.3f} | {auroc} |"
            )
        heatmaps = record.get("heatmaps")
        if heatmaps:
            lines += [
                "",
                f"Attention heatmaps (seed {heatmaps['seed']}) of {len(heatmaps['written'])} test slides:",
                "",
            ]
            lines += [f"![{h['slide_id']}](heatmaps/{h['heatmap']})" for h in heatmaps["written"][:4]]
            if heatmaps["missing_slides"]:
                lines.append(f"\nNo slide file for: {', '.join(heatmaps['missing_slides'])}.")
    target = Path(root) / "report.md"
    atomic_write_bytes(target, ("\n".join(lines) + "\n").encode())
    return target


def _test_metrics(fit: HeadFit, test_loader: DataLoader, accelerator: Accelerator, metric, num_classes: int):
    test_loader = accelerator.prepare(test_loader)
    probabilities, labels = predict_bags(fit.head, test_loader, accelerator)
    accelerator.free_memory()
    scores = probabilities[:, 1] if num_classes == 2 else probabilities
    result = metric.compute(
        predictions=probabilities.argmax(dim=1).tolist(),
        references=labels.tolist(),
        scores=scores.tolist(),
        num_classes=num_classes,
    )
    return result, probabilities, labels


@dataclass
class _SeedRuns:
    """Every seed's head, its test metrics and test probabilities [seeds, N, C], with the test labels [N]."""

    per_seed: list[dict[str, Any]]
    heads: dict[int, nn.Module]
    probabilities: torch.Tensor
    labels: torch.Tensor


def _split_bags(dataset: SlideDataset) -> dict[str, list[Bag]]:
    bags = {name: load_bags(dataset.split(name), desc=f"{name} bags") for name in ("train", "val", "test")}
    if not all(bags.values()):
        raise ValueError(
            f"a split has no bags ({ {k: len(v) for k, v in bags.items()} }); label more patients"
        )
    return bags


def _train_and_test(
    bags: dict[str, list[Bag]], config: HeadTrainingConfig, num_classes: int, accelerator: Accelerator
) -> _SeedRuns:
    """A head per seed, trained on train, selected on val, scored on test."""
    metric = load_metric()
    per_seed, probabilities, heads = [], [], {}
    for seed in config.seeds:
        fit = fit_head(bags["train"], bags["val"], config, num_classes, seed, accelerator)
        test_loader = _loader(bags["test"], config.eval_batch_size, BagCollator(), None)
        result, probs, labels = _test_metrics(fit, test_loader, accelerator, metric, num_classes)
        result.update(
            seed=seed,
            selected_step=fit.selected_step,
            selected_val_balanced_accuracy=fit.selected_val_score,
            steps=fit.steps,
            stopped_early=fit.stopped_early,
            train_seconds=fit.train_seconds,
            history=fit.history,
        )
        per_seed.append(result)
        probabilities.append(probs)
        heads[seed] = fit.head
        logger.info("%s seed %d: test balanced accuracy %.4f", config.head, seed, result["balanced_accuracy"])
    return _SeedRuns(per_seed, heads, torch.stack(probabilities), labels)


def _task_name(settings: SlideProbeSettings) -> str:
    return settings.name or settings.labels.stem


def _run_stem(settings: SlideProbeSettings) -> str:
    """`<task>.<head>`, the file-name stem of a run's outputs: runs of other tasks or heads into one folder
    keep their records (the report lists them all); a rerun of the same task and head replaces its own."""
    return f"{slugify(_task_name(settings))}.{settings.training.head}"


def _save_heads_and_predictions(
    out_dir: Path,
    stem: str,
    config: HeadTrainingConfig,
    runs: _SeedRuns,
    bags: dict[str, list[Bag]],
    class_names,
) -> None:
    """`<stem>.heads.safetensors` (every seed's head, with what rebuilds it) and
    `<stem>.predictions.safetensors` (test probabilities per seed, labels, bag ids)."""
    metadata = {
        "head": config.head,
        "in_dim": str(bags["train"][0].features.shape[1]),
        "num_classes": str(len(class_names)),
        "class_names": json.dumps(list(class_names)),
        "config": json.dumps(config.to_dict()),
    }
    atomic_save_tensors(
        out_dir / f"{stem}.heads.safetensors",
        {
            f"seed{seed}.{key}": value.detach().cpu()
            for seed, head in runs.heads.items()
            for key, value in head.state_dict().items()
        },
        metadata=metadata,
    )
    atomic_save_tensors(
        out_dir / f"{stem}.predictions.safetensors",
        {"probabilities": runs.probabilities, "labels": runs.labels},
        metadata={
            "bag_ids": json.dumps([b.bag_id for b in bags["test"]]),
            "seeds": json.dumps(list(config.seeds)),
        },
    )


def _slide_record(
    settings: SlideProbeSettings,
    dataset: SlideDataset,
    bags: dict[str, list[Bag]],
    runs: _SeedRuns,
    accelerator: Accelerator,
) -> dict[str, Any]:
    """The run's record (module docstring), heatmaps not yet drawn."""
    config = settings.training
    first = runs.heads[config.seeds[0]]
    stem = _run_stem(settings)
    return {
        "task": {
            "name": _task_name(settings),
            "class_names": list(dataset.class_names),
            "level": settings.data.level,
        },
        "data": {
            **dataset.provenance(),
            "feature_dim": int(bags["train"][0].features.shape[1]),
            "patches": {split: _patch_stats(b) for split, b in bags.items()},
        },
        "head": {
            **config.to_dict(),
            "parameters": sum(p.numel() for p in first.parameters()),
            "optimizer": "AdamW",
            "schedule": "cosine with linear warmup (transformers.get_cosine_schedule_with_warmup)",
            "model_selection": f"best validation balanced accuracy every {config.eval_every_epochs} epoch(s) "
            "(equal scores: the lower validation loss), restored before testing; stop after "
            f"{config.patience} evaluations without improvement",
            "metric_module": str(METRIC_PATH),
        },
        "accelerate": {
            "num_processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "mixed_precision": settings.mixed_precision,
        },
        "test": summarize_seeds(runs.per_seed, METRIC_KEYS),
        "per_seed": runs.per_seed,
        "heatmaps": None,
        "outputs": {
            "predictions": f"{stem}.predictions.safetensors",
            "heads": f"{stem}.heads.safetensors",
        },
        "environment": environment(),
    }


def run_slide_probe(settings: SlideProbeSettings, accelerator: Accelerator | None = None) -> Path | None:
    """Load the bags, train the head for every seed, test, write the record, predictions, heads, report and
    heatmaps. Returns the record path (None on processes other than the main one)."""
    accelerator = accelerator or Accelerator(cpu=settings.cpu, mixed_precision=settings.mixed_precision)
    config = settings.training
    dataset: SlideDataset = load_slide_dataset(settings.features, settings.labels, settings.data)
    bags = _split_bags(dataset)
    if settings.heatmaps is not None:  # before training: a run should not end on bags it cannot draw
        require_drawable(bags["test"])
    runs = _train_and_test(bags, config, len(dataset.class_names), accelerator)
    if not accelerator.is_main_process:
        return None

    out_dir, stem = Path(settings.output_dir), _run_stem(settings)
    _save_heads_and_predictions(out_dir, stem, config, runs, bags, dataset.class_names)
    record = _slide_record(settings, dataset, bags, runs, accelerator)
    record_path = out_dir / f"{stem}{SLIDE_RECORD_SUFFIX}"
    write_json(record_path, record)  # before the heatmaps: a slide that cannot be drawn loses no training
    if settings.heatmaps is not None:
        first = runs.heads[config.seeds[0]]
        drawn = write_heatmaps(first, bags["test"], settings.heatmaps, out_dir / "heatmaps")
        record["heatmaps"] = {"seed": config.seeds[0], **drawn}
        write_json(record_path, record)
    report = write_slide_report(out_dir)
    summary = record["test"]
    print(
        f"{record['task']['name']} [{config.head}] "
        + ", ".join(
            f"{k} {summary[k]['mean']:.4f}±{summary[k]['sd']:.4f}"
            for k in ("balanced_accuracy", "macro_f1", "auroc")
            if summary[k]["mean"] is not None
        )
        + f"\nrecord: {record_path}\nreport: {report}"
    )
    return record_path


if __name__ == "__main__":
    from .cli import slide_probe_main

    raise SystemExit(slide_probe_main())
