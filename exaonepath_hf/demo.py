"""`exaonepath-demo`: the whole EXAONEPath idea on a real slide, offline, in minutes on a laptop CPU.

1. Tile the bundled CC0 slide CMU-1-Small-Region.svs at 0.5 µm/px into 256 px tissue patches (thumbnail with
   the tissue grid).
2. Re-stain every patch with four different stain references, as four labs would: four "virtual slides" of
   the same tissue in four colourings.
3. Get an EXAONEPath-architecture model: the released weights when `--model` points at a converted folder or
   hub repo; otherwise a small ViT pretrained here for a few minutes with the package's own DINO loop on the
   Macenko-normalized patches (clearly a demo model, not EXAONEPath).
4. Extract features from raw and from Macenko-normalized input, and measure how much they cluster by virtual
   slide (kNN slide accuracy, silhouette, variance between slides), with a t-SNE per setting.

    exaonepath-demo --out exaonepath-demo                      # demo model, a few minutes on a CPU
    exaonepath-demo --out exaonepath-demo --model path/to/exaonepath-vitb16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic_io import atomic_save_tensors, atomic_write_bytes, atomic_write_text
from .images import decode_rgb
from .stain_normalization import DEFAULT_STAIN_REFERENCE, MacenkoNormalizer, StainReference
from .tiling import TilingConfig, load_patch_dataset, tile_slides

logger = logging.getLogger("exaonepath-demo")

SAMPLE_SLIDE = "CMU-1-Small-Region.svs"
# Four stain references a lab could have: hematoxylin from blue-violet to grey-purple, eosin from pink to
# orange-red, and different stain amounts. Unit columns, hematoxylin first, as Macenko produces them.
LAB_STAINS = {
    "lab-A": DEFAULT_STAIN_REFERENCE,
    "lab-B": StainReference(((0.45, 0.10), (0.80, 0.85), (0.40, 0.52)), (2.4, 0.7)),
    "lab-C": StainReference(((0.68, 0.30), (0.62, 0.70), (0.39, 0.65)), (1.4, 1.5)),
    "lab-D": StainReference(((0.55, 0.05), (0.75, 0.60), (0.37, 0.80)), (2.0, 1.2)),
}
DEMO_TRAINING = [
    "model.hidden_size=192",
    "model.num_hidden_layers=4",
    "model.num_attention_heads=3",
    "model.image_size=224",
    "model.drop_path_rate=0.0",
    "model.head_hidden_dim=512",
    "model.head_bottleneck_dim=128",
    "model.out_dim=4096",
    "augmentations.global_crop_size=96",
    "augmentations.local_crop_size=48",
    "augmentations.num_local_crops=4",
    "run.batch_size_per_device=16",
    "run.checkpoint_every=1000000",
    "run.record_samples=false",
    "optim.warmup_steps=10",
    "data.num_workers=1",
]


def missing_extras() -> str | None:
    """The demo trains and evaluates: which extra is missing (a message), so that it does not fail halfway."""
    missing = [
        module for module in ("yaml", "sklearn", "matplotlib") if importlib.util.find_spec(module) is None
    ]
    if not missing:
        return None
    return (
        f'exaonepath-demo needs {", ".join(missing)}: install the extras with pip install -e ".[train,eval]" '
        '(or pip install "exaonepath-hf[train,eval]")'
    )


def sample_slide() -> Path:
    return Path(str(resources.files("exaonepath_hf").joinpath("data", SAMPLE_SLIDE)))


def tile_sample(out: Path, num_workers: int) -> tuple[Path, Path]:
    """Tile the bundled slide; returns the tiles folder and a copy of its thumbnail."""
    tiles = out / "tiles"
    summary = tile_slides([sample_slide()], tiles, TilingConfig(patch_size=256, target_mpp=0.5), num_workers)
    if summary.failures:
        raise RuntimeError(f"tiling the sample slide failed: {summary.failures}")
    thumbnail = out / "thumbnail.png"
    atomic_write_bytes(thumbnail, next((tiles / "thumbnails").glob("*.png")).read_bytes())
    return tiles, thumbnail


def read_patches(tiles: Path) -> tuple[list[torch.Tensor], np.ndarray]:
    """All patches as uint8 CHW tensors, with their level-0 (x, y)."""
    images, coordinates = [], []
    for row in load_patch_dataset(tiles, streaming=False):
        images.append(torch.from_numpy(decode_rgb(row["image"])).permute(2, 0, 1).contiguous())
        coordinates.append((row["x"], row["y"]))
    return images, np.asarray(coordinates, dtype=np.int64)


def restain_as_labs(images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[str], list[int]]:
    """Every patch in the colours of each of four labs: (images, lab of each, source patch index of each)."""
    batch = torch.stack(images)
    restained, labs, sources = [], [], []
    for lab, reference in LAB_STAINS.items():
        output = MacenkoNormalizer(reference=reference).normalize(batch)
        restained += list((output.images * 255).round().clamp(0, 255).to(torch.uint8))
        labs += [lab] * len(images)
        sources += list(range(len(images)))
    return restained, labs, sources


def pretrain_demo_model(tiles: Path, out: Path, steps: int) -> Path:
    """A small ViT trained with the package's DINO loop on the Macenko-normalized patches; returns its folder."""
    from .train.pretrain_dino import main as pretrain

    run_dir = out / "demo-model-training"
    overrides = [
        f"data.source={tiles}",
        f"run.output_dir={run_dir}",
        f"run.max_steps={steps}",
        *DEMO_TRAINING,
    ]
    if pretrain(["--config", "cpu_smoke", *overrides]) != 0:
        raise RuntimeError(f"demo pretraining failed; see the log above and {run_dir}")
    return run_dir / "export"


