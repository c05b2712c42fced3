"""Slide-level feature collapse: do features cluster by source slide rather than by tissue class?

EXAONEPath's claim (paper, Figure 2) is that Macenko-normalized pretraining removes the slide identity
(stain, scanner) that other models' features carry. For each model and each input setting (raw, Macenko)
this measures, on features grouped by `--group_by`:

- kNN slide-identity accuracy, leave-one-out (cosine, k nearest other tiles, majority vote, ties to the
  nearest); chance is the share of agreements of a prevalence-matched guess, sum_g p_g^2;
- silhouette by slide (cosine); ~0 when slides are mixed, towards 1 when they form separate clusters;
- the share of feature variance between slides (between-group / total sum of squares; (G-1)/(N-1) at chance);
- the same three by class when labels exist (there, high is good);
- a t-SNE plot coloured by slide, one panel per (model, setting): `tsne.png`.

    exaonepath-collapse --model A --model B --data ../shared/data/tcga-tiles --group_by folder
    exaonepath-collapse --model A --data ../shared/data/stain-templates --group_by file --tile 224
    exaonepath-collapse --model A --data OUT --group_by slide_id     # exaonepath-tile output (or OUT/shards)

`--data` is a folder of images (class subfolders or a metadata.csv with slide_id / label columns, or plain
files), an `exaonepath-tile` output folder (only the shards its manifest lists as complete are read), a
parquet file or a parquet glob. `--tile SIZE` cuts every image into a grid of SIZE x SIZE tiles first (for a
few large images per slide). Groups with a single tile are left out and counted. In Python:
`run_feature_collapse(CollapseSettings(...))`, or `assess_collapse` on features you already have.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import matplotlib
import numpy as np
import torch
from accelerate import PartialState

from ..atomic_io import atomic_write_bytes, write_json
from ..cli import run_command
from ..images import image_files, open_rgb
from ..tiling.shards import complete_shards_only, completed_shard_files, tiling_output_folder
from .backbones import Pooling, Preprocessing, load_encoder
from .features import (
    ExtractionSettings,
    FeatureSet,
    add_extraction_arguments,
    cache_key,
    distributed_state,
    extraction_settings,
)
from .report import environment
from .tasks import local_fingerprint

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

__all__ = [
    "GroupedImages",
    "parquet_files",
    "load_grouped_images",
    "knn_identity_accuracy",
    "between_group_variance_share",
    "collapse_metrics",
    "plot_tsne",
    "CollapseInput",
    "assess_collapse",
    "CollapseSettings",
    "run_feature_collapse",
    "main",
]

logger = logging.getLogger(__name__)

GROUP_CHOICES = ("slide_id", "patient_id", "folder", "file")
SETTINGS = {"raw": False, "macenko": True}


@dataclass
class GroupedImages:
    """Images with a group id in `slide_id` (and `label`, -1 when unknown), ready for `extract_features`."""

    dataset: datasets.Dataset
    fingerprint: str
    has_labels: bool
    source: str


def _group_of(path: Path, root: Path, group_by: str) -> str:
    if group_by == "file":
        return path.stem
    # tiles at the top level have no folder of their own: each is its own group (then left out as a singleton)
    return path.parent.name if path.parent != root else path.stem


def _tiles(image: dict[str, Any], size: int) -> list[bytes]:
    rgb = open_rgb(image)
    width, height = rgb.size
    tiles = []
    for top in range(0, height - size + 1, size):
        for left in range(0, width - size + 1, size):
            buffer = io.BytesIO()
            rgb.crop((left, top, left + size, top + size)).save(buffer, format="PNG")
            tiles.append(buffer.getvalue())
    return tiles


def parquet_files(data: str | os.PathLike) -> list[str] | None:
    """The parquet files `data` names, or None when it names none (then it is a folder of images).

    An `exaonepath-tile` output folder (or its `shards/`) gives the shards its manifest lists as complete:
    a run killed while publishing a slide leaves partial shards beside them. A glob inside such a folder is
    narrowed to the complete shards the same way; a `.parquet` file named explicitly is read as it is.
    """
    text = str(data)
    if tiling_output_folder(text) is not None:
        return completed_shard_files(text)
    if glob.has_magic(text):
        return complete_shards_only(sorted(f for f in glob.glob(text) if f.endswith(".parquet")))
    if Path(text).suffix == ".parquet":
        return [text]
    return None


@dataclass
class _Images:
    """Undecoded images with their group and (optional) label, before tiling."""

    images: list[dict[str, Any]]
    groups: list[str]
    labels: list[Any] | None
    fingerprint: str


def _parquet_images(files: list[str], group_by: str, data: str | os.PathLike) -> _Images:
    if not files:
        raise ValueError(f"no parquet shards found for {data}")
    table = datasets.load_dataset("parquet", data_files=files, split="train")
    fingerprint = hashlib.sha256("".join(f"{f}:{os.stat(f).st_size}" for f in files).encode()).hexdigest()[
        :16
    ]
    if group_by not in table.column_names:
        raise ValueError(f"{data}: no column {group_by!r} (has {table.column_names})")
    return _Images(
        images=table.cast_column("image", datasets.Image(decode=False))["image"],
        groups=[str(g) for g in table[group_by]],
        labels=table["label"] if "label" in table.column_names else None,
        fingerprint=fingerprint,
    )


def _folder_images(root: Path, group_by: str) -> _Images:
    fingerprint = local_fingerprint(root)
    if not (root / "metadata.csv").is_file():
        if group_by not in ("folder", "file"):
            raise ValueError(f"{root} has no metadata.csv: group by 'folder' or 'file', not {group_by!r}")
        paths = image_files(root)
        return _Images(
            images=[{"bytes": None, "path": str(p)} for p in paths],
            groups=[_group_of(p, root, group_by) for p in paths],
            labels=None,
            fingerprint=fingerprint,
        )
    table = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
    images = table.cast_column("image", datasets.Image(decode=False))["image"]
    if group_by in ("folder", "file"):
        groups = [_group_of(Path(i["path"]), root, group_by) for i in images]
    elif group_by in table.column_names:
        groups = [str(g) for g in table[group_by]]
    else:
        raise ValueError(f"{root}/metadata.csv has no column {group_by!r} (has {table.column_names})")
    labels = table["label"] if "label" in table.column_names else None
    return _Images(images, groups, labels, fingerprint)


def _tile_images(found: _Images, tile: int) -> _Images:
    images, groups, labels = [], [], []
    for index, image in enumerate(found.images):
        pieces = _tiles(image, tile)
        if not pieces:
            logger.warning("%s is smaller than --tile %d; left out", image.get("path") or index, tile)
        images += [{"bytes": piece, "path": None} for piece in pieces]
        groups += [found.groups[index]] * len(pieces)
        if found.labels is not None:
            labels += [found.labels[index]] * len(pieces)
    return _Images(
        images, groups, labels if found.labels is not None else None, f"{found.fingerprint}-tile{tile}"
    )


def load_grouped_images(data: str | os.PathLike, group_by: str, tile: int | None = None) -> GroupedImages:
    """Images of `data` with their group (see the module docstring for the accepted layouts)."""
    files = parquet_files(data)
    if files is not None:
        found = _parquet_images(files, group_by, data)
    elif Path(data).is_dir():
        found = _folder_images(Path(data), group_by)
    else:
        raise FileNotFoundError(f"--data {data} is neither a folder of images nor parquet shards")
    if not found.images:
        raise ValueError(f"no images found in {data}")
    if tile:
        found = _tile_images(found, tile)
    labels = found.labels
    names = sorted({str(v) for v in labels}) if labels is not None else []
    label_index = [names.index(str(v)) for v in labels] if labels is not None else [-1] * len(found.images)
    dataset = datasets.Dataset.from_dict(
        {
            "image": found.images,
            "label": label_index,
            "slide_id": found.groups,
            "patient_id": [""] * len(found.images),
        },
        features=datasets.Features(
            {
                "image": datasets.Image(decode=False),
                "label": datasets.Value("int64"),
                "slide_id": datasets.Value("string"),
                "patient_id": datasets.Value("string"),
            }
        ),
    )
    source = str(Path(data).resolve()) if not glob.has_magic(str(data)) else os.path.abspath(str(data))
    return GroupedImages(dataset, f"{found.fingerprint}-{group_by}", labels is not None, source)


def _codes(groups: list[str] | np.ndarray) -> np.ndarray:
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    return codes


def knn_identity_accuracy(features: torch.Tensor, groups: np.ndarray, k: int = 5, block: int = 4096) -> float:
    """Leave-one-out kNN accuracy of predicting each sample's group from its k nearest others (cosine)."""
    codes = torch.as_tensor(_codes(groups))
    n = features.shape[0]
    k = min(k, n - 1)
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    correct = 0
    for start in range(0, n, block):
        similarity = unit[start : start + block] @ unit.T
        rows = torch.arange(similarity.shape[0])
        similarity[rows, rows + start] = -torch.inf  # leave the sample itself out
        nearest = similarity.topk(k, dim=1).indices
        neighbour_codes = codes[nearest]
        votes = torch.zeros(len(rows), int(codes.max()) + 1).scatter_add_(
            1, neighbour_codes, torch.ones_like(nearest, dtype=torch.float)
        )
        # ties go to the group of the nearest neighbour among the tied ones: add a rank-decreasing epsilon
        rank_bonus = torch.linspace(1e-3, 1e-6, k).expand_as(nearest)
        votes.scatter_add_(1, neighbour_codes, rank_bonus)
        correct += int((votes.argmax(dim=1) == codes[start : start + block]).sum())
    return correct / n


