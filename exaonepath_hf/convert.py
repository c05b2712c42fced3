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

The folder is written in transformers' layout or in timm's (`timm.create_model("local-dir:...")`, which applies
no Macenko: its card says so). Its model card is the released EXAONEPath's (LG's licence, H&E pretraining) only
for weights the caller declares to be the release (`weights_source`); any other weights get a card that claims
neither (`architecture_card`, which the pretraining export's card can share).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors.torch import load_file
from transformers.image_utils import PILImageResampling

from .atomic_io import atomic_directory
from .configuration_exaonepath import ExaonePathConfig
from .hub import network_errors, require_hub
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


#: What a folder's card may say about its weights: the released EXAONEPath checkpoint (LG's licence, H&E
#: pretraining) only when the caller says so; anything else gets a card that claims neither.
WeightsSource = Literal["exaonepath-release", "other"]
#: The layout written: transformers' `save_pretrained`, or timm's (`timm.create_model("local-dir:...")`).
FolderFormat = Literal["transformers", "timm"]
# model_card.md marks its format-specific part (how to load) so that the timm export can swap it.
USAGE_START, USAGE_END = "<!-- usage -->\n", "<!-- /usage -->\n"
TIMM_USAGE = """## How to use

This folder holds the model in the [timm](https://github.com/huggingface/pytorch-image-models) format, written by
[exaonepath-hf](https://github.com/exaonepath-hf/exaonepath-hf) (`exaonepath-convert --format timm`): timm's
`config.json` (architecture, and `pretrained_cfg` with the resize, crop and mean/std), `model.safetensors`,
`preprocessor_config.json` with the Macenko stain reference, the processor code, and this card.

**timm does not apply Macenko stain normalization**: the transforms it builds from `pretrained_cfg` only resize,
crop and normalize. Apply it yourself, to the full patch, before those steps: this folder's image processor
does the whole preprocessing (Macenko with the stored reference → resize → crop → normalize):

```python
import timm
import torch
from PIL import Image
from exaonepath_hf import ExaonePathImageProcessor  # pip install exaonepath-hf

model = timm.create_model("hf-hub:REPO_ID", pretrained=True).eval()  # or "local-dir:PATH"
processor = ExaonePathImageProcessor.from_pretrained("PATH_OR_REPO")
pixel_values = processor(Image.open("patch.png"), return_tensors="pt")["pixel_values"]
with torch.no_grad():
    features = model(pixel_values)  # the CLS token after the final LayerNorm
```

Without exaonepath-hf: `AutoImageProcessor.from_pretrained("PATH_OR_REPO", trust_remote_code=True,
image_processor_filename="preprocessor_config.json")` (transformers otherwise reads timm's `config.json` and
returns timm's processor, without Macenko). To keep timm's own transforms, normalize the full patches first
with `processor.stain_normalizer()` (an `exaonepath_hf.MacenkoNormalizer` with the stored reference):
`.normalize(uint8_batch).images` are float 0..1 images that timm's transforms take as they are.
"""


def model_card_text() -> str:
    """The released EXAONEPath's card (model_card.md), written only for weights declared to be the release."""
    return resources.files("exaonepath_hf").joinpath("model_card.md").read_text(encoding="utf-8")


def usage_section(library: FolderFormat = "transformers") -> str:
    """How to load and run a folder of this format: model_card.md's usage part, or timm's."""
    if library == "timm":
        return TIMM_USAGE
    card = model_card_text()
    return card[card.index(USAGE_START) + len(USAGE_START) : card.index(USAGE_END)]


def release_card(library: FolderFormat = "transformers") -> str:
    """The release card, its loading instructions in `library`'s format."""
    card = model_card_text()
    if library == "transformers":
        return card
    head, rest = card.split(USAGE_START, 1)
    head = head.replace("library_name: transformers", f"library_name: {library}")
    head = head.replace("(transformers format)", f"({library} format)")
    return head + USAGE_START + usage_section(library) + rest[rest.index(USAGE_END) :]


def architecture_card(
    title: str,
    about: str,
    *,
    library: FolderFormat = "transformers",
    tags: tuple[str, ...] = ("pathology", "histopathology", "vision-transformer", "exaonepath"),
    details: str = "",
) -> str:
    """The card of weights that are not the released EXAONEPath: no licence and no training data are claimed
    (`about` says what the weights are); loading instructions for `library`; `details` appended."""
    front_matter = (
        f"---\nlibrary_name: {library}\npipeline_tag: image-feature-extraction\ntags: [{', '.join(tags)}]\n"
        "arxiv: 2408.00380\n---\n"
    )
    return (
        f"{front_matter}\n# {title}\n\n{about.strip()}\n\n{usage_section(library).strip()}\n\n"
        "For research only, not for diagnosis.\n" + (f"\n{details.strip()}\n" if details else "")
    )


def check_release_architecture(config: ExaonePathConfig) -> None:
    """Refuse to call weights the release when their shape says otherwise (the release is a ViT-B/16, 224 px)."""
    release = ExaonePathConfig()
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "qkv_bias")
    fields += ("patch_size", "image_size", "num_channels")
    differ = [
        f"{name} {getattr(config, name)} (release {getattr(release, name)})"
        for name in fields
        if getattr(config, name) != getattr(release, name)
    ]
    if differ:
        raise ValueError(
            f"--weights_source exaonepath-release: the released EXAONEPath is a ViT-B/16, but these weights differ "
            f"({', '.join(differ)}); convert them without --weights_source"
        )


