"""Frozen image encoders for evaluation and the explicit preprocessing that feeds them.

`load_encoder(source)` accepts:
- an EXAONEPath folder or hub id (`save_pretrained` layout): the feature is `pooler_output`, the CLS token
  after the final LayerNorm;
- a release `.ckpt` or a timm/DINO ViT state-dict file: loaded strictly by `exaonepath_hf.convert.load_backbone`;
- any other `AutoModel` image encoder (ViT, DINOv2, ...): the feature is the CLS token of
  `last_hidden_state` (not ViT's tanh pooler), or `pooling="mean"|"pooler"`;
- a timm model, `timm:NAME` or `hf-hub:ORG/NAME`: timm's pooled `forward_features` / `forward_head(pre_logits)`.

`Preprocessing` is the one pipeline every encoder goes through (the project's `ExaonePathImageProcessor`:
optional Macenko with a recorded reference, resize shortest edge, center crop, rescale, mean/std), so that
an experiment changes only what it says it changes. Its `to_dict()` goes into the feature-cache key and the
run record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ...configuration_exaonepath import ExaonePathConfig
from ...convert import WEIGHT_SUFFIXES, load_backbone
from ...hub import check_model_source
from ...image_processing_exaonepath import ExaonePathImageProcessor
from ...stain_normalization import DEFAULT_STAIN_REFERENCE, StainReference

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "Encoder", "Tokens", "load_encoder"]

logger = logging.getLogger(__name__)

# The processor's class attributes are the one definition of the release's preprocessing; the defaults
# here follow them so that the evaluation cannot drift from what the model card promises.
IMAGENET_MEAN = tuple(ExaonePathImageProcessor.image_mean)
IMAGENET_STD = tuple(ExaonePathImageProcessor.image_std)
_RESAMPLE = ExaonePathImageProcessor.resample.name.lower()
_RESCALE = f"1/{round(1 / ExaonePathImageProcessor.rescale_factor)}"
Pooling = Literal["auto", "pooler", "cls", "mean"]
#: Which tokens make a patch's feature: the encoder's feature (CLS), or it concatenated with the patch-token mean.
Tokens = Literal["cls", "cls+mean"]


@dataclass(frozen=True)
class Preprocessing:
    """Inference preprocessing of the paper's linear evaluation (resize 256 -> center crop 224, no augmentation).

    `stain_reference=None` means the processor's default (`DEFAULT_STAIN_REFERENCE`); the resolved numbers are
    always recorded.
    """

    stain_normalize: bool = True
    stain_reference: StainReference | None = None
    resize_shortest_edge: int = ExaonePathImageProcessor.size["shortest_edge"]
    crop_size: int = ExaonePathImageProcessor.crop_size["height"]
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    stain_io: float = ExaonePathImageProcessor.stain_io
    stain_alpha: float = ExaonePathImageProcessor.stain_alpha
    stain_beta: float = ExaonePathImageProcessor.stain_beta
    min_tissue_fraction: float = ExaonePathImageProcessor.min_tissue_fraction
    max_stain_angle: float | None = ExaonePathImageProcessor.max_stain_angle

    @property
    def resolved_reference(self) -> StainReference:
        return self.stain_reference or DEFAULT_STAIN_REFERENCE

    def processor(self):
        """The `ExaonePathImageProcessor` that implements these settings."""
        return ExaonePathImageProcessor(
            do_stain_normalize=self.stain_normalize,
            stain_reference=self.resolved_reference.to_dict(),
            size={"shortest_edge": self.resize_shortest_edge},
            crop_size={"height": self.crop_size, "width": self.crop_size},
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
            stain_io=self.stain_io,
            stain_alpha=self.stain_alpha,
            stain_beta=self.stain_beta,
            min_tissue_fraction=self.min_tissue_fraction,
            max_stain_angle=self.max_stain_angle,
        )

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["stain_reference"] = self.resolved_reference.to_dict() if self.stain_normalize else None
        record["image_mean"], record["image_std"] = list(self.image_mean), list(self.image_std)
        # the processor's own serialization also pins what this dataclass leaves at its defaults (Macenko
        # Io / alpha / beta, tissue threshold, resampling, rescale factor)
        record["processor"] = self.processor().to_dict()
        record["pipeline"] = (
            ("macenko -> " if self.stain_normalize else "")
            + f"resize shortest edge {self.resize_shortest_edge} {_RESAMPLE} -> center crop {self.crop_size} "
            f"-> rescale {_RESCALE} -> normalize mean/std"
        )
        return record


@dataclass
class Encoder:
    """A frozen encoder: `features(pixel_values) -> [N, feature_dim]` plus what identifies it."""

    model: nn.Module
    source: str
    revision: str
    kind: Literal["exaonepath", "transformers", "timm"]
    pooling: str
    feature_dim: int
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    # `Preprocessing` fields from the processor the model ships (its stain reference, Macenko parameters, sizes,
    # mean/std): the model folder's processor is the one truth about how its inputs are made
    preprocessing_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor, tokens: Tokens = "cls") -> torch.Tensor:
        """The encoder's feature [N, feature_dim] (`tokens="cls"`: the CLS token for the default pooling), or
        it concatenated with the mean of the patch tokens (`"cls+mean"`, [N, 2 * feature_dim]) from the same
        forward pass."""
        if tokens not in ("cls", "cls+mean"):
            raise ValueError(f"tokens must be 'cls' or 'cls+mean', got {tokens!r}")
        if tokens == "cls+mean" and self.pooling == "mean":
            raise ValueError(f"{self.source}: tokens 'cls+mean' need a CLS feature, but pooling is 'mean'")
        if self.kind == "timm":
            hidden = self.model.forward_features(pixel_values)
            patch_tokens = hidden[:, getattr(self.model, "num_prefix_tokens", 1) :]
            feature = (
                patch_tokens.mean(dim=1)
                if self.pooling == "mean"
                else self.model.forward_head(hidden, pre_logits=True)
            )
        else:
            outputs = self.model(pixel_values=pixel_values)
            patch_tokens = outputs.last_hidden_state[:, 1:]
            if self.pooling == "pooler":
                if getattr(outputs, "pooler_output", None) is None:
                    raise ValueError(
                        f"{self.source} returns no pooler_output; use pooling 'cls' or 'mean' (--pooling)"
                    )
                feature = outputs.pooler_output
            elif self.pooling == "mean":
                feature = patch_tokens.mean(dim=1)
            else:
                feature = outputs.last_hidden_state[:, 0]
        return torch.cat([feature, patch_tokens.mean(dim=1)], dim=1) if tokens == "cls+mean" else feature

    def identity(self) -> dict[str, Any]:
        """What the feature cache key and the run record need to tell this encoder apart from others."""
        return {
            "source": self.source,
            "revision": self.revision,
            "kind": self.kind,
            "pooling": self.pooling,
            "feature_dim": self.feature_dim,
            "class": type(self.model).__name__,
        }

    def default_preprocessing(self, stain_normalize: bool = True, **overrides: Any) -> Preprocessing:
        """The preprocessing the model's own processor does (or the release's, for a model that ships none),
        with Macenko on or off; `overrides` that are not None replace single fields (e.g. `stain_reference`)."""
        values = {"image_mean": self.image_mean, "image_std": self.image_std, **self.preprocessing_defaults}
        values.update({key: value for key, value in overrides.items() if value is not None})
        return Preprocessing(**{**values, "stain_normalize": stain_normalize})


def _content_hash(paths: list[Path]) -> str:
    """sha256 of the weight files' bytes: a local folder has no commit, its content is its revision."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def _weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json"]


