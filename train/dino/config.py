"""Typed run configuration: one YAML file holds every hyperparameter; `key.sub=value` arguments override it.

A config is named by a path to a YAML file or by the name of one shipped with the package (`cpu_smoke`,
`one_gpu`, `paper`), so that a run works from any folder after a plain `pip install`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedConfig

from ...configuration_exaonepath import ExaonePathConfig
from .augmentations import AugmentationConfig
from .config_files import config_path, packaged_config_names
from .schedules import DINOSchedules

__all__ = [
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RunConfig",
    "config_path",
    "load_config",
    "packaged_config_names",
]


def _backbone_fields() -> frozenset[str]:
    """The architecture fields of `ExaonePathConfig` (its own, not those every transformers config has)."""
    common = {f.name for f in fields(PreTrainedConfig)}
    return frozenset(f.name for f in fields(ExaonePathConfig) if f.name not in common)


@dataclass
class ModelConfig:
    """The backbone (an `ExaonePathConfig`) and the DINO head."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 224
    drop_path_rate: float = 0.1  # stochastic depth of the student; the teacher runs in eval mode
    # ImageNet initialization: an `exaonepath-convert` folder or a timm/DINO ViT state dict; null = random.
    init_weights: str | None = None
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_num_layers: int = 3
    out_dim: int = 65536
    norm_last_layer: bool = True

    def to_exaonepath_config(self) -> ExaonePathConfig:
        """The backbone's config: every field of this section that `ExaonePathConfig` defines, the rest at its
        defaults (so an architecture field added to both needs no copying code)."""
        backbone = _backbone_fields()
        return ExaonePathConfig(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in backbone})


@dataclass
class DataConfig:
    # A folder of images, an `exaonepath-tile` output folder, a parquet/webdataset glob, or a hub dataset id.
    source: str = ""
    split: str = "train"
    image_column: str | None = None  # null: the first Image column
    # Samples per epoch; null = counted from the files (folders, parquet). Required for hub ids and tar shards.
    num_samples: int | None = None
    shuffle_buffer: int = 10000
    num_workers: int = 10
    stain_normalize: bool = True  # Macenko on every image (p = 1) before the augmentations, as in the paper
    # null = the package default reference; a path = a target image to fit; a dict = a `StainReference`.
    stain_reference: str | dict | None = None
    prefetch_factor: int = 2
    # Where Macenko and the multi-crop augmentations run: "cpu" in the loader workers, or "gpu" batched on the
    # training device, the workers then only decode (a GPU step outruns the cores a host has per GPU).
    augment_on: str = "cpu"

    def __post_init__(self) -> None:
        if self.augment_on not in ("cpu", "gpu"):
            raise ValueError(f"data.augment_on must be 'cpu' or 'gpu', got {self.augment_on!r}")


@dataclass
class LossConfig:
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_epochs: float = 1.25
    center_momentum: float = 0.9


@dataclass
class OptimConfig:
    # Peak lr reached at `lr_reference_batch_size`; the lr used is lr * global_batch / lr_reference_batch_size.
    # DINO's convention is lr_reference_batch_size = 256; a value equal to the global batch makes `lr` absolute.
    lr: float = 0.005
    lr_reference_batch_size: int = 5120
    min_lr: float = 2e-6
    warmup_steps: int = 1000
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    clip_grad: float = 3.0  # per parameter; 0 disables
    freeze_last_layer_epochs: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)


