"""`exaonepath-demo` as a library: `run_demo(DemoSettings(...))` tiles the bundled slide, re-stains its
patches as virtual labs would, gets an EXAONEPath-architecture model (the released weights, or a demo ViT
pretrained here) and measures its robustness on raw and Macenko input. The steps and the command line:
`demo_cli` (`DEMO_DESCRIPTION`, which `exaonepath-demo --help` prints).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .atomic_io import atomic_write_bytes
from .images import decode_rgb
from .tiling import TilingConfig, load_patch_dataset, slide_id_from_path, tile_slides

logger = logging.getLogger("exaonepath-demo")

SAMPLE_SLIDE = "CMU-1-Small-Region.svs"
SETTING_NAMES = {"raw": "raw input", "macenko": "Macenko input"}
DEMO_CAVEAT = (
    "What a demo ViT can and cannot show: it shows the protocol end to end and how Macenko input moves the "
    "numbers for this tiny model trained for seconds; it says nothing about EXAONEPath or any real encoder, "
    "and virtual labs differ in stain only (not scanner or tissue processing): run the released weights "
    "(--model) on real multi-centre data (exaonepath-robustness --task pathorob-camelyon) for that."
)
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
    record = summary.slides[slide_id_from_path(sample_slide())]
    atomic_write_bytes(thumbnail, (tiles / record.thumbnail).read_bytes())
    return tiles, thumbnail


def read_patches(tiles: Path) -> list[tuple[str, np.ndarray, None, str]]:
    """Every patch as a virtual-labs source: (name from its level-0 x, y; uint8 RGB; no class; its own case)."""
    sources = []
    for row in load_patch_dataset(tiles, streaming=False):
        name = f"x{row['x']}_y{row['y']}"
        sources.append((name, decode_rgb(row["image"]), None, name))
    return sources


def restain_as_labs(sources, out: Path, lab_data: Path | None) -> tuple[Path, list[str]]:
    """Every source image re-stained by every virtual lab into `out/virtual-labs` (images and metadata.csv);
    returns the folder and the labs' names."""
    from .eval.robustness.protocol import virtual_labs_for
    from .eval.robustness.virtual_labs import make_virtual_lab_dataset

    labs = virtual_labs_for(lab_data)
    folder = make_virtual_lab_dataset(sources, labs, out / "virtual-labs", overwrite=True)
    return folder, [lab.name for lab in labs]


def read_virtual_labs(folder: Path, has_labels: bool):
    """The re-stained images (uint8 CHW tensors) and their sample table, each lab's copy one virtual slide."""
    from .eval.robustness.protocol import as_virtual_slides
    from .eval.robustness.samples import load_robustness_samples

    samples = load_robustness_samples(folder)
    images = [torch.from_numpy(decode_rgb(image)).permute(2, 0, 1) for image in samples.dataset["image"]]
    table = samples.table if has_labels else replace(samples.table, label=None)
    return images, as_virtual_slides(table)


def pretrain_demo_model(tiles: Path, out: Path, steps: int) -> Path:
    """A small ViT trained with the package's DINO loop on the Macenko-normalized patches; returns its folder."""
    from .train.pretrain_dino import main as pretrain

    run_dir = out / "demo-model-training"
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun of the demo trains its model again, from scratch
    overrides = [
        f"data.source={tiles}",
        f"run.output_dir={run_dir}",
        f"run.max_steps={steps}",
        *DEMO_TRAINING,
    ]
    if pretrain(["--config", "cpu_smoke", *overrides]) != 0:
        raise RuntimeError(f"demo pretraining failed; see the log above and {run_dir}")
    return run_dir / "export"


