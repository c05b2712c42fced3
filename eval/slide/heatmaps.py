"""Attention heatmaps of an attention MIL head over the slides of its bags: each patch coloured by its
attention rank over the slide's thumbnail, and the highest-attention patches read from the slide.

`exaonepath-slide-probe --heatmaps --slides DIR` draws them for the test slides with the first seed's head
(`write_heatmaps`); `attention_heatmap` draws one slide's from arrays.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...atomic_io import atomic_write_bytes
from ...progress import progress_bar
from ...tiling import open_slide, read_downsampled, slide_id_from_path
from ...tiling.thumbnail import render_thumbnail
from .data import Bag, SlideSegment
from .settings import HeatmapSettings

__all__ = ["attention_heatmap", "write_heatmaps"]

logger = logging.getLogger(__name__)

_HEATMAP_ALPHA = 0.55
_HEATMAP_COLORMAP = "inferno"
_COLORBAR_HEIGHT = 12


def attention_heatmap(
    view: np.ndarray,
    view_scale: float,
    coords: np.ndarray,
    patch_size_level0: int,
    attention: np.ndarray,
    max_side: int,
) -> Image.Image:
    """The slide's thumbnail (`view`, `view_scale` level-0 pixels per pixel) with each patch (level-0
    top-left `coords`, side `patch_size_level0`) filled by the colour of its attention rank within the slide
    (inferno: dark = lowest, yellow = highest), and a colour bar from low to high beneath."""
    import matplotlib

    base = render_thumbnail(
        view, view_scale, np.zeros(view.shape[:2], dtype=bool), np.empty((0, 2)), 1, max_side
    )
    scale = view_scale * view.shape[1] / base.width  # level-0 pixels per thumbnail pixel
    rgb = np.asarray(base, dtype=np.float32).copy()
    ranks = np.argsort(np.argsort(attention, kind="stable"), kind="stable") / max(1, len(attention) - 1)
    colormap = matplotlib.colormaps[_HEATMAP_COLORMAP]
    colours = colormap(ranks)[:, :3].astype(np.float32) * 255
    overlay, covered = np.zeros_like(rgb), np.zeros(rgb.shape[:2], dtype=bool)
    # lowest first, so where patches overlap the higher attention shows
    for index in np.argsort(attention, kind="stable"):
        x, y = coords[index]
        left, top = max(0, round(x / scale)), max(0, round(y / scale))
        right, bottom = (
            max(left + 1, round((x + patch_size_level0) / scale)),
            max(top + 1, round((y + patch_size_level0) / scale)),
        )
        overlay[top:bottom, left:right] = colours[index]
        covered[top:bottom, left:right] = True
    rgb[covered] = rgb[covered] * (1 - _HEATMAP_ALPHA) + overlay[covered] * _HEATMAP_ALPHA
    bar = colormap(np.linspace(0, 1, rgb.shape[1]))[:, :3].astype(np.float32) * 255
    bar = np.broadcast_to(bar, (_COLORBAR_HEIGHT, *bar.shape))
    return Image.fromarray(np.rint(np.concatenate([rgb, bar])).astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def _attention(head: nn.Module, bag: Bag) -> np.ndarray:
    device = next(head.parameters()).device
    features = bag.features[None].to(device, torch.float32)
    return (
        head(features, torch.ones(features.shape[:2], dtype=torch.bool, device=device))
        .attention[0]
        .float()
        .cpu()
        .numpy()
    )


def _write_top_patches(
    reader, segment: SlideSegment, attention: np.ndarray, side: int, top_k: int, out_dir: Path
) -> list[dict[str, Any]]:
    """The slide's `top_k` patches by attention, read at level 0 and resized to the size the features were
    extracted at, as `out_dir/<slide_id>/top<rank>.png`; what was written."""
    top = []
    stored = int(segment.attributes.get("patch_size") or side)
    for rank, index in enumerate(np.argsort(-attention, kind="stable")[:top_k], start=1):
        x, y = (int(v) for v in segment.coords[index])
        patch = Image.fromarray(reader.read_region((x, y), 0, (side, side)))
        if stored != side:
            patch = patch.resize((stored, stored), Image.Resampling.BICUBIC)
        name = f"{segment.slide_id}/top{rank:02d}.png"
        atomic_write_bytes(out_dir / name, _png(patch))
        top.append({"rank": rank, "file": name, "x": x, "y": y, "attention": float(attention[index])})
    return top


def require_drawable(bags: Sequence[Bag]) -> None:
    """Raises ValueError naming the slides whose bags cannot be drawn: a heatmap needs each patch's level-0
    coordinates and size, which CLAM's .pt bags do not carry."""
    undrawable = [
        segment.slide_id
        for bag in bags
        for segment in bag.segments
        if segment.coords is None or not segment.attributes.get("patch_size_level0")
    ]
    if undrawable:
        shown = ", ".join(undrawable[:5]) + (
            f" and {len(undrawable) - 5} more" if len(undrawable) > 5 else ""
        )
        raise ValueError(
            f"heatmaps need each patch's level-0 coordinates and patch_size_level0, which the bags of {shown} "
            "lack (CLAM .pt bags have none): use CLAM's h5_files/ or bags from exaonepath-extract, or leave out "
            "--heatmaps"
        )


