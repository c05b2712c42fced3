"""Whole-slide image readers behind one small interface.

Every backend answers in the OpenSlide convention: `read_region(location, level, size)` takes the top-left
corner in level-0 pixels, a pyramid level index and a size in pixels of that level, and returns an RGB
`uint8` array of shape (height, width, 3). Backends:

- `tiffslide` (default): SVS, generic pyramidal TIFF, NDPI and the other formats tifffile understands.
- `openslide` (optional, `pip install openslide-python openslide-bin`): the C library's wider format list.
- `wsidicom` (optional, `pip install wsidicom`): DICOM VL whole-slide images (a `.dcm` file or a folder).

Regions are always read on demand; nothing here loads a whole level. `read_downsampled` builds a low-resolution
view of a slide block by block, so slides without a low-resolution level stay within a fixed memory budget.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "MPP_PLAUSIBLE_RANGE",
    "SLIDE_BACKENDS",
    "SLIDE_SUFFIXES",
    "MissingMPPError",
    "SlideReadError",
    "SlideReader",
    "TiffSlideReader",
    "OpenSlideReader",
    "WsiDicomReader",
    "expand_slide_inputs",
    "open_slide",
    "read_downsampled",
    "read_downsampled_views",
]

SLIDE_BACKENDS = ("auto", "tiffslide", "openslide", "wsidicom")
#: Suffixes (lower case) of single-file whole-slide images, for listing the slides of a folder. A DICOM slide
#: is a folder of .dcm files instead.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".mrxs")
#: Level-0 pixel sizes (µm/px, inclusive) that can be a measurement: from oil-immersion scans (0.1) to coarse
#: exports of a slide (the DICOM test slide is 29 µm/px). A recorded value outside is, in practice, a print or
#: screen resolution tag (72 dpi reads as 352.8 µm/px, 600 dpi as 42.3) and counts as missing metadata.
MPP_PLAUSIBLE_RANGE = (0.1, 40.0)

logger = logging.getLogger(__name__)

# Relative disagreement tolerated between the x and y pixel sizes before a slide is refused.
_MPP_ANISOTROPY_TOLERANCE = 0.02
# Side (in pixels of the level being read) of the blocks `read_downsampled` reads: 2048² RGB is 12 MB.
_DOWNSAMPLE_BLOCK_SIDE = 2048


class MissingMPPError(ValueError):
    """The slide's metadata has no microns-per-pixel and none was given."""


class SlideReadError(OSError):
    """A slide could not be opened or a region of it could not be decoded (truncated, corrupt, unsupported)."""