def extract(model, processor, images: list[torch.Tensor], stain_normalize: bool, batch_size: int = 32):
    """Features of `images` and how many Macenko fell back on, with or without stain normalization."""
    features, fallbacks = [], 0
    device = next(model.parameters()).device
    setting = "Macenko" if stain_normalize else "raw"
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=f"features ({setting} input)", leave=False):
            inputs = processor(
                images[start : start + batch_size], do_stain_normalize=stain_normalize, return_tensors="pt"
            )
            if stain_normalize:
                fallbacks += int((~inputs["stain_normalized"]).sum())
            features.append(model(pixel_values=inputs["pixel_values"].to(device)).pooler_output.float().cpu())
    return torch.cat(features), fallbacks


def measure_collapse(
    out: Path, model_name: str, features: dict[str, torch.Tensor], groups: list[str]
) -> dict:
    """Slide-clustering metrics and t-SNE for each input setting; writes the markdown, JSON and PNG."""
    from .eval.feature_collapse import CollapseInput, assess_collapse, render_markdown

    inputs = [CollapseInput(model_name, setting, values, groups) for setting, values in features.items()]
    results, _ = assess_collapse(inputs, out / "tsne.png")
    atomic_write_text(
        out / "feature_collapse.md",
        "# Feature collapse by virtual slide (each patch in 4 lab stainings)\n\n"
        "kNN slide accuracy near 1: features encode the stain, not the tissue (WSI-specific feature collapse); "
        "below chance: the 4 stainings of a patch are each other's neighbours.\n\n"
        + render_markdown(results),
    )
    atomic_write_text(out / "feature_collapse.json", json.dumps(results, indent=2))
    return {result["setting"]: result["by_group"] for result in results}


def load_model(source: str | Path, device: str):
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(source).eval().to(device)
    return model, AutoImageProcessor.from_pretrained(source)


