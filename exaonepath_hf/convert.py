"""Convert EXAONEPath, DINO and timm ViT checkpoints to a `save_pretrained` folder, and push it to the hub.

Foreign layouts are converted at the edge, by filtering the state dict, never by renaming our modules:

- the release checkpoint `EXAONEPath.ckpt` (`{"state_dict": ...}`), possibly with `module.`, `backbone.`,
  `teacher.` or `student.` prefixes and a DINO projection head;
- the release's hub layout: a folder (or hub repo) with a timm-style `config.json` (`img_size`, `embed_dim`,
  `depth`, ...) and `model.safetensors`;
- timm or DINO ImageNet ViT weights (`.safetensors`, `.pth`, `.bin`; DINO's full training checkpoints
  `{"teacher": ..., "student": ...}` too), the initialisation of EXAONEPath's pretraining;
- a folder written by this converter (`save_pretrained`).

Loading is strict: a missing, unexpected or mis-shaped tensor is an error naming every such key. Pickled
files are read only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file

from .atomic_io import atomic_directory
from .configuration_exaonepath import ExaonePathConfig
from .image_processing_exaonepath import ExaonePathImageProcessor
from .modeling_exaonepath import ExaonePathModel

logger = logging.getLogger(__name__)

# Wrappers that training frameworks put around the backbone's names (DDP, DINO's MultiCropWrapper, EMA).
WRAPPER_PREFIXES = ("module.", "backbone.", "teacher.", "student.", "model.")
# Heads that sit beside the backbone in DINO and timm checkpoints: dropped, and reported.
DINO_HEAD = re.compile(
    r"^head\.(mlp\.\d+\.(weight|bias)|last_layer\.(weight|weight_g|weight_v|bias|parametrizations\.weight\.original[01]))$"
)
CLASSIFIER_HEAD = re.compile(r"^head\.(weight|bias)$")
# The release's hub config.json (timm/DINO constructor arguments) → ExaonePathConfig.
RELEASE_CONFIG_KEYS = {
    "embed_dim": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "patch_size": "patch_size",
    "in_chans": "num_channels",
}
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the model: lists every missing, unexpected and mis-shaped key."""


@dataclass
class ConvertedCheckpoint:
    """A backbone state dict in our (= the release's) names, its config, and what was dropped on the way."""

    state_dict: dict[str, torch.Tensor]
    config: ExaonePathConfig
    dropped_keys: list[str] = field(default_factory=list)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors directly, pickles only with `weights_only=True`."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for unsafe or bad files
        raise ValueError(
            f"cannot read {path} as a weights-only torch checkpoint ({error}). Only plain tensors are loaded "
            "for safety; re-save the state dict with torch.save(model.state_dict(), ...) or as safetensors."
        ) from error
    return unwrap_checkpoint(checkpoint, path)


def unwrap_checkpoint(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """The backbone state dict inside the containers that Lightning, DINO, DeiT and timm save."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict.")
    # DINO's full checkpoints hold both networks: the teacher is the one whose features are used.
    for container in ("state_dict", "teacher", "model", "student"):
        if isinstance(checkpoint.get(container), dict):
            return unwrap_checkpoint(checkpoint[container], path)
    tensors = {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} has no tensors (keys: {sorted(checkpoint)[:10]}).")
    return tensors


def filter_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes and drop recognised DINO/classifier heads; returns (backbone, dropped keys)."""
    backbone, dropped = {}, []
    for key, tensor in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if DINO_HEAD.match(name) or CLASSIFIER_HEAD.match(name):
            dropped.append(key)
            continue
        backbone[name] = tensor
    return backbone, dropped


def infer_config(
    state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None
) -> ExaonePathConfig:
    """The architecture a ViT state dict describes. Head count is not in the shapes: 64-d heads unless given."""
    required = ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise CheckpointMismatchError(
            f"not a ViT backbone state dict: missing {missing}; found e.g. {sorted(state_dict)[:8]}"
        )
    hidden_size, num_channels, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    block_ids = {int(match.group(1)) for key in state_dict if (match := re.match(r"blocks\.(\d+)\.", key))}
    return ExaonePathConfig(
        hidden_size=hidden_size,
        num_hidden_layers=max(block_ids) + 1,
        num_attention_heads=num_attention_heads or max(1, hidden_size // 64),
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        image_size=grid * patch_size,
        patch_size=patch_size,
        num_channels=num_channels,
    )


def config_from_release_json(release_config: dict) -> ExaonePathConfig:
    """Our config from the release's hub `config.json` (timm constructor arguments); LayerNorm eps 1e-6."""
    kwargs = {
        ours: release_config[theirs]
        for theirs, ours in RELEASE_CONFIG_KEYS.items()
        if theirs in release_config
    }
    image_size = release_config.get("img_size", 224)
    kwargs["image_size"] = image_size[0] if isinstance(image_size, list | tuple) else image_size
    if release_config.get("num_classes", 0):
        logger.info(
            "release config has num_classes=%s; the classifier head is dropped", release_config["num_classes"]
        )
    return ExaonePathConfig(**kwargs)


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: object) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {source} does not match the EXAONEPath model:\n" + "\n".join(problems)
        )