def _to_rgb(region: np.ndarray, what: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) from a backend's array; transparent pixels (no scanned data) become white."""
    if region.dtype != np.uint8:
        raise ValueError(
            f"{what}: pixels are {region.dtype}, only 8-bit brightfield (RGB) slides are supported; "
            "convert the slide to 8-bit RGB first"
        )
    if region.ndim == 2:
        return np.repeat(region[..., None], 3, axis=2)
    channels = region.shape[2]
    if channels == 3:
        return region
    if channels == 4:
        if (region[..., 3] == 255).all():  # the common case: every pixel was scanned
            return region[..., :3]
        alpha = region[..., 3:4].astype(np.uint16)
        rgb = region[..., :3].astype(np.uint16)
        return ((rgb * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)
    if channels == 1:
        return np.repeat(region, 3, axis=2)
    raise ValueError(f"{what}: {channels} channels per pixel; only RGB brightfield slides are supported")


class SlideReader(ABC):
    """A whole-slide image opened for reading; use as a context manager or call `close()`."""

    path: Path

    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of every pyramid level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per pixel of every level."""

    @property
    @abstractmethod
    def metadata_mpp(self) -> tuple[float, float] | None:
        """(x, y) microns per level-0 pixel recorded in the slide, or None when the slide has none."""

    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Backend read in the OpenSlide convention; may return RGBA or a PIL-style array."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 array (size[1], size[0], 3) whose top-left corner is `location` (level-0 pixels)."""
        if not 0 <= level < self.level_count:
            raise IndexError(f"{self.path}: level {level} out of range, the slide has {self.level_count}")
        try:
            raw = self._read(location, level, size)
        except Exception as error:
            raise SlideReadError(
                f"{self.path}: reading {size[0]}x{size[1]} px at {location} on level {level} failed "
                f"({type(error).__name__}: {error}); the file may be truncated or corrupt"
            ) from error
        region = _to_rgb(np.asarray(raw), str(self.path))
        if region.shape[:2] != (size[1], size[0]):
            raise SlideReadError(
                f"{self.path}: asked for a {size[0]}x{size[1]} region at {location} on level {level}, "
                f"the reader returned {region.shape[1]}x{region.shape[0]}"
            )
        return region

    def mpp(self, fallback: float | None = None) -> float:
        """Microns per level-0 pixel (see `resolve_mpp`)."""
        return self.resolve_mpp(fallback)[0]

    def resolve_mpp(self, fallback: float | None = None) -> tuple[float, str]:
        """Microns per level-0 pixel and where it comes from: the slide's own value ("metadata"), else
        `fallback` ("fallback"), else `MissingMPPError`. A recorded value outside `MPP_PLAUSIBLE_RANGE` is not
        a measurement and counts as missing, with a warning when `fallback` replaces it."""
        recorded = self.metadata_mpp
        low, high = MPP_PLAUSIBLE_RANGE
        if recorded is not None and not all(low <= value <= high for value in recorded):
            if fallback is None:
                raise MissingMPPError(
                    f"{self.path}: the slide's metadata says {recorded[0]:.4g} µm/px, implausible for a "
                    f"microscope (outside {low:g}-{high:g} µm/px: most likely a print resolution tag); "
                    "pass its level-0 resolution with --mpp (Python: mpp=...)"
                )
            logger.warning(
                "%s: metadata MPP %.4g µm/px is outside %g-%g µm/px, not a measurement; using --mpp %g",
                self.path,
                recorded[0],
                low,
                high,
                fallback,
            )
            recorded = None
        if recorded is None:
            if fallback is None:
                raise MissingMPPError(
                    f"{self.path}: the slide's metadata has no microns-per-pixel (MPP), so the physical patch "
                    "size cannot be computed; pass its level-0 resolution with --mpp (Python: mpp=...)"
                )
            return float(fallback), "fallback"
        mpp_x, mpp_y = recorded
        if abs(mpp_x - mpp_y) > _MPP_ANISOTROPY_TOLERANCE * max(mpp_x, mpp_y):
            raise ValueError(
                f"{self.path}: non-square pixels (mpp x={mpp_x}, y={mpp_y}); square patches of a fixed "
                "physical size cannot be cut from it"
            )
        return float(mpp_x), "metadata"

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (1% slack for rounding)."""
        candidates = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(candidates, key=lambda i: self.level_downsamples[i]) if candidates else 0

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, dimensions={self.dimensions}, levels={self.level_count})"


def _positive_mpp(values: tuple[float | None, float | None]) -> tuple[float, float] | None:
    x, y = values
    try:
        x, y = float(x), float(y)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(x) and math.isfinite(y) and x > 0 and y > 0):
        return None
    return x, y


class _OpenSlideApiReader(SlideReader):
    """Shared by the backends whose slide object follows the OpenSlide API (tiffslide, openslide-python)."""

    property_prefix: str  # of the `<prefix>.mpp-x` / `<prefix>.mpp-y` properties
    _slide: Any

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(map(int, d)) for d in self._slide.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def metadata_mpp(self) -> tuple[float, float] | None:
        props = self._slide.properties
        return _positive_mpp(
            (props.get(f"{self.property_prefix}.mpp-x"), props.get(f"{self.property_prefix}.mpp-y"))
        )

    def close(self) -> None:
        self._slide.close()


class TiffSlideReader(_OpenSlideApiReader):
    """tiffslide backend (pure Python: tifffile + zarr)."""

    property_prefix = "tiffslide"

    def __init__(self, path: str | Path):
        import tiffslide

        self.path = Path(path)
        self._slide = tiffslide.TiffSlide(self.path)
        # tiffslide parses lazily; parse now so a corrupt file fails at open, not halfway through a slide.
        _ = self._slide.properties, self._slide.level_dimensions

    def _read(self, location, level, size):
        return self._slide.read_region(location, level, size, as_array=True)


class OpenSlideReader(_OpenSlideApiReader):
    """openslide-python backend (needs the OpenSlide C library, e.g. from the `openslide-bin` wheel)."""

    property_prefix = "openslide"

    def __init__(self, path: str | Path):
        try:
            import openslide
        except ImportError as error:
            raise ImportError(
                "backend 'openslide' needs openslide-python and the OpenSlide library: "
                "pip install openslide-python openslide-bin"
            ) from error
        self.path = Path(path)
        self._slide = openslide.OpenSlide(str(self.path))

    def _read(self, location, level, size):
        # RGBA, not premultiplied; alpha 0 marks regions the scanner did not capture.
        return np.asarray(self._slide.read_region(location, level, size))


class WsiDicomReader(SlideReader):
    """wsidicom backend for DICOM VL whole-slide images (one `.dcm` file or a folder of instances)."""

    def __init__(self, path: str | Path):
        try:
            from wsidicom import WsiDicom
            from wsidicom.errors import WsiDicomNoResolutionError
        except ImportError as error:
            raise ImportError(
                "DICOM slides need the optional wsidicom package: pip install 'exaonepath-hf[dicom]' "
                "(or pip install wsidicom)"
            ) from error
        self.path = Path(path)
        self._no_resolution_error = WsiDicomNoResolutionError
        self._slide = WsiDicom.open(self.path)
        # wsidicom numbers levels by their power-of-two scale; keep our own 0..n-1 index of what exists.
        self._levels = list(self._slide.levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(lv.size.width), int(lv.size.height)) for lv in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        base_width = self._levels[0].size.width
        return tuple(base_width / lv.size.width for lv in self._levels)

    @property
    def metadata_mpp(self) -> tuple[float, float] | None:
        try:
            mpp = self._levels[0].mpp
        except self._no_resolution_error:
            return None
        return _positive_mpp((mpp.width, mpp.height))

    def _read(self, location, level, size):
        downsample = self.level_downsamples[level]
        level_location = (round(location[0] / downsample), round(location[1] / downsample))
        return self._slide.read_region(level_location, self._levels[level].level, size, as_array=True)

    def close(self) -> None:
        self._slide.close()


_READERS: dict[str, type[SlideReader]] = {
    "tiffslide": TiffSlideReader,
    "openslide": OpenSlideReader,
    "wsidicom": WsiDicomReader,
}


def _holds_dicom(folder: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in folder.iterdir())


def expand_slide_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """The slides that input paths name, folders read as TRIDENT's `--wsi_dir`: a folder that holds .dcm files
    is one DICOM slide; any other folder stands for the slide files directly in it (suffixes in
    `SLIDE_SUFFIXES`, sorted), and raises `ValueError` when it has none. Other paths, missing ones included,
    stay as they are, so that reading them reports what is wrong with each."""
    slides = []
    for path in map(Path, paths):
        if not path.is_dir() or _holds_dicom(path):
            slides.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
        if not found:
            raise ValueError(
                f"{path}: a folder with neither slide files ({', '.join(SLIDE_SUFFIXES)}) nor a DICOM slide "
                "(.dcm files)"
            )
        slides += found
    return slides


def _is_dicom(path: Path) -> bool:
    if path.is_dir():
        return True
    if path.suffix.lower() == ".dcm":
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def open_slide(path: str | Path, backend: str = "auto") -> SlideReader:
    """Open a whole-slide image. `backend="auto"` picks wsidicom for DICOM (a `.dcm` file, a file with the
    DICM preamble, or a folder) and tiffslide otherwise."""
    path = Path(path)
    if backend not in SLIDE_BACKENDS:
        raise ValueError(f"unknown slide backend {backend!r}; choose one of {', '.join(SLIDE_BACKENDS)}")
    if not path.exists():
        raise FileNotFoundError(f"slide not found: {path}")
    if backend == "auto":
        backend = "wsidicom" if _is_dicom(path) else "tiffslide"
    try:
        return _READERS[backend](path)
    except ImportError:
        raise
    except Exception as error:
        raise SlideReadError(
            f"{path}: {backend} cannot open it ({type(error).__name__}: {error}); the file may be truncated or "
            "corrupt, or in a format this backend does not read (try another --backend)"
        ) from error


def _block_mean(region: np.ndarray, factor: int) -> np.ndarray:
    """Mean (rounded) of `factor` x `factor` blocks of an RGB uint8 region whose sides are multiples of
    `factor`. Pillow's box reduction computes exactly this, ten times faster than a numpy reshape-sum."""
    if factor == 1:
        return region
    return np.asarray(Image.fromarray(region).reduce(factor))


def read_downsampled_views(
    reader: SlideReader, downsamples: Sequence[float]
) -> list[tuple[np.ndarray, float]]:
    """Low-resolution RGB views of the whole slide, about `downsamples[i]` level-0 pixels per output pixel.

    Each view reads the coarsest pyramid level that is at least that fine and averages integer blocks of it,
    block by block, so memory stays bounded by one block (plus the views) even on a slide with a single level;
    views that come from the same level share its reads. Returns (image, exact level-0 pixels per pixel) per
    requested downsample.
    """
    plans = []
    for downsample in downsamples:
        if downsample < 1:
            raise ValueError(f"downsample must be >= 1 (level-0 pixels per output pixel), got {downsample}")
        level = reader.best_level_for_downsample(downsample)
        factor = max(1, int(downsample / reader.level_downsamples[level] + 0.01))
        level_width, level_height = reader.level_dimensions[level]
        if level_width < factor or level_height < factor:
            raise ValueError(
                f"{reader.path}: the slide ({level_width}x{level_height} at level {level}) is smaller than one "
                f"pixel of the {downsample:g}x downsampled view; lower the detection resolution"
            )
        # Level pixels a view covers: whole blocks only.
        plans.append((level, factor, level_width // factor * factor, level_height // factor * factor))
    views: list[np.ndarray | None] = [None] * len(plans)
    for level in sorted({plan[0] for plan in plans}):
        members = [i for i, plan in enumerate(plans) if plan[0] == level]
        level_downsample = reader.level_downsamples[level]
        common = math.lcm(*(plans[i][1] for i in members))
        block = common * max(1, _DOWNSAMPLE_BLOCK_SIDE // common)
        span_width = max(plans[i][2] for i in members)
        span_height = max(plans[i][3] for i in members)
        for i in members:
            _, factor, width, height = plans[i]
            views[i] = np.empty((height // factor, width // factor, 3), dtype=np.uint8)
        for top in range(0, span_height, block):
            for left in range(0, span_width, block):
                size = (min(block, span_width - left), min(block, span_height - top))
                location = (round(left * level_downsample), round(top * level_downsample))
                region = reader.read_region(location, level, size)
                for i in members:
                    _, factor, width, height = plans[i]
                    part = region[: max(0, min(size[1], height - top)), : max(0, min(size[0], width - left))]
                    if part.size:
                        rows, cols = top // factor, left // factor
                        reduced = _block_mean(part, factor)
                        views[i][rows : rows + reduced.shape[0], cols : cols + reduced.shape[1]] = reduced
    return [
        (view, reader.level_downsamples[plan[0]] * plan[1]) for view, plan in zip(views, plans, strict=True)
    ]


def read_downsampled(reader: SlideReader, downsample: float) -> tuple[np.ndarray, float]:
    """One low-resolution view of the whole slide (see `read_downsampled_views`)."""
    return read_downsampled_views(reader, [downsample])[0]