def _feature_dim(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("hidden_size", "embed_dim", "hidden_sizes"):
        value = getattr(config, name, None)
        if value is not None:
            return value[-1] if isinstance(value, (list, tuple)) else int(value)
    return int(model.num_features)


def _load_timm(name: str, pooling: Pooling) -> Encoder:
    import timm

    model = timm.create_model(name, pretrained=True, num_classes=0).eval()
    config = model.pretrained_cfg
    return Encoder(
        model=model,
        source=name if name.startswith("hf-hub:") else f"timm:{name}",
        revision=str(config.get("hf_hub_id") or config.get("tag") or "timm-default"),
        kind="timm",
        pooling="timm-default" if pooling == "auto" else pooling,
        feature_dim=model.num_features,
        image_mean=tuple(config.get("mean", IMAGENET_MEAN)),
        image_std=tuple(config.get("std", IMAGENET_STD)),
    )


def _own_preprocessing(source: str, revision: str | None) -> dict[str, Any]:
    """`Preprocessing` fields from the EXAONEPath processor saved with the model; {} when it ships none (a
    converted checkpoint without `preprocessor_config.json`: the release's preprocessing applies)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        logger.info(
            "%s ships no image processor (%s): the release's preprocessing", source, type(error).__name__
        )
        return {}
    if not isinstance(processor, ExaonePathImageProcessor):
        raise ValueError(
            f"{source} is an EXAONEPath model whose preprocessor_config.json names {type(processor).__name__}; "
            "save the model's processor with ExaonePathImageProcessor.save_pretrained"
        )
    return {
        "stain_reference": StainReference.from_dict(processor.stain_reference),
        "resize_shortest_edge": int(processor.size["shortest_edge"]),
        "crop_size": int(processor.crop_size["height"]),
        "image_mean": tuple(processor.image_mean),
        "image_std": tuple(processor.image_std),
        "stain_io": float(processor.stain_io),
        "stain_alpha": float(processor.stain_alpha),
        "stain_beta": float(processor.stain_beta),
        "min_tissue_fraction": float(processor.min_tissue_fraction),
        "max_stain_angle": processor.max_stain_angle,
    }


def _processor_stats(source: str, revision: str | None) -> tuple[tuple, tuple]:
    """The encoder's own normalization mean/std when it ships a processor, else ImageNet's."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        logger.info("%s ships no image processor (%s); using ImageNet mean/std", source, type(error).__name__)
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(processor.image_mean), tuple(processor.image_std)


def load_encoder(
    source: str | os.PathLike,
    pooling: Pooling = "auto",
    revision: str | None = None,
    device: str | torch.device = "cpu",
) -> Encoder:
    """Load a frozen encoder from any supported source (see the module docstring); `eval()`, on `device`."""
    text = str(source)
    if text.startswith("timm:"):
        encoder = _load_timm(text.removeprefix("timm:"), pooling)
    elif text.startswith("hf-hub:"):
        encoder = _load_timm(text, pooling)
    elif Path(text).is_file() and Path(text).suffix in WEIGHT_SUFFIXES:
        model = load_backbone(text)
        encoder = Encoder(
            model=model,
            source=str(Path(text).resolve()),
            revision=_content_hash([Path(text)]),
            kind="exaonepath",
            pooling="pooler" if pooling == "auto" else pooling,
            feature_dim=model.config.hidden_size,
        )
    else:
        from transformers import AutoConfig, AutoModel

        check_model_source(text, revision)
        try:
            config = AutoConfig.from_pretrained(text, revision=revision)
        except (
            OSError
        ) as error:  # transformers' answer for a folder without a config or an unknown repository
            raise ValueError(f"cannot load a model from {text}: {str(error).splitlines()[0]}") from error
        is_ours = isinstance(config, ExaonePathConfig)
        model = AutoModel.from_pretrained(text, revision=revision).eval()
        local = Path(text).is_dir()
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if is_ours else _processor_stats(text, revision)
        encoder = Encoder(
            model=model,
            source=str(Path(text).resolve()) if local else text,
            revision=_content_hash(_weight_files(Path(text)))
            if local
            else str(getattr(config, "_commit_hash", None) or revision or "main"),
            kind="exaonepath" if is_ours else "transformers",
            pooling=("pooler" if is_ours else "cls") if pooling == "auto" else pooling,
            feature_dim=_feature_dim(model),
            image_mean=mean,
            image_std=std,
            preprocessing_defaults=_own_preprocessing(text, revision) if is_ours else {},
        )
    encoder.model.to(device).eval().requires_grad_(False)
    return encoder