@dataclass(frozen=True)
class DemoSettings:
    """One demo run: where it writes, which model (None: pretrain a demo ViT for `train_steps` steps)."""

    out: Path = Path("exaonepath-demo")
    model: str | None = None
    train_steps: int = 40
    workers: int = 1
    device: str = "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="exaonepath-demo", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--model", help="converted EXAONEPath folder or hub repo; default: pretrain a demo model"
    )
    parser.add_argument(
        "--train_steps", "--train-steps", type=int, default=40, help="DINO steps of the demo model"
    )
    parser.add_argument("--workers", type=int, default=1, help="tiling processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def save_features(
    out: Path, model_name: str, raw: torch.Tensor, normalized: torch.Tensor, coordinates, labs: list[str]
) -> Path:
    """`features.safetensors`: raw and Macenko features, each row's coordinates and virtual slide."""
    path = out / "features.safetensors"
    atomic_save_tensors(
        path,
        {
            "raw": raw,
            "macenko": normalized,
            "coordinates": torch.from_numpy(coordinates),
            "virtual_slide": torch.tensor([list(LAB_STAINS).index(lab) for lab in labs]),
        },
        metadata={"model": model_name, "virtual_slides": json.dumps(list(LAB_STAINS))},
    )
    return path


def print_summary(
    minutes: float, model_name: str, num_patches: int, fallbacks: int, metrics: dict, out: Path
):
    print(f"\nDone in {minutes:.1f} min. Model: {model_name}")
    print(
        f"Patches: {num_patches} from {SAMPLE_SLIDE} x {len(LAB_STAINS)} stainings; Macenko fallbacks: {fallbacks}"
    )
    for setting, values in metrics.items():
        print(
            f"  {setting:>13}: kNN slide accuracy {values['knn_accuracy']:.2f} (chance {values['knn_chance']:.2f}), "
            f"silhouette {values['silhouette']:.2f}, variance between slides {values['variance_between']:.2f}"
        )
    print(
        f"Outputs in {out}/: features.safetensors, feature_collapse.md/.json, tsne.png, thumbnail.png, tiles/"
    )


def run_demo(settings: DemoSettings) -> dict:
    """Tile, re-stain, get a model, measure feature collapse (see the module docstring); returns the metrics
    per input setting."""
    start = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] tiling {SAMPLE_SLIDE} at 0.5 µm/px into 256 px tissue patches")
    tiles, thumbnail = tile_sample(out, settings.workers)
    images, coordinates = read_patches(tiles)
    print(f"      {len(images)} tissue patches; grid drawn on {thumbnail}")

    print("[2/4] re-staining the patches as four labs would (virtual slides lab-A..lab-D)")
    restained, labs, sources = restain_as_labs(images)

    if settings.model:
        model_name, model_folder = f"EXAONEPath ({settings.model})", settings.model
        print(f"[3/4] loading {settings.model}")
    else:
        model_name = f"demo ViT ({settings.train_steps} DINO steps here; not EXAONEPath)"
        print(
            f"[3/4] pretraining a DEMO model: ViT 192-d x 4 blocks, {settings.train_steps} DINO steps on "
            "Macenko patches"
        )
        model_folder = pretrain_demo_model(tiles, out, settings.train_steps)
    model, processor = load_model(model_folder, settings.device)

    print("[4/4] extracting features from raw and Macenko input; measuring clustering by virtual slide")
    raw, _ = extract(model, processor, restained, stain_normalize=False)
    normalized, fallbacks = extract(model, processor, restained, stain_normalize=True)
    save_features(out, model_name, raw, normalized, coordinates[sources], labs)
    metrics = measure_collapse(out, model_name, {"raw input": raw, "Macenko input": normalized}, labs)
    print_summary((time.perf_counter() - start) / 60, model_name, len(images), fallbacks, metrics, out)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    problem = missing_extras()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    settings = DemoSettings(
        out=Path(args.out),
        model=args.model,
        train_steps=args.train_steps,
        workers=args.workers,
        device=args.device,
    )
    run_demo(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
