"""The settings of the slide room's runs, as plain dataclasses: the command line builds them without importing
torch (`eval.slide.cli`), and the library takes them (`data`, `probe`, `heatmaps`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...tiling.slide_io import SLIDE_BACKENDS

__all__ = ["HEAD_NAMES", "HeadTrainingConfig", "HeatmapSettings", "SlideDataSettings", "SlideProbeSettings"]

#: The MIL heads `mil.build_head` makes: gated attention (Ilse et al.) and mean pooling.
HEAD_NAMES = ("abmil", "mean")


@dataclass(frozen=True)
class SlideDataSettings:
    """How labels and features become bags and splits (see the module docstring)."""

    class_names: tuple[str, ...] | None = None  # label order; default: sorted (numerically if all integers)
    level: Literal["slide", "patient"] = "slide"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 42
    allow_extra_features: bool = False

    def __post_init__(self) -> None:
        if self.level not in ("slide", "patient"):
            raise ValueError(f"level must be 'slide' or 'patient', got {self.level!r}")
        if not (0 < self.test_fraction <= 0.5 and 0 < self.val_fraction < 1):
            raise ValueError(
                f"test_fraction must be in (0, 0.5] and val_fraction in (0, 1); got {self.test_fraction} "
                f"and {self.val_fraction}"
            )
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave patients for training (sum < 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HeatmapSettings:
    """Attention heatmaps of the test slides: where the slides are, how many top patches, thumbnail size."""

    slides_dir: Path
    top_k: int = 8
    thumbnail_size: int = 1024
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.top_k < 0 or self.thumbnail_size < 16:
            raise ValueError("top_k must be >= 0 and thumbnail_size >= 16")
        if self.backend not in SLIDE_BACKENDS:
            raise ValueError(f"unknown slide backend {self.backend!r}; choose one of {SLIDE_BACKENDS}")


@dataclass(frozen=True)
class HeadTrainingConfig:
    """The head and how it is trained (see the module docstring): eva's optimizer, learning rate, batch and
    step budget for slide tasks; dropout, weight decay and warmup as the MIL heads commonly use them."""

    head: Literal["abmil", "mean"] = "abmil"
    hidden_dim: int = 128  # attention head: size of V and U
    dropout: float = 0.25
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 32  # per process
    max_steps: int = 12_500
    max_epochs: int = 100
    warmup_fraction: float = 0.05  # of the steps, linear from 0
    patience: int | None = 10  # evaluations without improvement before stopping; None trains to the end
    eval_every_epochs: int = 1
    max_patches: int | None = 1000  # patches sampled per training bag; None keeps all
    eval_batch_size: int = 8
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)

    def __post_init__(self) -> None:
        if self.head not in HEAD_NAMES:
            raise ValueError(f"unknown head {self.head!r}; choose one of {sorted(HEAD_NAMES)}")
        positive = {
            "hidden_dim": self.hidden_dim,
            "batch_size": self.batch_size,
            "max_steps": self.max_steps,
            "max_epochs": self.max_epochs,
            "eval_every_epochs": self.eval_every_epochs,
            "eval_batch_size": self.eval_batch_size,
        }
        bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if bad or not self.seeds or not 0 <= self.warmup_fraction < 1 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"training settings out of range ({', '.join(bad) or 'seeds, warmup_fraction or dropout'}): "
                "counts must be >= 1, at least one seed, warmup_fraction and dropout in [0, 1)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SlideProbeSettings:
    """One `exaonepath-slide-probe` run: the bags and labels, the head and its training, the outputs."""

    features: Path
    labels: Path
    output_dir: Path = Path("results/slide_probe")
    name: str | None = None  # the task in the report; default: the labels CSV's file name
    data: SlideDataSettings = field(default_factory=SlideDataSettings)
    training: HeadTrainingConfig = field(default_factory=HeadTrainingConfig)
    heatmaps: HeatmapSettings | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    cpu: bool = False

    def __post_init__(self) -> None:
        if self.heatmaps is not None and self.training.head != "abmil":
            raise ValueError("heatmaps need an attention head: use --head abmil")