def between_group_variance_share(features: torch.Tensor, groups: np.ndarray) -> float:
    """Between-group sum of squares over total sum of squares, summed over feature dimensions (eta^2)."""
    x = features.double()
    codes = torch.as_tensor(_codes(groups))
    grand = x.mean(dim=0)
    total = ((x - grand) ** 2).sum()
    counts = torch.bincount(codes).double()
    means = (
        torch.zeros(len(counts), x.shape[1], dtype=torch.float64).index_add_(0, codes, x) / counts[:, None]
    )
    between = (counts[:, None] * (means - grand) ** 2).sum()
    return float(between / total) if total > 0 else 0.0


def collapse_metrics(
    features: torch.Tensor,
    groups: list[str] | np.ndarray,
    k: int = 5,
    silhouette_sample: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """kNN identity accuracy, silhouette and between-group variance share by `groups`, with chance levels."""
    from sklearn.metrics import silhouette_score

    groups = np.asarray(groups)
    counts = Counter(groups.tolist())
    keep = np.array([counts[g] >= 2 for g in groups])
    dropped = int((~keep).sum())
    features, groups = features[torch.as_tensor(keep)], groups[keep]
    num_groups = len(set(groups.tolist()))
    if num_groups < 2:
        raise ValueError(
            f"need at least 2 groups with 2+ samples each; got {num_groups} (after leaving out {dropped} singletons)"
        )
    n = len(groups)
    prevalence = np.array(list(Counter(groups.tolist()).values()), dtype=np.float64) / n
    unit = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    return {
        "knn_accuracy": knn_identity_accuracy(features, groups, k=k),
        "knn_chance": float((prevalence**2).sum()),
        "k": min(k, n - 1),
        "silhouette": float(
            silhouette_score(
                unit, groups, metric="cosine", sample_size=min(n, silhouette_sample), random_state=seed
            )
        ),
        "variance_between": between_group_variance_share(features, groups),
        "variance_between_chance": (num_groups - 1) / (n - 1),
        "num_samples": n,
        "num_groups": num_groups,
        "singletons_left_out": dropped,
    }


def tsne_embedding(features: torch.Tensor, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE

    unit = torch.nn.functional.normalize(features.float(), dim=1).numpy()
    perplexity = float(max(2.0, min(30.0, (len(unit) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(unit)


def plot_tsne(panels: list[dict[str, Any]], models: list[str], settings: list[str], path: Path) -> Path:
    """One t-SNE panel per (model row, setting column), coloured by group, with the collapse numbers in the title."""
    figure, axes = plt.subplots(
        len(models), len(settings), figsize=(5 * len(settings), 4.6 * len(models)), squeeze=False
    )
    all_groups = sorted({g for panel in panels for g in panel["groups"]})
    colours = plt.get_cmap("tab20" if len(all_groups) > 10 else "tab10")
    colour_of = {g: colours(i % colours.N) for i, g in enumerate(all_groups)}
    for panel in panels:
        axis = axes[models.index(panel["model"])][settings.index(panel["setting"])]
        embedding, groups = panel["embedding"], np.asarray(panel["groups"])
        for group in sorted(set(groups.tolist())):
            chosen = groups == group
            axis.scatter(
                embedding[chosen, 0], embedding[chosen, 1], s=14, color=colour_of[group], label=group
            )
        metrics = panel["metrics"]
        axis.set_title(
            f"{panel['model']} | {panel['setting']}\n"
            f"kNN slide acc {metrics['knn_accuracy']:.2f} (chance {metrics['knn_chance']:.2f}), "
            f"silhouette {metrics['silhouette']:.2f}",
            fontsize=9,
        )
        axis.set_xticks([])
        axis.set_yticks([])
    if len(all_groups) <= 20:
        handles, labels = axes[0][0].get_legend_handles_labels()
        figure.legend(
            handles, labels, loc="lower center", ncol=min(4, len(all_groups)), fontsize=7, frameon=False
        )
        figure.subplots_adjust(bottom=0.08 + 0.03 * ((len(all_groups) + 3) // 4))
    figure.suptitle("t-SNE of tile features coloured by slide", fontsize=11)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def render_markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| Model | Input | kNN slide acc. (chance) | Silhouette by slide | Var. between slides (chance) | "
        "kNN class acc. | Silhouette by class | Tiles / slides |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        slide, by_class = result["by_group"], result.get("by_class")
        class_cells = (
            f"{by_class['knn_accuracy']:.3f} | {by_class['silhouette']:.3f}" if by_class else "– | –"
        )
        lines.append(
            f"| {result['model']} | {result['setting']} | {slide['knn_accuracy']:.3f} ({slide['knn_chance']:.3f}) | "
            f"{slide['silhouette']:.3f} | {slide['variance_between']:.3f} ({slide['variance_between_chance']:.3f}) | "
            f"{class_cells} | {slide['num_samples']} / {slide['num_groups']} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class CollapseInput:
    """Features of one (model, input setting) to assess, with the group (slide) of each row.

    `classes` (one label per row) adds the same metrics by class; `details` are recorded in the result as
    they are (model identity, preprocessing, extraction statistics, ...).
    """

    model: str
    setting: str
    features: torch.Tensor
    groups: Sequence[str]
    classes: Sequence[str] | None = None
    details: dict[str, Any] = field(default_factory=dict)


def assess_collapse(
    inputs: Sequence[CollapseInput], tsne_path: str | os.PathLike, k: int = 5, seed: int = 0
) -> tuple[list[dict[str, Any]], Path]:
    """Collapse metrics of every input and one t-SNE figure of them all (written to `tsne_path`).

    Returns one result per input, `{"model", "setting", **details, "by_group", ["by_class"]}`, in the order
    of `inputs` (`render_markdown` tabulates them), and the figure's path.
    """
    results, panels = [], []
    for item in inputs:
        by_group = collapse_metrics(item.features, item.groups, k=k, seed=seed)
        result = {"model": item.model, "setting": item.setting, **item.details, "by_group": by_group}
        if item.classes is not None:
            result["by_class"] = collapse_metrics(item.features, item.classes, k=k, seed=seed)
        results.append(result)
        panels.append(
            {
                "model": item.model,
                "setting": item.setting,
                "groups": list(item.groups),
                "embedding": tsne_embedding(item.features, seed=seed),
                "metrics": by_group,
            }
        )
    models = list(dict.fromkeys(item.model for item in inputs))
    settings = list(dict.fromkeys(item.setting for item in inputs))
    return results, plot_tsne(panels, models, settings, Path(tsne_path))


@dataclass(frozen=True)
class CollapseSettings:
    """One `exaonepath-collapse` run (see the module docstring); `labels` names the models in the outputs."""

    models: tuple[str, ...]
    data: str | os.PathLike
    labels: tuple[str, ...] | None = None
    group_by: str = "slide_id"
    tile: int | None = None
    input_settings: tuple[str, ...] = ("raw", "macenko")
    k: int = 5
    pooling: Pooling = "auto"
    output_dir: Path = Path("results/feature_collapse")
    seed: int = 0
    extraction: ExtractionSettings = field(default_factory=lambda: ExtractionSettings(num_workers=2))

    def validate(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.models):
            raise ValueError("give one label (--label) per model (--model)")
        if self.group_by not in GROUP_CHOICES:
            raise ValueError(f"group_by must be one of {GROUP_CHOICES}, not {self.group_by!r}")
        unknown = [name for name in self.input_settings if name not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown input setting(s) {unknown}; choose from {sorted(SETTINGS)}")


def _extract_all(
    settings: CollapseSettings, data: GroupedImages, labels: Sequence[str], state: PartialState
) -> list[tuple[str, dict[str, Any], str, Preprocessing, FeatureSet]]:
    extracted = []
    for model_source, label in zip(settings.models, labels, strict=True):
        encoder = load_encoder(model_source, pooling=settings.pooling, device=state.device)
        for setting in settings.input_settings:
            preprocessing = encoder.default_preprocessing(stain_normalize=SETTINGS[setting])
            key = cache_key(
                encoder,
                data.source,
                "local",
                data.fingerprint,
                "all",
                preprocessing,
                settings.extraction.precision,
            )
            features = settings.extraction.extract(encoder, data.dataset, preprocessing, key, state=state)
            extracted.append((label, encoder.identity(), setting, preprocessing, features))
    return extracted


def run_feature_collapse(
    settings: CollapseSettings, state: PartialState | None = None
) -> dict[str, Any] | None:
    """Extract features of every model and input setting, assess them, write `collapse.json`, `collapse.md`
    and `tsne.png` under `settings.output_dir`; returns the summary (None on the other processes)."""
    settings.validate()
    state = state or distributed_state()
    data = load_grouped_images(settings.data, settings.group_by, settings.tile)
    labels = list(settings.labels) if settings.labels else [Path(m).name for m in settings.models]
    # every process extracts first; metrics and t-SNE (slow on large sets) run afterwards on the main
    # process only, so that no process waits at a collective meanwhile
    extracted = _extract_all(settings, data, labels, state)
    if not state.is_main_process:
        return None
    inputs = [
        CollapseInput(
            model=label,
            setting=setting,
            features=features.features,
            groups=features.slide_ids,
            classes=features.labels.numpy().astype(str) if data.has_labels else None,
            details={
                "model_identity": identity,
                "preprocessing": preprocessing.to_dict(),
                "extraction": {**features.stats, "failed_images": len(features.failed)},
            },
        )
        for label, identity, setting, preprocessing, features in extracted
    ]
    out = Path(settings.output_dir)
    results, png = assess_collapse(inputs, out / "tsne.png", k=settings.k, seed=settings.seed)
    for result in results:
        logger.info("%s %s: %s", result["model"], result["setting"], result["by_group"])
    summary = {
        "data": data.source,
        "group_by": settings.group_by,
        "tile": settings.tile,
        "results": results,
        "tsne_png": str(png),
        "environment": environment(),
    }
    write_json(out / "collapse.json", summary)
    table = render_markdown(results)
    atomic_write_bytes(out / "collapse.md", table.encode())
    print(table + f"\nt-SNE: {png}\nrecord: {out / 'collapse.json'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaonepath-collapse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", action="append", required=True, help="repeat to compare models side by side"
    )
    parser.add_argument("--label", action="append", default=None, help="display name per --model")
    parser.add_argument(
        "--data", required=True, type=Path, help="image folder, exaonepath-tile output, parquet file or glob"
    )
    parser.add_argument(
        "--group_by", "--group-by", dest="group_by", choices=GROUP_CHOICES, default="slide_id"
    )
    parser.add_argument("--tile", type=int, default=None, help="cut each image into SIZE x SIZE tiles first")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["raw", "macenko"])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto")
    parser.add_argument("--output_dir", type=Path, default=Path("results/feature_collapse"))
    add_extraction_arguments(parser, num_workers=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def settings_from_args(args: argparse.Namespace) -> CollapseSettings:
    return CollapseSettings(
        models=tuple(args.model),
        data=args.data,
        labels=tuple(args.label) if args.label else None,
        group_by=args.group_by,
        tile=args.tile,
        input_settings=tuple(args.settings),
        k=args.k,
        pooling=args.pooling,
        output_dir=args.output_dir,
        seed=args.seed,
        extraction=extraction_settings(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("exaonepath-collapse", lambda: run_feature_collapse(settings_from_args(args)))


if __name__ == "__main__":
    raise SystemExit(main())