def read_checkpoint(
    source: str | os.PathLike, config: ExaonePathConfig | None = None, num_attention_heads: int | None = None
) -> ConvertedCheckpoint:
    """Read any supported checkpoint (file or folder) into our names, with the config it describes."""
    path = Path(source)
    if path.is_dir():
        config_path, weights = path / "config.json", sorted(path.glob("*.safetensors"))
        if not weights:
            weights = [p for p in sorted(path.iterdir()) if p.suffix in WEIGHT_SUFFIXES]
        if not weights:
            raise FileNotFoundError(f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
        if len(weights) > 1:
            raise ValueError(
                f"{path} has several weights files {[p.name for p in weights]}; pass one of them."
            )
        raw = read_tensors(weights[0])
        if config is None and config_path.is_file():
            folder_config = json.loads(config_path.read_text())
            if folder_config.get("model_type") == ExaonePathConfig.model_type:
                config = ExaonePathConfig.from_dict(folder_config)
            elif "embed_dim" in folder_config:
                config = config_from_release_json(folder_config)
    elif path.is_file():
        raw = read_tensors(path)
    else:
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state_dict, dropped = filter_state_dict(raw)
    if dropped:
        logger.warning(
            "dropped %d head tensors not part of the backbone: %s", len(dropped), ", ".join(dropped)
        )
    config = config or infer_config(state_dict, num_attention_heads)
    return ConvertedCheckpoint(state_dict=state_dict, config=config, dropped_keys=dropped)


def load_backbone(
    source: str | os.PathLike, config: ExaonePathConfig | None = None, num_attention_heads: int | None = None
) -> ExaonePathModel:
    """An `ExaonePathModel` with the weights of any supported checkpoint, loaded strictly."""
    checkpoint = read_checkpoint(source, config, num_attention_heads)
    model = ExaonePathModel(checkpoint.config)
    check_state_dict(model, checkpoint.state_dict, source)
    model.load_state_dict(checkpoint.state_dict, strict=True)
    return model.eval()


def model_card_text() -> str:
    """The model card written as README.md into every converted or pushed folder."""
    return resources.files("exaonepath_hf").joinpath("model_card.md").read_text(encoding="utf-8")


def save_folder(
    model: ExaonePathModel,
    out_dir: str | os.PathLike,
    processor: ExaonePathImageProcessor | None = None,
    overwrite: bool = False,
    model_card: str | None = None,
) -> Path:
    """Write model, processor, remote code and card to `out_dir` atomically (a temp folder renamed at the end).

    Without a `processor`, the release's preprocessing with the default (HEnorm) stain reference is saved;
    without a `model_card`, the EXAONEPath release card.
    """
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        (processor or ExaonePathImageProcessor()).save_pretrained(staging)
        (staging / "README.md").write_text(model_card or model_card_text(), encoding="utf-8")
    return Path(out_dir)


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload EXAONEPath model",
) -> str:
    """Upload a converted folder (config, weights, remote code, processor, model card) to a hub model repo."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


def convert(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    num_attention_heads: int | None = None,
    push_to_hub: str | None = None,
    private: bool | None = None,
) -> Path:
    """Convert `source` (see `load_backbone`) into the `save_pretrained` folder `out_dir`; optionally upload it."""
    model = load_backbone(source, num_attention_heads=num_attention_heads)
    out_dir = save_folder(model, out_dir, overwrite=overwrite)
    config = model.config
    print(
        f"converted {source} → {out_dir}: ViT {config.hidden_size}d × {config.num_hidden_layers} blocks, "
        f"{config.num_attention_heads} heads, patch {config.patch_size}, {model.num_parameters() / 1e6:.1f}M params"
    )
    if push_to_hub:
        print(f"pushed to {push_folder_to_hub(out_dir, push_to_hub, private=private)}")
    return out_dir