def write_heatmaps(
    head: nn.Module, bags: Sequence[Bag], settings: HeatmapSettings, out_dir: Path
) -> dict[str, Any]:
    """For each slide of `bags`: `out_dir/<slide_id>.png` (attention over the thumbnail) and its `top_k`
    patches by attention, read from the slide, as `out_dir/<slide_id>/top<rank>.png`.

    A bag pooled over a patient's slides has one attention distribution over all of them; each slide's
    heatmap shows its part (ranked within the slide). Slides not found in `settings.slides_dir` are listed
    in the returned summary and skipped."""
    require_drawable(bags)
    slides_dir = Path(settings.slides_dir)
    if not slides_dir.is_dir():
        raise FileNotFoundError(f"slides folder not found: {slides_dir} (--slides)")
    paths = {slide_id_from_path(p): p for p in sorted(slides_dir.iterdir()) if not p.name.startswith(".")}
    written, missing, attention_of = [], [], {}
    segments = [(bag, segment) for bag in bags for segment in bag.segments]
    for bag, segment in progress_bar(
        iterable=segments, desc="heatmaps", unit="slide", enabled=len(segments) > 1
    ):
        if segment.slide_id not in paths:
            missing.append(segment.slide_id)
            continue
        if bag.bag_id not in attention_of:
            attention_of = {bag.bag_id: _attention(head, bag)}  # a bag's slides are consecutive
        side = int(segment.attributes["patch_size_level0"])
        attention = attention_of[bag.bag_id][segment.start : segment.stop]
        with open_slide(paths[segment.slide_id], settings.backend) as reader:
            view, view_scale = read_downsampled(
                reader, max(1.0, max(reader.dimensions) / settings.thumbnail_size)
            )
            image = attention_heatmap(
                view, view_scale, segment.coords, side, attention, settings.thumbnail_size
            )
            atomic_write_bytes(out_dir / f"{segment.slide_id}.png", _png(image))
            top = _write_top_patches(reader, segment, attention, side, settings.top_k, out_dir)
        written.append(
            {
                "slide_id": segment.slide_id,
                "bag_id": bag.bag_id,
                "heatmap": f"{segment.slide_id}.png",
                "top_patches": top,
            }
        )
    if missing:
        logger.warning(
            "no slide file in %s for %d test slide(s): %s", slides_dir, len(missing), ", ".join(missing[:10])
        )
    return {"slides_dir": str(slides_dir.resolve()), "written": written, "missing_slides": missing}
