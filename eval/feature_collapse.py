"""Slide-level feature collapse: do features cluster by source slide rather than by tissue class?

EXAONEPath's claim (paper, Figure 2) is that Macenko-normalized pretraining removes the slide identity
(stain, scanner) that other models' features carry. For each model and each input setting (raw, Macenko)
this measures, on features grouped by `--group-by`:

- kNN slide-identity accuracy, leave-one-out (cosine, k nearest other tiles, majority vote, ties to the
  nearest); chance is the share of agreements of a prevalence-matched guess, sum_g p_g^2;
- silhouette by slide (cosine); ~0 when slides are mixed, towards 1 when they form separate clusters;
- the share of feature variance between slides (between-group / total sum of squares; (G-1)/(N-1) at chance);
- the same three by class when labels exist (there, high is good);
- a t-SNE plot coloured by slide, one panel per (model, setting): `tsne.png`.

    python -m eval.feature_collapse --model A --model B --data ../shared/data/tcga-tiles --group-by folder
    python -m eval.feature_collapse --model A --data ../shared/data/stain-templates --group-by file --tile 224
    python -m eval.feature_collapse --model A --data OUT/shards --group-by slide_id     # exaonepath-tile output

`--data` is a folder of images (class subfolders or a metadata.csv with slide_id / label columns, or plain
files), or parquet shards written by `exaonepath-tile`. `--tile SIZE` cuts every image into a grid of
SIZE x SIZE tiles first (for a few large images per slide). Groups with a single tile are left out and counted.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import matplotlib
import numpy as np
import torch
from PIL import Image

from ..atomic_io import atomic_write_bytes, write_json

from .backbones import load_encoder
from .features import cache_key, default_cache_root, distributed_state, extract_features
from .report import environment
from .tasks import local_fingerprint

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

__all__ = [
    "GroupedImages",
    "load_grouped_images",
    "knn_identity_accuracy",
    "between_group_variance_share",
    "collapse_metrics",
    "plot_tsne",
    "main",
]

logger = logging.getLogger("eval.feature_collapse")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
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


def _tiles(image_bytes: bytes | None, path: str | None, size: int) -> list[bytes]:
    with Image.open(io.BytesIO(image_bytes) if image_bytes else path) as image:
        image = image.convert("RGB")
        width, height = image.size
        tiles = []
        for top in range(0, height - size + 1, size):
            for left in range(0, width - size + 1, size):
                buffer = io.BytesIO()
                image.crop((left, top, left + size, top + size)).save(buffer, format="PNG")
                tiles.append(buffer.getvalue())
    return tiles


def load_grouped_images(data: str | os.PathLike, group_by: str, tile: int | None = None) -> GroupedImages:
    """Images of `data` with their group (see the module docstring for the accepted layouts)."""
    root = Path(data)
    shards = sorted((root / "shards").glob("*.parquet")) if root.is_dir() else []
    if root.suffix == ".parquet" or shards:
        files = [str(root)] if root.suffix == ".parquet" else [str(s) for s in shards]
        table = datasets.load_dataset("parquet", data_files=files, split="train")
        fingerprint = hashlib.sha256(
            "".join(f"{f}:{os.stat(f).st_size}" for f in files).encode()
        ).hexdigest()[:16]
        if group_by not in table.column_names:
            raise ValueError(f"{data}: no column {group_by!r} (has {table.column_names})")
        groups = [str(g) for g in table[group_by]]
        labels = table["label"] if "label" in table.column_names else None
        images = table.cast_column("image", datasets.Image(decode=False))["image"]
    elif root.is_dir():
        fingerprint = local_fingerprint(root)
        if (root / "metadata.csv").is_file():
            table = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
            table = table.cast_column("image", datasets.Image(decode=False))
            images = table["image"]
            if group_by in ("folder", "file"):
                groups = [_group_of(Path(i["path"]), root, group_by) for i in images]
            elif group_by in table.column_names:
                groups = [str(g) for g in table[group_by]]
            else:
                raise ValueError(f"{root}/metadata.csv has no column {group_by!r} (has {table.column_names})")
            labels = table["label"] if "label" in table.column_names else None
        else:
            if group_by not in ("folder", "file"):
                raise ValueError(f"{root} has no metadata.csv: group by 'folder' or 'file', not {group_by!r}")
            paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            images = [{"bytes": None, "path": str(p)} for p in paths]
            groups = [_group_of(p, root, group_by) for p in paths]
            labels = None
    else:
        raise FileNotFoundError(f"--data {data} is neither a folder nor parquet shards")
    if not images:
        raise ValueError(f"no images found in {data}")

    if tile:
        expanded_images, expanded_groups, expanded_labels = [], [], []
        for index, image in enumerate(images):
            pieces = _tiles(image.get("bytes"), image.get("path"), tile)
            if not pieces:
                logger.warning("%s is smaller than --tile %d; left out", image.get("path") or index, tile)
            expanded_images += [{"bytes": piece, "path": None} for piece in pieces]
            expanded_groups += [groups[index]] * len(pieces)
            if labels is not None:
                expanded_labels += [labels[index]] * len(pieces)
        images, groups, labels = (
            expanded_images,
            expanded_groups,
            (expanded_labels if labels is not None else None),
        )
        fingerprint = f"{fingerprint}-tile{tile}"

    names = sorted({str(v) for v in labels}) if labels is not None else []
    label_index = [names.index(str(v)) for v in labels] if labels is not None else [-1] * len(images)
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": label_index, "slide_id": groups, "patient_id": [""] * len(images)},
        features=datasets.Features(
            {
                "image": datasets.Image(decode=False),
                "label": datasets.Value("int64"),
                "slide_id": datasets.Value("string"),
                "patient_id": datasets.Value("string"),
            }
        ),
    )
    return GroupedImages(dataset, f"{fingerprint}-{group_by}", labels is not None, str(root.resolve()))


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", action="append", required=True, help="repeat to compare models side by side"
    )
    parser.add_argument("--label", action="append", default=None, help="display name per --model")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--group-by", dest="group_by", choices=GROUP_CHOICES, default="slide_id")
    parser.add_argument("--tile", type=int, default=None, help="cut each image into SIZE x SIZE tiles first")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["raw", "macenko"])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--pooling", choices=("auto", "pooler", "cls", "mean"), default="auto")
    parser.add_argument("--cache_dir", type=Path, default=None)
    parser.add_argument("--output_dir", type=Path, default=Path("results/feature_collapse"))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.label and len(args.label) != len(args.model):
        raise SystemExit("give one --label per --model")
    state = distributed_state()
    cache_root = args.cache_dir or default_cache_root()
    data = load_grouped_images(args.data, args.group_by, args.tile)
    labels = [Path(m).name for m in args.model] if not args.label else args.label
    # every process extracts first; metrics and t-SNE (minutes on large sets) run afterwards on the main
    # process only, so that no process waits at a collective meanwhile
    extracted = []
    for model_source, label in zip(args.model, labels, strict=True):
        encoder = load_encoder(model_source, pooling=args.pooling, device=state.device)
        for setting in args.settings:
            preprocessing = encoder.default_preprocessing(stain_normalize=SETTINGS[setting])
            key = cache_key(
                encoder, data.source, "local", data.fingerprint, "all", preprocessing, args.precision
            )
            features = extract_features(
                encoder,
                data.dataset,
                preprocessing,
                key,
                cache_root,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                precision=args.precision,
                state=state,
            )
            extracted.append((label, encoder.identity(), setting, preprocessing, features))
    if not state.is_main_process:
        return {}
    results, panels = [], []
    for label, identity, setting, preprocessing, features in extracted:
        result = {
            "model": label,
            "model_identity": identity,
            "setting": setting,
            "preprocessing": preprocessing.to_dict(),
            "by_group": collapse_metrics(features.features, features.slide_ids, k=args.k, seed=args.seed),
            "extraction": {**features.stats, "failed_images": len(features.failed)},
        }
        if data.has_labels:
            result["by_class"] = collapse_metrics(
                features.features, features.labels.numpy().astype(str), k=args.k, seed=args.seed
            )
        results.append(result)
        panels.append(
            {
                "model": label,
                "setting": setting,
                "groups": features.slide_ids,
                "embedding": tsne_embedding(features.features, seed=args.seed),
                "metrics": result["by_group"],
            }
        )
        logger.info("%s %s: %s", label, setting, result["by_group"])
    out = args.output_dir
    png = plot_tsne(panels, labels, args.settings, out / "tsne.png")
    summary = {
        "data": data.source,
        "group_by": args.group_by,
        "tile": args.tile,
        "results": results,
        "tsne_png": str(png),
        "environment": environment(),
    }
    write_json(out / "collapse.json", summary)
    table = render_markdown(results)
    atomic_write_bytes(out / "collapse.md", table.encode())
    print(table + f"\nt-SNE: {png}\nrecord: {out / 'collapse.json'}")
    return summary


if __name__ == "__main__":
    main()