@dataclass
class RunConfig:
    output_dir: str = "runs/dino"
    seed: int = 0
    epochs: float = 10.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size_per_device: int = 64
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "bf16"  # "no", "bf16" ("fp16" is known to diverge on ViT-B DINO)
    checkpoint_every: int = 2000
    keep_last_checkpoints: int = 3
    log_every: int = 10
    export_dir: str | None = None  # null: <output_dir>/export
    push_to_hub: str | None = None  # repo id for the exported backbone
    hub_private: bool = True
    record_samples: bool = False  # write the sample ids each rank trained on (for data-sharding checks)
    # torch.compile the student and teacher backbones (in place: checkpoints keep their tensor names)
    compile: bool = False

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(
                f"run.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}"
            )


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augmentations: AugmentationConfig = field(default_factory=AugmentationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, int | float | str | bool]:
        """`section.key` -> value, with non-scalars as strings (what TensorBoard's hparams accept)."""
        return {
            f"{section}.{key}": value if isinstance(value, int | float | str | bool) else str(value)
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }

    def schedules(self, global_batch: int, steps_per_epoch: int, total_steps: int) -> DINOSchedules:
        """The per-step schedules of this run (lengths given in epochs become steps here)."""
        return DINOSchedules(
            total_steps=total_steps,
            lr=self.optim.lr * global_batch / self.optim.lr_reference_batch_size,
            min_lr=self.optim.min_lr,
            lr_warmup_steps=min(self.optim.warmup_steps, total_steps),
            weight_decay=self.optim.weight_decay,
            weight_decay_end=self.optim.weight_decay_end,
            momentum_teacher=self.optim.momentum_teacher,
            warmup_teacher_temp=self.loss.warmup_teacher_temp,
            teacher_temp=self.loss.teacher_temp,
            teacher_temp_warmup_steps=round(self.loss.teacher_temp_warmup_epochs * steps_per_epoch),
            freeze_last_layer_steps=round(self.optim.freeze_last_layer_epochs * steps_per_epoch),
        )


def _build(cls: type, values: dict[str, Any], section: str, source: Callable[[str], str]) -> Any:
    """`cls` from a mapping of the config's `section` ("" at the top), every value checked against its field's
    type: a typo or a wrong type is one line naming the key, what it takes and where it was given
    (`source(key)`)."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:  # the first is enough: the user reruns after fixing it
        name = unknown[0]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {_dotted(section, close[0])}?)" if close else ""
        raise ValueError(
            f"unknown config key {_dotted(section, name)}{hint} in {source(_dotted(section, name))}; "
            f"the keys of {section or 'the config'} are {', '.join(known)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key, hint = _dotted(section, name), hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"config section {key} must be a mapping, got {value!r} in {source(key)}")
            kwargs[name] = _build(hint, value, key, source)
        else:
            kwargs[name] = _typed(value, hint, key, source)
    return cls(**kwargs)


def _dotted(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _typed(value: Any, hint: Any, key: str, source: Callable[[str], str]) -> Any:
    """`value` if it has the type `hint` (a number given as a string, e.g. 1e-4, becomes a float), else a
    ValueError."""
    if _matches(value, hint):
        return value
    if isinstance(value, str) and float in (hint, *typing.get_args(hint)):
        with contextlib.suppress(ValueError):
            return float(value)  # PyYAML reads exponents without a dot (1e-4) as strings
    raise ValueError(f"config key {key} must be {_describe(hint)}, got {value!r} in {source(key)}")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, list | tuple) and len(value) == len(args) and all(map(_matches, value, args))
    if hint is float:  # an integer is a number too (YAML's 1 for 1.0); a bool is not
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str, dict, type(None)):
        return isinstance(value, hint)
    return True  # a type this module does not declare: not checked


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(args)} ({', '.join(_describe(arg) for arg in args)})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(hint, "null" if hint is type(None) else str(hint))


def _yaml(text: str, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:  # its message spans lines: one line, as every command error is
        raise ValueError(f"{what} is not valid YAML: {' '.join(str(error).split())}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{dotted}': '{part}' is not a section")
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a YAML config (a path or a packaged name, see `config_path`) and apply `section.key=value` overrides
    (values parsed as YAML: 3, 1e-4, [1, 2], null)."""
    tree: dict[str, Any] = {}
    given = path
    if path is not None:
        path = config_path(path)
        tree = _yaml(path.read_text(), f"config {path}") or {}
        if not isinstance(tree, dict):
            raise ValueError(f"config {path} must be a YAML mapping of sections")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. run.max_steps=20)")
        _set_dotted(tree, key.lstrip("-"), _yaml(raw, f"the value of override {item!r}"))
    overridden = {item.partition("=")[0].lstrip("-"): item for item in overrides or []}

    def source(key: str) -> str:  # the override that set `key` or one of its sections, else the file
        given_by = [item for name, item in overridden.items() if name == key or name.startswith(f"{key}.")]
        return f"the override {given_by[0]!r}" if given_by else f"config {given or 'defaults'}"

    return _build(PretrainConfig, tree, "", source)