def conversion_card(
    model: ExaonePathModel,
    source: str | os.PathLike | None,
    weights_source: WeightsSource,
    library: FolderFormat = "transformers",
) -> str:
    """The card a conversion writes: the release card only for weights declared (and shaped) as the release."""
    if weights_source == "exaonepath-release":
        check_release_architecture(model.config)
        return release_card(library)
    config = model.config
    origin = f" from `{Path(source).name}`" if source is not None else ""
    about = (
        f"A ViT with EXAONEPath's architecture ({config.hidden_size}-d, {config.num_hidden_layers} blocks, "
        f"{config.num_attention_heads} heads, patch {config.patch_size}, {config.image_size} px, "
        f"{model.num_parameters() / 1e6:.1f}M parameters), converted by "
        f"[exaonepath-hf](https://github.com/exaonepath-hf/exaonepath-hf){origin}. They were "
        "not declared to be the released EXAONEPath weights (`exaonepath-convert --weights_source "
        "exaonepath-release` does that), so this card claims nothing about their training data; their licence "
        "is that of the weights they came from.\n\n"
        "The image processor applies EXAONEPath's preprocessing as `preprocessor_config.json` records it "
        "(Macenko stain normalization unless `do_stain_normalize` is false, resize, crop, mean/std). Weights "
        "trained without Macenko, such as ImageNet ViTs, may be better served with `do_stain_normalize=False`."
    )
    return architecture_card("EXAONEPath-architecture ViT (converted weights)", about, library=library)


def source_processor(source: str | os.PathLike) -> ExaonePathImageProcessor:
    """The processor saved beside `source` when it is a folder of ours (its stain reference travels with the
    weights), else the release's preprocessing with the default (HEnorm) reference."""
    config_path = Path(source) / "preprocessor_config.json"
    if config_path.is_file():
        saved = json.loads(config_path.read_text())
        if saved.get("image_processor_type") == ExaonePathImageProcessor.__name__:
            return ExaonePathImageProcessor.from_pretrained(source)
    return ExaonePathImageProcessor()


def write_folder(
    model: ExaonePathModel, folder: Path, processor: ExaonePathImageProcessor, model_card: str
) -> None:
    """transformers' layout into the existing `folder`: config, weights, remote code, processor, card."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text(model_card, encoding="utf-8")


def timm_architecture(config: ExaonePathConfig) -> tuple[str, dict]:
    """timm's model name for `config` and the constructor arguments that differ from it."""
    import timm

    if config.layer_norm_eps != 1e-6:  # timm's ViT hard-codes it; a config.json cannot override a norm layer
        raise ValueError(f"timm's ViT uses LayerNorm eps 1e-6; this model uses {config.layer_norm_eps}")
    sizes = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large"}
    size = sizes.get((config.hidden_size, config.num_hidden_layers, config.num_attention_heads))
    name = f"vit_{size}_patch{config.patch_size}_{config.image_size}"
    standard = config.mlp_ratio == 4 and config.qkv_bias and config.num_channels == 3
    if size is not None and standard and timm.is_model(name):
        return name, {}
    return "vit_base_patch16_224", {
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": config.mlp_ratio,
        "qkv_bias": config.qkv_bias,
        "patch_size": config.patch_size,
        "img_size": config.image_size,
        "in_chans": config.num_channels,
    }


def timm_data_config(processor: ExaonePathImageProcessor) -> dict:
    """timm's `pretrained_cfg` preprocessing for what the processor does after Macenko."""
    crop, shortest = processor.crop_size["height"], processor.size.get("shortest_edge")
    crop_pct = crop / shortest if shortest else 0.0
    steps = (processor.do_resize, processor.do_center_crop, processor.do_rescale, processor.do_normalize)
    expressible = all(steps) and processor.crop_size["width"] == crop
    # timm resizes to floor(crop / crop_pct): it must land on the processor's shortest edge
    if not (expressible and shortest and math.floor(crop / crop_pct) == shortest):
        raise ValueError(
            "timm's transforms resize the shortest edge, center-crop a square, rescale and normalize; this "
            f"processor does resize={processor.do_resize} {processor.size}, crop={processor.do_center_crop} "
            f"{processor.crop_size}, rescale={processor.do_rescale}, normalize={processor.do_normalize}"
        )
    return {
        "input_size": (3, crop, crop),  # the processor always makes RGB
        "interpolation": PILImageResampling(processor.resample).name.lower(),
        "mean": tuple(processor.image_mean),
        "std": tuple(processor.image_std),
        "crop_pct": crop_pct,
        "crop_mode": "center",
    }


