"""Linear probes trained on cached features: the paper's SGD protocol, an eva-style AdamW preset, L-BFGS.

All probes are a single linear layer on frozen features. Minibatches are drawn by indexing one tensor
with a fresh permutation per epoch (no DataLoader: at 128 rows a step its per-batch overhead would dominate
the step itself; benchmarks/bench_eval.py measures both).

Model selection: the paper's linear protocol (DINO's `eval_linear`) keeps the classifier that scores
best on the validation split; we evaluate every `eval_every` steps and restore the best state (ties keep
the earlier step). The eva preset also stops once `patience` evaluations pass without improvement.
L-BFGS fits a full-batch L2-regularised multinomial logistic regression for each strength in `l2_grid`
and keeps the best on validation.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..common.metrics.pathology_metrics import classification_metrics

__all__ = [
    "ProbeConfig",
    "PRESETS",
    "FeatureSplit",
    "ProbeFit",
    "fit_linear_probe",
    "predict",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    """One probing protocol. Use `PRESETS[name]` and `dataclasses.replace` to vary a field."""

    name: str
    optimizer: Literal["sgd", "adamw", "lbfgs"]
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    iterations: int = 12_500
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    eval_every: int = 250
    # evaluations without improvement before stopping; None trains for all iterations
    patience: int | None = None
    selection_metric: Literal["top1", "balanced_accuracy"] = "top1"
    seeds: tuple[int, ...] = (0,)
    # L-BFGS only: L2 strengths (on the mean cross-entropy) tried, best on validation kept
    l2_grid: tuple[float, ...] = ()
    lbfgs_max_iter: int = 500

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, ProbeConfig] = {
    # EXAONEPath paper, linear evaluation: SGD lr 0.1, momentum 0.9, no weight decay, batch 128, 12,500
    # iterations; cosine decay and best-on-validation selection as in DINO's eval_linear, top-1 reported.
    "paper": ProbeConfig(name="paper", optimizer="sgd"),
    # eva (kaiko.ai) offline classification: AdamW 3e-4, batch 256, 12,500 steps, early stopping on
    # validation balanced accuracy, 5 seeds.
    "eva": ProbeConfig(
        name="eva",
        optimizer="adamw",
        lr=3e-4,
        momentum=0.0,
        batch_size=256,
        eval_every=125,
        patience=10,
        selection_metric="balanced_accuracy",
        seeds=(0, 1, 2, 3, 4),
    ),
    # UNI-style logistic regression: full-batch L-BFGS, L2 strength chosen on validation.
    "lbfgs": ProbeConfig(
        name="lbfgs",
        optimizer="lbfgs",
        lr=1.0,
        momentum=0.0,
        batch_size=0,
        iterations=0,
        lr_schedule="constant",
        eval_every=0,
        selection_metric="balanced_accuracy",
        l2_grid=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    ),
}


@dataclass
class FeatureSplit:
    """Features [N, D] (float) and labels [N] (int64) of one split."""

    features: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.labels.shape != (self.features.shape[0],):
            raise ValueError(
                f"features must be [N, D] and labels [N]; got {tuple(self.features.shape)} and "
                f"{tuple(self.labels.shape)}"
            )
        if self.features.shape[0] == 0:
            raise ValueError("a split has no samples")
        if not torch.isfinite(self.features).all():
            raise ValueError(
                "features contain NaN or infinite values; re-extract them (the cache may be corrupt)"
            )


@dataclass
class ProbeFit:
    """A trained probe: the selected linear layer and how it was selected."""

    linear: nn.Linear
    seed: int
    selected_step: int
    selected_val_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    l2: float | None = None


@torch.no_grad()
def predict(linear: nn.Linear, features: torch.Tensor, batch_size: int = 65_536) -> torch.Tensor:
    """Softmax probabilities [N, C] (float32, CPU)."""
    device = linear.weight.device
    chunks = [
        F.softmax(linear(features[i : i + batch_size].to(device, linear.weight.dtype)).float(), dim=-1).cpu()
        for i in range(0, features.shape[0], batch_size)
    ]
    return torch.cat(chunks)


def _val_score(linear: nn.Linear, val: FeatureSplit, metric: str, num_classes: int) -> float:
    predictions = predict(linear, val.features).argmax(dim=1).numpy()
    return classification_metrics(predictions, val.labels.cpu().numpy(), num_classes=num_classes)[metric]


def _lr_at(config: ProbeConfig, step: int) -> float:
    if config.lr_schedule == "constant":
        return config.lr
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * step / config.iterations))


def _new_linear(dim: int, num_classes: int, generator: torch.Generator, device: torch.device) -> nn.Linear:
    linear = nn.Linear(dim, num_classes, device=device)
    with torch.no_grad():
        # DINO's LinearClassifier init
        linear.weight.copy_(torch.randn(num_classes, dim, generator=generator) * 0.01)
        linear.bias.zero_()
    return linear


def _fit_minibatch(
    train: FeatureSplit, val: FeatureSplit, config: ProbeConfig, seed: int, num_classes: int, device
) -> ProbeFit:
    generator = torch.Generator().manual_seed(seed)
    features = train.features.to(device, torch.float32)
    labels = train.labels.to(device)
    linear = _new_linear(features.shape[1], num_classes, generator, device)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            linear.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(linear.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    n = features.shape[0]
    batch = min(config.batch_size, n)
    order, cursor = torch.randperm(n, generator=generator).to(device), 0
    best_score, best_step, best_state, stale = -math.inf, 0, copy.deepcopy(linear.state_dict()), 0
    history = []
    for step in range(config.iterations):
        if cursor + batch > n:  # new epoch: reshuffle, drop the ragged tail as a drop_last loader would
            order, cursor = torch.randperm(n, generator=generator).to(device), 0
        index = order[cursor : cursor + batch]
        cursor += batch
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(config, step)
        loss = F.cross_entropy(linear(features[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if done % config.eval_every == 0 or done == config.iterations:
            score = _val_score(linear, val, config.selection_metric, num_classes)
            history.append({"step": done, "train_loss": loss.item(), f"val_{config.selection_metric}": score})
            if score > best_score:
                best_score, best_step, stale = score, done, 0
                best_state = copy.deepcopy(linear.state_dict())
            else:
                stale += 1
                if config.patience is not None and stale >= config.patience:
                    logger.info("seed %d: early stop at step %d (best step %d)", seed, done, best_step)
                    break
    linear.load_state_dict(best_state)
    return ProbeFit(linear, seed, best_step, best_score, history)


def _fit_lbfgs(
    train: FeatureSplit, val: FeatureSplit, config: ProbeConfig, seed: int, num_classes: int, device
) -> ProbeFit:
    if not config.l2_grid:
        raise ValueError("the lbfgs probe needs a non-empty l2_grid")
    features = train.features.to(device, torch.float32)
    labels = train.labels.to(device)
    linear = nn.Linear(features.shape[1], num_classes, device=device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    best: ProbeFit | None = None
    history = []
    # strongest regularisation first: each solution warm-starts the next, weaker one
    for l2 in sorted(config.l2_grid, reverse=True):
        optimizer = torch.optim.LBFGS(
            linear.parameters(),
            lr=config.lr,
            max_iter=config.lbfgs_max_iter,
            history_size=20,
            tolerance_grad=1e-6,
            tolerance_change=1e-9,
            line_search_fn="strong_wolfe",
        )

        def closure(optimizer: torch.optim.LBFGS = optimizer, l2: float = l2) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(linear(features), labels) + 0.5 * l2 * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        score = _val_score(linear, val, config.selection_metric, num_classes)
        history.append({"l2": l2, "train_objective": loss.item(), f"val_{config.selection_metric}": score})
        if best is None or score > best.selected_val_score:
            best = ProbeFit(copy.deepcopy(linear), seed, 0, score, history, l2=l2)
    best.history = history
    return best


def fit_linear_probe(
    train: FeatureSplit,
    val: FeatureSplit,
    config: ProbeConfig,
    num_classes: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ProbeFit:
    """Train one probe with `config` and `seed`, selected on `val` (see the module docstring)."""
    if train.features.shape[1] != val.features.shape[1]:
        raise ValueError(
            f"train features are {train.features.shape[1]}-d but val features {val.features.shape[1]}-d"
        )
    labels_seen = int(max(train.labels.max(), val.labels.max())) + 1
    if labels_seen > num_classes:
        raise ValueError(f"a label {labels_seen - 1} is out of range for {num_classes} classes")
    device = torch.device(device)
    torch.manual_seed(seed)
    if config.optimizer == "lbfgs":
        return _fit_lbfgs(train, val, config, seed, num_classes, device)
    if config.optimizer not in ("sgd", "adamw"):
        raise ValueError(f"unknown optimizer {config.optimizer!r}; use sgd, adamw or lbfgs")
    if config.iterations <= 0 or config.eval_every <= 0 or config.batch_size <= 0:
        raise ValueError(f"{config.name}: iterations, eval_every and batch_size must be positive")
    return _fit_minibatch(train, val, config, seed, num_classes, device)