class _InMemoryImages(torch.utils.data.Dataset):
    """Decoded images as a source of the extraction path: items (index, image, no error)."""

    def __init__(self, images: list[torch.Tensor]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return index, self.images[index], None


def extract(
    encoder, images: list[torch.Tensor], stain_normalize: bool, device: str
) -> tuple[torch.Tensor, int]:
    """Features of `images` through the model's own processor, with or without its Macenko step, on the package's
    one extraction path; and how many images Macenko fell back on."""
    from .eval.common.extraction import ForwardSettings, stream_features

    setting = "Macenko" if stain_normalize else "raw"
    batches = list(
        stream_features(
            encoder,
            encoder.default_preprocessing(stain_normalize=stain_normalize),
            _InMemoryImages(images),
            ForwardSettings(batch_size=32, num_workers=0),
            torch.device(device),
            desc=f"features ({setting} input)",
        )
    )
    failed = [failure for batch in batches for failure in batch.failed]
    if failed:  # the images were decoded and re-stained here: a failure is a bug, not bad input
        raise RuntimeError(f"{len(failed)} re-stained images failed preprocessing; first: {failed[0]}")
    flags = torch.cat([batch.stain_normalized for batch in batches])
    fallbacks = int((~flags).sum()) if stain_normalize else 0
    return torch.cat([batch.features for batch in batches]), fallbacks


def measure_robustness(out: Path, model_name: str, features: dict[str, torch.Tensor], table, restarts: int):
    """The field's robustness measures per input setting; writes robustness.md/.json, the t-SNE PNG(s),
    features.safetensors and samples.csv. Returns the metrics per setting."""
    from .eval.robustness.measures import MetricOptions
    from .eval.robustness.protocol import VIRTUAL_LABS_NOTE
    from .eval.robustness.report import RobustnessInput, assess_robustness

    inputs = [RobustnessInput(model_name, setting, values, table) for setting, values in features.items()]
    outputs = assess_robustness(
        inputs,
        out,
        MetricOptions(restarts=restarts),
        save_features=True,
        data={"source": f"{out / 'virtual-labs'} ({SAMPLE_SLIDE} or --data, re-stained per virtual lab)"},
        notes=[VIRTUAL_LABS_NOTE, DEMO_CAVEAT],
    )
    return {record["setting"]: (record["metrics"], record["reasons"]) for record in outputs.records}


@dataclass(frozen=True)
class DemoSettings:
    """One demo run: where it writes, which model (None: pretrain a demo ViT for `train_steps` steps)."""

    out: Path = Path("exaonepath-demo")
    model: str | None = None
    data: Path | None = None
    lab_data: Path | None = None
    train_steps: int = 40
    workers: int = 1
    device: str = "cpu"


def print_summary(
    minutes: float, model_name: str, what: str, labs: list[str], fallbacks: int, metrics: dict, out: Path
):
    print(f"\nDone in {minutes:.1f} min. Model: {model_name}")
    print(f"{what} x {len(labs)} virtual labs ({', '.join(labs)}); Macenko fallbacks: {fallbacks}")
    undefined = {}
    for setting, (values, reasons) in metrics.items():
        shown = {}
        for name, digits in (
            ("paired_top10", 2),
            ("paired_cosine", 3),
            ("paired_unpaired_cosine", 3),
            ("slide_identity_knn", 2),
            ("robustness_index", 2),
        ):
            shown[name] = "–" if values[name] is None else f"{values[name]:.{digits}f}"
            if values[name] is None:
                undefined[name] = reasons[name]
        print(
            f"  {SETTING_NAMES[setting]:>13}: paired top-10 {shown['paired_top10']}, paired cosine "
            f"{shown['paired_cosine']} (two different tiles: {shown['paired_unpaired_cosine']}), lab-ID kNN {shown['slide_identity_knn']} (chance "
            f"{values['slide_identity_chance']:.2f}), robustness index {shown['robustness_index']}"
        )
    for name, reason in undefined.items():
        hint = " (re-stain labelled tiles with --data)" if name == "robustness_index" else ""
        print(f"  {name} undefined: {reason}{hint}")
    print(DEMO_CAVEAT)
    print(
        f"Outputs in {out}/: robustness.md/.json, tsne_by_center.png, features.safetensors + samples.csv, "
        "thumbnail.png, virtual-labs/, tiles/"
    )


def run_demo(settings: DemoSettings) -> dict:
    """Tile, re-stain as virtual labs, get a model, measure robustness (the steps: `demo_cli.DEMO_DESCRIPTION`);
    returns `{setting: (metrics, reasons)}` for the raw and Macenko input."""
    from .eval.robustness.protocol import labelled_images

    start = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] tiling {SAMPLE_SLIDE} at 0.5 µm/px into 256 px tissue patches")
    tiles, thumbnail = tile_sample(out, settings.workers)
    sources = read_patches(tiles)
    print(f"      {len(sources)} tissue patches; grid drawn on {thumbnail}")
    what = f"Patches: {len(sources)} from {SAMPLE_SLIDE} (no tissue classes)"
    if settings.data is not None:
        sources = labelled_images(settings.data)
        classes = sorted({label for _, _, label, _ in sources})
        what = f"Labelled tiles: {len(sources)} from {settings.data} ({len(classes)} classes)"

    print("[2/4] re-staining every image as virtual labs would (HED stain perturbations, Reinhard transfers)")
    folder, labs = restain_as_labs(sources, out, settings.lab_data)
    images, table = read_virtual_labs(folder, has_labels=settings.data is not None)

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
    from .eval.common.encoders import load_encoder

    encoder = load_encoder(model_folder, device=settings.device)

    print(
        "[4/4] extracting features from raw and Macenko input; measuring robustness across the virtual labs"
    )
    raw, _ = extract(encoder, images, stain_normalize=False, device=settings.device)
    normalized, fallbacks = extract(encoder, images, stain_normalize=True, device=settings.device)
    metrics = measure_robustness(out, model_name, {"raw": raw, "macenko": normalized}, table, restarts=3)
    print_summary((time.perf_counter() - start) / 60, model_name, what, labs, fallbacks, metrics, out)
    return metrics