def write_timm_folder(
    model: ExaonePathModel, folder: Path, processor: ExaonePathImageProcessor, model_card: str
) -> None:
    """timm's layout into the existing `folder`: its `config.json` and `model.safetensors` (written by timm
    from a timm ViT holding these weights), plus our processor (Macenko reference and code) and the card."""
    try:
        import timm
        from timm.models import save_for_hf
    except ImportError as error:
        raise ValueError("--format timm needs timm: pip install timm") from error
    architecture, model_args = timm_architecture(model.config)
    vit = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    vit.load_state_dict(model.state_dict(), strict=True)  # our names are timm's; a rename would fail here
    save_for_hf(vit, folder, safe_serialization=True, data_config=timm_data_config(processor))
    config_path = folder / "config.json"
    timm_config = json.loads(config_path.read_text())
    # the architecture's default cfg names timm's ImageNet weights (tag, licence); these weights are not them
    for key in ("tag", "license"):
        timm_config["pretrained_cfg"].pop(key, None)
    config_path.write_text(json.dumps(timm_config, indent=2) + "\n", encoding="utf-8")
    processor.save_pretrained(folder)
    (folder / "README.md").write_text(model_card, encoding="utf-8")


def save_folder(
    model: ExaonePathModel,
    out_dir: str | os.PathLike,
    processor: ExaonePathImageProcessor | None = None,
    overwrite: bool = False,
    model_card: str | None = None,
) -> Path:
    """Write model, processor, remote code and card to `out_dir` atomically (a temp folder renamed at the end).

    Without a `processor`, the release's preprocessing with the default (HEnorm) stain reference is saved;
    without a `model_card`, a card that claims nothing about the weights (`conversion_card`).
    """
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        card = model_card or conversion_card(model, None, "other")
        write_folder(model, staging, processor or ExaonePathImageProcessor(), card)
    return Path(out_dir)


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload EXAONEPath model",
) -> str:
    """Upload a converted folder (config, weights, remote code, processor, model card) to a hub model repo.

    A failed upload (offline, no network, no or wrong token, no permission) raises ValueError in one line
    saying how to upload the folder later, instead of the hub client's traceback.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    except network_errors() as error:
        reason = " ".join(str(error).split())  # its messages span lines (request ids, hints)
        raise ValueError(
            f"uploading {folder} to {repo_id} failed ({type(error).__name__}: {reason}); the folder is complete: "
            f"upload it later with `hf upload {repo_id} {folder}` (after `hf auth login`)"
        ) from error
    return str(getattr(commit, "commit_url", commit))


def convert(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    num_attention_heads: int | None = None,
    push_to_hub: str | None = None,
    private: bool | None = None,
    folder_format: FolderFormat = "transformers",
    weights_source: WeightsSource = "other",
) -> Path:
    """Convert `source` (see `load_backbone`) into the folder `out_dir` (transformers' or timm's layout, with
    the card `conversion_card` writes); optionally upload it.

    An existing `out_dir` (without `overwrite`) and an unreachable hub (with `push_to_hub`) are refused before
    the checkpoint is read.
    """
    for value, allowed in ((folder_format, FolderFormat), (weights_source, WeightsSource)):
        if value not in get_args(allowed):
            raise ValueError(f"{value!r} is not one of {', '.join(get_args(allowed))}")
    if push_to_hub:
        require_hub(f"push to {push_to_hub}")
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        model = load_backbone(source, num_attention_heads=num_attention_heads)
        card = conversion_card(model, source, weights_source, folder_format)
        write = write_timm_folder if folder_format == "timm" else write_folder
        write(model, staging, source_processor(source), card)
    config = model.config
    print(
        f"converted {source} → {out_dir} ({folder_format} format): ViT {config.hidden_size}d × "
        f"{config.num_hidden_layers} blocks, {config.num_attention_heads} heads, patch {config.patch_size}, "
        f"{model.num_parameters() / 1e6:.1f}M params; model card: "
        + (
            "the EXAONEPath release's"
            if weights_source == "exaonepath-release"
            else "converted weights, no licence or training claimed (--weights_source exaonepath-release for "
            "the released checkpoint)"
        )
    )
    if push_to_hub:
        print(f"pushed to {push_folder_to_hub(out_dir, push_to_hub, private=private)}")
    return Path(out_dir)
