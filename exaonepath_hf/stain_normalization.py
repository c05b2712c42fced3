"""Batched Macenko stain normalization in torch, exact to the EXAONEPath release and fast.

EXAONEPath Macenko-normalizes every patch with torchstain's torch algorithm (a port of HEnorm_python, Macenko et
al., ISBI 2009). This module reproduces that algorithm image by image, but runs a whole batch of equally sized
images through each step at once:

1. tissue pixels = every OD channel ``>= beta`` (for uint8, exactly the release's float32 test, as a threshold
   on the brightest channel);
2. the covariance of the tissue OD, ``OD = log(io) - log(I + 1)``, from products of float32 values near zero
   (``log(I + 1)`` minus a sampled tissue mean; a 256-entry table per image for uint8) accumulated in float64,
   and its two leading eigenvectors (batched ``eigh``);
3. every pixel's OD projected on that plane; the nearest-rank ``alpha`` and ``100 - alpha`` percentiles of the
   tissue angles (numpy's introselect on the tensor's memory, not a sort; ranked by the slope ``-x/y`` where that
   orders them like the angle) give the stain vectors, hematoxylin first;
4. the least-squares concentrations of all pixels (pseudo-inverse of the 3x2 stain matrix, applied to the plane
   projection) and their nearest-rank 99th percentiles;
5. ``io * exp(-reference_stains @ scaled concentrations)``, capped at 255, returned as float 0..1, as one
   ``exp2`` of one batched product per image.

Images that cannot be normalized come back unchanged (as float 0..1) and are flagged in
:attr:`MacenkoOutput.normalized`; they never produce NaN and never fail the rest of the batch. See
:class:`MacenkoNormalizer` for the exact fallback rule and :data:`DEFAULT_MIN_TISSUE_FRACTION` for why it exists.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_MIN_TISSUE_FRACTION",
    "DEFAULT_STAIN_REFERENCE",
    "MacenkoNormalizer",
    "MacenkoOutput",
    "StainReference",
]

#: Minimum fraction of tissue pixels (every OD channel >= beta) for an image to be normalized. The release
#: normalizes any image with at least 2 tissue pixels, but its max concentrations are 99th percentiles over *all*
#: pixels: below 1% tissue they fall on the glass, come out near zero or negative, and the "normalized" image is
#: meaningless (measured here: a tumour patch cut down to 0.8% tissue gets a negative hematoxylin maximum;
#: background crops with 0.02-0.3% tissue come out dark). On the test data, histolab's background crops
#: (almost-white, no-tissue, pen on glass) have at most 2.2% tissue per 224x224 crop, mostly < 0.1%; tissue
#: crops (including sparse adipose tissue) have at least 2.3%. Set ``min_tissue_fraction=0`` for the release's
#: decisions everywhere.
DEFAULT_MIN_TISSUE_FRACTION = 0.01

ImageBatch = torch.Tensor | Sequence[torch.Tensor]

_LOG2_E = math.log2(math.e)
# the shift of the covariance pass is a tissue mean over every this-many-th pixel
_SHIFT_SAMPLE_STRIDE = 32
# log(I + 1) of every uint8 intensity I
_LOG_INTENSITY_TABLE = torch.log(torch.arange(256, dtype=torch.float64) + 1).to(torch.float32)
# float32 matrix products over this many pixels at most, accumulated in float64
_PRODUCT_BLOCK = 1 << 16


@dataclass(frozen=True)
class StainReference:
    """A Macenko stain reference: what every normalized image is mapped to.

    Args:
        stain_matrix: 3x2 optical-density stain vectors as rows R, G, B; column 0 is hematoxylin, column 1 eosin.
        max_concentrations: the 99th-percentile concentration of hematoxylin and of eosin in the reference.
    """

    stain_matrix: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    max_concentrations: tuple[float, float]

    def __post_init__(self):
        matrix = tuple(tuple(float(value) for value in row) for row in self.stain_matrix)
        maxima = tuple(float(value) for value in self.max_concentrations)
        if len(matrix) != 3 or any(len(row) != 2 for row in matrix) or len(maxima) != 2:
            raise ValueError(
                "StainReference needs a 3x2 stain_matrix (rows R, G, B; columns hematoxylin, eosin) and 2 "
                f"max_concentrations; got {self.stain_matrix!r} and {self.max_concentrations!r}"
            )
        values = [value for row in matrix for value in row] + list(maxima)
        if not all(math.isfinite(value) for value in values) or min(maxima) <= 0:
            raise ValueError(
                f"StainReference values must be finite and max_concentrations positive; got {matrix}, {maxima}"
            )
        # normalise lists / numpy scalars to plain nested tuples of floats so that equality and hashing work
        object.__setattr__(self, "stain_matrix", matrix)
        object.__setattr__(self, "max_concentrations", maxima)

    def to_dict(self) -> dict[str, list]:
        """Plain JSON-serializable numbers."""
        return {
            "stain_matrix": [list(row) for row in self.stain_matrix],
            "max_concentrations": list(self.max_concentrations),
        }

    @classmethod
    def from_dict(cls, data: dict) -> StainReference:
        return cls(stain_matrix=data["stain_matrix"], max_concentrations=data["max_concentrations"])

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stain_matrix [3, 2], max_concentrations [2])`` as float32 tensors on ``device``."""
        return (
            torch.tensor(self.stain_matrix, dtype=torch.float32, device=device),
            torch.tensor(self.max_concentrations, dtype=torch.float32, device=device),
        )


#: HEnorm_python's / torchstain's reference, the default of the EXAONEPath release's normalizer class.
DEFAULT_STAIN_REFERENCE = StainReference(
    stain_matrix=((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581)),
    max_concentrations=(1.9705, 1.0308),
)


@dataclass
class MacenkoOutput:
    """Result of :meth:`MacenkoNormalizer.normalize`.

    Attributes:
        images: float32 images in 0..1; an N×3×H×W tensor for a tensor input, a list of 3×H×W tensors for a list.
        normalized: bool tensor [N]; False where the image came back unchanged (a fallback, see
            :class:`MacenkoNormalizer`).
    """

    images: torch.Tensor | list[torch.Tensor]
    normalized: torch.Tensor

    @property
    def num_fallbacks(self) -> int:
        return int((~self.normalized).sum())


@dataclass
class _StainDecomposition:
    """Per-image Macenko decomposition of a batch of N images with P pixels each."""

    stain_matrix: torch.Tensor  # [N, 3, 2], hematoxylin first
    projection: torch.Tensor  # [N, 2, P]: every pixel's OD in the plane of the two leading eigenvectors
    to_concentrations: torch.Tensor  # [N, 2, 2]: plane coordinates -> least-squares concentrations
    max_concentrations: torch.Tensor  # [N, 2], nearest-rank 99th percentile
    valid: torch.Tensor  # [N] bool: enough tissue and a well-posed decomposition


@dataclass
class _Workspace:
    """The per-pixel buffers of one chunk of N images with P pixels (views of a :class:`_WorkspaceMemory`)."""

    log_intensity: torch.Tensor  # [N, 3, P] float32; once projected, the angle keys and concentrations
    weights: torch.Tensor  # [N, 1, P] float32: 1 on tissue, 0 on background
    projection: torch.Tensor  # [N, 2, P]
    # [P]: what background pixels get instead of an angle key: below every key, and distinct, since a selection
    # among many equal values is slow (45k equal values: 4x slower)
    background_keys: torch.Tensor
    brightest: torch.Tensor  # [N, P], the input's dtype
    normalized: torch.Tensor  # [N, 3, H, W] float32: `then`'s input; empty when not needed
    stacked: torch.Tensor  # [N, 3, H, W], the input's dtype: a chunk of a list input; empty when not needed


class _MemoryPool:
    """Memory kept for reuse by key, at most ``max_bytes`` in all: what was returned longest ago goes first.

    Fresh buffers of a few MB and more come from the OS as new pages that the kernel faults in and zeroes on first
    touch, which costs as much as the arithmetic on them; reused ones are mapped and often still in cache.
    """

    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self._start_empty()
        # A forked child (a DataLoader worker) gets a copy of the lock, held forever if another thread held it at
        # the fork, and copy-on-write memory that costs a copy per page where fresh memory costs a zeroing.
        os.register_at_fork(after_in_child=self._start_empty)

    def _start_empty(self) -> None:
        self._free: list[tuple[Hashable, object, int]] = []  # (key, memory, bytes), in the order returned
        self._bytes = 0
        # re-entrant: an output's release (see `_recycled_empty`) can run inside `put`, from garbage collection
        self._lock = threading.RLock()

    def take(self, key: Hashable) -> object | None:
        with self._lock:
            for index in reversed(range(len(self._free))):
                if self._free[index][0] == key:
                    _, memory, nbytes = self._free.pop(index)
                    self._bytes -= nbytes
                    return memory
        return None

    def put(self, key: Hashable, memory: object, nbytes: int) -> None:
        if nbytes > self._max_bytes:  # would push out everything else, then itself
            return
        with self._lock:
            self._free.append((key, memory, nbytes))
            self._bytes += nbytes
            while self._bytes > self._max_bytes:
                self._bytes -= self._free.pop(0)[2]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0


# per-pixel buffers between calls: reuse took a call on one 512x512 image from 3.7 to 2.8 ms (one 256x256 image:
# 1.65 to 1.15 ms); about 12 MB per worker thread for chunks of eight 224x224 images
_WORKSPACES = _MemoryPool(max_bytes=256 << 20)
# the memory of outputs that callers have released (see `_recycled_empty`)
_RELEASED_OUTPUTS = _MemoryPool(max_bytes=512 << 20)


def _size_class(count: int) -> int:
    """``count`` rounded up to one of 8 steps per power of two (at most 12.5% more), so that buffers for about the
    same size share their memory: images of varied sizes would otherwise each need their own."""
    step = 1 << max(count.bit_length() - 4, 0)
    return -(-count // step) * step


def _empty_kept(count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # kept for later calls: an inference tensor could not be written by a call outside inference mode
    with torch.inference_mode(False):
        return torch.empty(count, dtype=dtype, device=device)


class _WorkspaceMemory:
    """Flat memory for the workspace of any chunk of up to ``max_images`` images of up to ``capacity`` pixels."""

    def __init__(
        self,
        max_images: int,
        capacity: int,
        device: torch.device,
        dtype: torch.dtype,
        lowest_key: float,
        stacked: bool = False,
        normalized: bool = False,
    ):
        self.stacked, self.normalized = stacked, normalized
        floats_per_pixel = 3 + 1 + 2 + (3 if normalized else 0)
        inputs_per_pixel = 1 + (3 if stacked else 0)
        self._floats = _empty_kept(max_images * capacity * floats_per_pixel, torch.float32, device)
        self._inputs = _empty_kept(max_images * capacity * inputs_per_pixel, dtype, device)
        self._background_keys = _distinct_values_below(lowest_key - 1, capacity, device)
        self.nbytes = sum(t.numel() * t.element_size() for t in (self._floats, self._inputs))

    def workspace(self, n: int, height: int, width: int) -> _Workspace:
        """The buffers of a chunk of ``n`` images of ``height`` x ``width`` pixels."""
        p = height * width
        float_sizes = (n * 3 * p, n * p, n * 2 * p, n * 3 * p if self.normalized else 0)
        log_intensity, weights, projection, normalized = self._floats[: sum(float_sizes)].split(float_sizes)
        input_sizes = (n * p, n * 3 * p if self.stacked else 0)
        brightest, stacked = self._inputs[: sum(input_sizes)].split(input_sizes)
        return _Workspace(
            log_intensity=log_intensity.view(n, 3, p),
            weights=weights.view(n, 1, p),
            projection=projection.view(n, 2, p),
            background_keys=self._background_keys[:p],
            brightest=brightest.view(n, p),
            normalized=normalized.view(-1, 3, height, width),
            stacked=stacked.view(-1, 3, height, width),
        )


def _recycled_empty(shape: tuple[int, ...], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """``torch.empty(shape)``, on CPU in the memory of an earlier output of about the same size that its caller
    has released.

    An output of tens of MB is new memory from the OS each time (glibc maps allocations above 32 MB afresh, and
    unmaps them on free), and faulting it in costs as much as a third of the normalization: 52 ms for the 154 MB
    of 256 224x224 outputs, against 5 ms to write it once mapped. A caller normalizing batch after batch
    releases each output soon after; its memory comes back here (when the last tensor viewing it is freed) and
    is handed out again. GPU memory is recycled by torch's caching allocator already.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    capacity = _size_class(nbytes)
    block = _RELEASED_OUTPUTS.take(capacity)
    if block is None:
        block = _empty_kept(capacity, torch.uint8, device)
    # The output owns a fresh numpy view of the block: once every tensor on it is gone, that view dies and the
    # block goes back to the pool (which holds the block itself, never a view a caller could still be using).
    # Bytes, because numpy has no bfloat16.
    view = block[:nbytes].numpy()
    weakref.finalize(view, _RELEASED_OUTPUTS.put, capacity, block, capacity).atexit = False
    return torch.from_numpy(view).view(dtype).view(shape)


@functools.lru_cache(maxsize=8)
def _distinct_values_below(ceiling: float, count: int, device: torch.device) -> torch.Tensor:
    """``count`` distinct float32 values below ``ceiling`` in a fixed shuffled order: introselect picks its pivots
    from the middle and the ends of a range, and a monotonic run of values makes those bad pivots. Cached (read
    only): the shuffle of a 512x512 image's pixels takes 4 ms, more than normalizing it."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    return (ceiling - order.to(torch.float32)).to(device)


def _blocked_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` [N, R, R] in float64 for [N, R, P] float32 inputs: float32 products over blocks of pixels, summed
    in float64. BLAS accumulates a long product in few running sums: over a 1000x1000 image that is 1e-4 off,
    enough to turn the stain plane of a target by 1e-3 when its two smaller eigenvalues are close."""
    products = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[-1], _PRODUCT_BLOCK):
        block = slice(start, start + _PRODUCT_BLOCK)
        products += torch.bmm(a[..., block], b[..., block].transpose(1, 2))
    return products


def _nearest_rank(count: int, percent: float) -> int:
    """1-based rank of the ``percent`` percentile among ``count`` values, torchstain's rule:
    ``1 + round(0.01 * q * (n - 1))``, rounding half to even in float64."""
    return 1 + round((0.01 * percent) * (count - 1))


def _order_statistics(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The values at 0-based ``positions`` [R, m] of each row of ``rows`` [R, P] sorted ascending; exact.

    ``rows`` is scratch: it is reordered in place. On CPU every row is partitioned by numpy's introselect,
    which works on the tensor's own memory and releases the GIL: O(P) at about 0.6 ns per value, where
    ``torch.topk``/``kthvalue`` select (value, index) pairs at about 7 ns per value. Elsewhere torch's own ops.
    """
    if rows.device.type != "cpu":
        return _order_statistics_by_torch(rows, positions)
    array, kths = rows.numpy(), positions.tolist()
    if all(row_kths == kths[0] for row_kths in kths):  # one call for all rows: less time holding the GIL
        _partition_at(array, kths[0])
    else:
        for row, row_kths in zip(array, kths, strict=True):
            _partition_at(row, row_kths)
    return rows.gather(1, positions)


def _order_statistics_by_torch(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``_order_statistics`` with torch ops, for GPUs: a selection where every row wants one and the same
    position (the concentration percentiles), otherwise a segmented sort, which GPUs do fast."""
    if positions.shape[1] == 1 and bool((positions == positions[0]).all()):
        return rows.kthvalue(int(positions[0, 0]) + 1, dim=-1, keepdim=True).values
    return rows.sort(dim=-1).values.gather(1, positions)


def _partition_at(values, kths: list[int]) -> None:
    """Partition the numpy array ``values`` in place along its last axis so that each of ``kths`` holds its
    order statistic: one position at a time, each in the part left of the previous one (numpy's several-kth
    partition measured 2-15x slower than these single selections)."""
    end = values.shape[-1]
    for kth in sorted(set(kths), reverse=True):
        values[..., :end].partition(kth, axis=-1)
        end = kth


def _pseudo_inverse_3x2(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares solver (Moore-Penrose pseudo-inverse) of a batch of 3x2 matrices, and their full-rank flags.

    LAPACK's least-squares rank rule, in float64: a singular value at most ``3 eps`` (of float32) times the
    largest counts as zero. For a rank-1 matrix that gives ``A^T / ||A||_F^2``, the minimum-norm solution that
    ``torch.linalg.lstsq`` (and so the release) returns.
    """
    rcond = 3 * torch.finfo(matrix.dtype).eps
    u, singular_values, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    kept = singular_values > rcond * singular_values[:, :1]
    inverse = torch.where(kept, 1 / singular_values, 0.0)
    return ((vh.mT * inverse.unsqueeze(-2)) @ u.mT).to(matrix.dtype), kept[:, 1]


@functools.lru_cache(maxsize=16)
def _output_constants(
    reference: StainReference, io: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference stain matrix [3, 2], max concentrations [2] and ``log2(io / 255)`` [1, 1, 1] on ``device``."""
    stain_matrix, max_concentrations = reference.tensors(device)
    return stain_matrix, max_concentrations, torch.full((1, 1, 1), math.log2(io / 255.0), device=device)


@functools.lru_cache(maxsize=16)
def _uint8_tissue_limit(io: float, beta: float) -> int:
    """OD >= beta <=> I < this, for uint8 intensities I, with the 256 ODs computed the release's way (float32)."""
    table = -torch.log((torch.arange(256, dtype=torch.float32) + 1) / io)
    return int((table >= beta).sum())


class MacenkoNormalizer:
    """Batched Macenko normalization with the EXAONEPath release's semantics per image.

    Args:
        reference: the stain appearance to map every image to; :data:`DEFAULT_STAIN_REFERENCE` by default, or the
            result of :meth:`fit` on a target image.
        io: transmitted light intensity (release: 240).
        alpha: percentile of the stain-vector angles, in percent (release: 1).
        beta: optical-density threshold below which a pixel counts as background (release: 0.15).
        min_tissue_fraction: images whose tissue fraction (pixels with every OD channel >= ``beta``) is below
            this are returned unchanged; see :data:`DEFAULT_MIN_TISSUE_FRACTION`.
        max_batch_pixels: images are processed in chunks of at most this many pixels (bounds the memory of the
            per-pixel intermediates; a single larger image is processed whole). The default, eight 224x224
            images, measured fastest on CPU: larger chunks spill the per-pixel buffers out of cache.

    Memory: on CPU, the per-pixel buffers (about 1.5 MB per 224x224 image of a chunk and worker thread) and the
    memory of outputs that callers have released are kept between calls, for later calls on images of about the
    same size: fresh memory costs page faults that took a third of the time. At most 256 MB of buffers and
    512 MB of released outputs are kept (process-wide, the least recently used dropped first);
    :meth:`cached_bytes` tells how much is kept and :meth:`empty_cache` hands it back. Such recycled memory
    cannot grow: ``resize_`` an output to more elements only after ``clone()``.

    An image comes back unchanged (float 0..1) with ``normalized=False`` when:

    - it has fewer than 2 tissue pixels (the release raises and returns the input), or its per-image
      coefficients are not finite (the release's output has NaN and it returns the input): the release's rule;
    - with ``min_tissue_fraction > 0`` (default :data:`DEFAULT_MIN_TISSUE_FRACTION`), also when its tissue
      fraction is below the threshold or its decomposition is degenerate: a rank-deficient stain matrix (both
      stain vectors equal, e.g. a single-coloured image) or a non-positive 99th-percentile concentration. The
      release returns meaningless images for those.

    ``min_tissue_fraction=0`` therefore reproduces the release's decisions exactly, and its outputs to float32
    rounding (except where the tissue covariance is rank-deficient, e.g. 2 tissue pixels: the stain plane is
    then arbitrary in both implementations).
    """

    def __init__(
        self,
        reference: StainReference = DEFAULT_STAIN_REFERENCE,
        io: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
        max_batch_pixels: int = 8 * 224 * 224,
    ):
        if not isinstance(reference, StainReference):
            reference = StainReference.from_dict(reference)
        if not io > 0:
            raise ValueError(f"io (transmitted light intensity) must be positive, got {io}")
        if not 0 <= alpha < 50:
            raise ValueError(f"alpha is a percentile in [0, 50), got {alpha}")
        if not 0 <= min_tissue_fraction <= 1:
            raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction}")
        self.reference = reference
        self.io = float(io)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.max_batch_pixels = int(max_batch_pixels)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(reference={self.reference}, io={self.io}, alpha={self.alpha}, "
            f"beta={self.beta}, min_tissue_fraction={self.min_tissue_fraction})"
        )

    # ----------------------------------------------------------------------------------------------- public API
    def fit(self, images: ImageBatch) -> StainReference:
        """Fit the reference to one or more target images, set it on this normalizer and return it.

        Several targets are pooled: their pixels are treated as one image, which for a single target equals the
        release's (torchstain's) ``fit``.
        """
        batch = _validated_images(images, "images")
        pooled = torch.cat([image.reshape(3, -1) for image in batch], dim=1).unsqueeze(0)
        num_pixels = pooled.shape[-1]
        memory = _WorkspaceMemory(1, num_pixels, pooled.device, pooled.dtype, self._lowest_angle_key())
        workspace = memory.workspace(1, 1, num_pixels)
        scratch = torch.empty(1, 3, num_pixels, device=pooled.device)
        decomposition = self._decompose(pooled, workspace, scratch, min_tissue_fraction=0.0)
        if not bool(decomposition.valid[0]):
            raise ValueError(
                "cannot fit a stain reference: the target image(s) have too few tissue pixels (optical density "
                f">= beta={self.beta} in every channel) or a degenerate stain decomposition; use an H&E image "
                "with plenty of stained tissue"
            )
        self.reference = StainReference(
            stain_matrix=decomposition.stain_matrix[0].tolist(),
            max_concentrations=decomposition.max_concentrations[0].tolist(),
        )
        return self.reference

    def normalize(
        self, images: ImageBatch, then: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> MacenkoOutput:
        """Normalize a batch of images: an N×3×H×W or 3×H×W tensor, or a list of 3×H×W tensors of any sizes.

        Images are uint8 or float on the 0..255 scale, on any device; the output is float32 0..1 on the same
        device. Equally sized images are processed together, in chunks of at most ``max_batch_pixels``.

        ``then``, if given, is applied to every chunk of normalized images ([n, 3, H, W], float 0..1) right
        where it was computed (e.g. resize and crop for a model), and its outputs are returned instead: the
        full-size normalized images are then never materialized all at once.
        """
        batch = _validated_images(images, "images")
        if isinstance(images, torch.Tensor):
            stacked = images if images.dim() == 4 else images.unsqueeze(0)
            outputs, flags = self._normalize_equal_sized(stacked, then)
            return MacenkoOutput(images=outputs if images.dim() == 4 else outputs[0], normalized=flags)
        per_image: list[torch.Tensor | None] = [None] * len(batch)
        flags = torch.zeros(len(batch), dtype=torch.bool, device=batch[0].device)
        for indices in _group_by_shape(batch).values():
            outputs, valid = self._normalize_equal_sized([batch[i] for i in indices], then)
            flags[indices] = valid.to(flags.device)
            for position, index in enumerate(indices):
                per_image[index] = outputs[position]
        return MacenkoOutput(images=per_image, normalized=flags)

    __call__ = normalize

    def normalize_stack(
        self, images: ImageBatch, then: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> MacenkoOutput:
        """:meth:`normalize` for images of one size, dtype and device, returned as one batch tensor also for a
        list: its images are stacked chunk by chunk as they are normalized, never copied into a batch first."""
        batch = _validated_images(images, "images")
        if len(_group_by_shape(batch)) > 1:
            kinds = sorted({f"{tuple(image.shape)} {image.dtype} {image.device}" for image in batch})
            raise ValueError(
                f"normalize_stack needs images of one shape, dtype and device; got {', '.join(kinds)}: use "
                "normalize() for mixed images"
            )
        source = images if isinstance(images, torch.Tensor) and images.dim() == 4 else batch
        outputs, flags = self._normalize_equal_sized(source, then)
        return MacenkoOutput(images=outputs, normalized=flags)

    @staticmethod
    def cached_bytes() -> int:
        """Bytes of memory kept between calls (working buffers and released outputs), process-wide."""
        return _WORKSPACES.nbytes + _RELEASED_OUTPUTS.nbytes

    @staticmethod
    def empty_cache() -> None:
        """Hand the memory kept between calls (working buffers and released outputs) back to the allocator."""
        _WORKSPACES.clear()
        _RELEASED_OUTPUTS.clear()

    # ------------------------------------------------------------------------------------------------ internals
    def _normalize_equal_sized(
        self, images: torch.Tensor | list[torch.Tensor], then: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalize [N, 3, H, W] (or N equally sized 3×H×W images, which are stacked chunk by chunk, never all
        at once) -> (float 0..1 [N, 3, H, W] or ``then``'s outputs, valid [N]).

        On CPU the chunks are shared out to ``torch.get_num_threads()`` worker threads that each run their
        ops single-threaded: the per-pixel steps are many short passes, and splitting every one of them across
        threads costs more in synchronisation than it gains (badly so on a busy machine).
        """
        count, (channels, height, width) = len(images), images[0].shape
        device, dtype, stack = images[0].device, images[0].dtype, not isinstance(images, torch.Tensor)
        pixels = height * width
        per_chunk = min(count, max(1, self.max_batch_pixels // pixels))
        chunks = [slice(start, min(start + per_chunk, count)) for start in range(0, count, per_chunk)]
        valid = torch.empty(count, dtype=torch.bool, device=device)
        # with `then`, the output's shape is `then`'s, known once the first chunk is done
        outputs = None if then else _recycled_empty((count, channels, height, width), device)
        outputs_lock = threading.Lock()
        layout = (
            per_chunk,
            _size_class(pixels),
            device,
            dtype,
            self._lowest_angle_key(),
            stack,
            bool(then),
        )
        memories: dict[int, _WorkspaceMemory] = {}  # one per worker thread

        def run(chunk: slice) -> None:
            nonlocal outputs
            thread = threading.get_ident()
            if thread not in memories:
                memories[thread] = _WORKSPACES.take(layout) or _WorkspaceMemory(*layout)
            workspace = memories[thread].workspace(chunk.stop - chunk.start, height, width)
            part = torch.stack(images[chunk], out=workspace.stacked) if stack else images[chunk]
            if then is None:
                valid[chunk] = self._normalize_chunk(part, out=outputs[chunk], workspace=workspace)
                return
            valid[chunk] = self._normalize_chunk(part, out=workspace.normalized, workspace=workspace)
            result = then(workspace.normalized)
            with outputs_lock:
                if outputs is None:
                    outputs = _recycled_empty((count, *result.shape[1:]), result.device, result.dtype)
            outputs[chunk] = result

        threads = torch.get_num_threads()
        # even the first chunk goes to a worker: ops run on several intra-op threads before the workers start
        # measured 5-15% slower overall on 2 cores
        workers = min(threads, len(chunks)) if device.type == "cpu" else 1
        try:
            if workers <= 1:
                for chunk in chunks:
                    run(chunk)
            else:
                self._run_in_workers(run, chunks, workers)
        finally:
            if device.type == "cpu":  # GPU memory is recycled by torch's caching allocator
                for memory in memories.values():
                    _WORKSPACES.put(layout, memory, memory.nbytes)
        return outputs, valid

    @staticmethod
    def _run_in_workers(run: Callable[[slice], None], chunks: list[slice], workers: int) -> None:
        """``run`` every chunk on ``workers`` threads that run their ops single-threaded."""
        threads = torch.get_num_threads()

        # Grad and inference modes are thread-local: worker threads take the caller's, or tensors created under
        # the caller's torch.inference_mode() could not be written by them.
        inference_mode = torch.is_inference_mode_enabled()

        def run_in_worker(chunk: slice) -> None:
            with torch.inference_mode(inference_mode), torch.no_grad():
                run(chunk)

        # each worker runs its ops on one intra-op thread; the setting also reaches process-wide parts (BLAS),
        # so it is restored once, after the pool
        try:
            with ThreadPoolExecutor(
                workers, thread_name_prefix="macenko", initializer=torch.set_num_threads, initargs=(1,)
            ) as pool:
                for _ in pool.map(run_in_worker, chunks):
                    pass
        finally:
            torch.set_num_threads(threads)  # the caller's setting, process-wide parts included

    def _normalize_chunk(
        self, images: torch.Tensor, out: torch.Tensor, workspace: _Workspace
    ) -> torch.Tensor:
        """Normalize equally sized images [N, 3, H, W] into ``out`` (float 0..1); returns the valid flags [N]."""
        flat_out = out.view(images.shape[0], 3, -1)
        # `out` is free until the very end: it serves as the decomposition's scratch
        decomposition = self._decompose(images, workspace, scratch=flat_out)
        reference_matrix, reference_max, log2_scale = _output_constants(
            self.reference, self.io, images.device
        )
        # scaling the concentrations by maxCRef / maxC is a per-image scaling of the reference stain columns
        mixing = reference_matrix * (reference_max / decomposition.max_concentrations).unsqueeze(-2)
        # io/255 * exp(-mixing @ C) with C = to_concentrations @ projection, as one exp2 of one batched product
        exponent = mixing @ decomposition.to_concentrations * -_LOG2_E
        torch.baddbmm(log2_scale, exponent, decomposition.projection, out=flat_out)
        flat_out.exp2_().clamp_(max=1)
        # the release falls back when its output has NaN; with finite inputs that happens exactly when the
        # per-image coefficients are not finite (the exponent is then finite, or +-inf without inf - inf)
        coefficients = torch.cat((exponent, decomposition.stain_matrix), dim=-1).flatten(1)
        valid = decomposition.valid & torch.isfinite(coefficients).all(dim=1)
        if not bool(valid.all()):
            out[~valid] = images[~valid].float() / 255.0
        return valid

    def _decompose(
        self,
        images: torch.Tensor,
        workspace: _Workspace,
        scratch: torch.Tensor,
        min_tissue_fraction: float | None = None,
    ) -> _StainDecomposition:
        """Stain matrix, plane projection, concentration map and 99th percentiles of every image at once.

        ``images`` [N, 3, H, W] or [N, 3, P]; ``scratch`` a float32 [N, 3, P] buffer that is overwritten.
        """
        if min_tissue_fraction is None:
            min_tissue_fraction = self.min_tissue_fraction
        n = images.shape[0]
        flat = images.reshape(n, 3, -1)
        num_pixels = flat.shape[-1]
        weights = self._tissue_weights(flat, workspace)
        tissue_count = weights.sum(dim=-1).squeeze(-1).round().to(torch.int64)  # exact below 2^24 pixels
        enough_tissue = tissue_count >= 2

        # OD = log(io) - log(I + 1): its covariance is that of log(I + 1), taken about a shift close to the tissue
        # mean, so that the float32 products of one pass lose no precision to cancellation
        shifted, shift = self._shifted_log_intensity(flat, weights, workspace, scratch)
        weighted = torch.mul(shifted, weights, out=scratch)
        # the sum is pairwise; a matrix product would accumulate it in order (1e-4 error on 1000x1000 images)
        offset = weighted.sum(dim=-1, keepdim=True).double()  # tissue count * (mean - shift)
        count = tissue_count.to(torch.float64).clamp(min=2)[:, None, None]
        products = _blocked_products(weighted, shifted)
        covariance = (products - offset @ offset.transpose(1, 2) / count) / (count - 1)
        # images with < 2 tissue pixels get the identity so that the batched eigh never sees NaN; they are flagged
        identity = torch.eye(3, dtype=covariance.dtype, device=flat.device).expand(n, 3, 3)
        covariance = torch.where(enough_tissue[:, None, None], covariance, identity)
        plane = torch.linalg.eigh(covariance).eigenvectors[..., 1:].to(torch.float32)  # the two largest
        plane_t = plane.transpose(-1, -2)

        # every pixel's OD in the plane: plane^T (log(io) - shift) - plane^T shifted
        projection = torch.baddbmm(
            plane_t @ (math.log(self.io) - shift), plane_t, shifted, alpha=-1, out=workspace.projection
        )
        # The stain vectors come from the alpha / 100-alpha nearest-rank percentiles of the tissue angles
        # atan2(y, x), with y and x a pixel's coordinates along the largest and the second eigenvector. Where y
        # has one sign over the tissue, the angle is sign(y) pi/2 + atan(-x/y): -x/y orders the pixels as their
        # angles do at the cost of a division instead of an atan2 (7x slower). That holds whenever the leading
        # eigenvector's components share a sign (usual for H&E): tissue OD is >= beta > 0 in every channel.
        leading = plane[..., 1]
        one_signed = (leading > 0).all(dim=-1) | (leading < 0).all(dim=-1)
        by_slope = one_signed & (self.beta > 0)
        # the log intensities are done with once projected: their buffer holds the angle keys, then concentrations
        keys, concentrations = workspace.log_intensity.view(-1).split((n * num_pixels, n * 2 * num_pixels))
        keys, concentrations = keys.view(n, num_pixels), concentrations.view(n, 2, num_pixels)
        if bool(by_slope.any()):  # background pixels may divide by 0: NaN or inf would survive the lerp below
            torch.div(projection[:, 0], projection[:, 1], out=keys).neg_().nan_to_num_(0.0, 0.0, 0.0)
        if not bool(by_slope.all()):
            by_angle = (~by_slope).nonzero().squeeze(1)
            keys[by_angle] = torch.atan2(projection[by_angle, 1], projection[by_angle, 0])
        torch.lerp(workspace.background_keys, keys, weights.squeeze(1), out=keys)  # exact for 0/1 weights
        # With the background below every key, the percentiles sit at (background count + rank - 1). Plain
        # Python on the N counts: the selection takes its positions as Python ints anyway, and the same
        # arithmetic as tensor ops was 11 small ops per chunk (measured 3% slower).
        percents = (self.alpha, 100 - self.alpha)
        positions = [
            [min(num_pixels - 1 - count + _nearest_rank(count, q), num_pixels - 1) for q in percents]
            for count in tissue_count.tolist()
        ]
        extreme_keys = _order_statistics(keys, torch.tensor(positions, device=flat.device))
        quarter_turns = torch.where(leading[:, :1] > 0, math.pi / 2, -math.pi / 2).to(torch.float64)
        from_slopes = (quarter_turns + torch.atan(extreme_keys.to(torch.float64))).to(torch.float32)
        angles = torch.where(by_slope.unsqueeze(1), from_slopes, extreme_keys)  # [N, 2]: min, max
        # [N, 3, 2]: v_min, v_max
        vectors = plane @ torch.stack((torch.cos(angles), torch.sin(angles)), dim=1)
        # hematoxylin first: the vector with the larger red OD component (HEnorm's heuristic)
        min_first = (vectors[:, 0, 0] > vectors[:, 0, 1])[:, None, None]
        stain_matrix = torch.where(min_first, vectors, vectors.flip(-1))

        # least-squares concentrations (closed-form pseudo-inverse). Its rows lie in the stain plane, so it
        # sees only a pixel's projection: a 2x2 map of the plane coordinates instead of a pass over the OD.
        unmixing, full_rank = _pseudo_inverse_3x2(stain_matrix)
        to_concentrations = unmixing @ plane
        torch.bmm(to_concentrations, projection, out=concentrations)
        kth = _nearest_rank(num_pixels, 99) - 1
        max_concentrations = _order_statistics(
            concentrations.view(n * 2, num_pixels), torch.full((n * 2, 1), kth, device=flat.device)
        ).view(n, 2)

        valid = enough_tissue
        if (
            min_tissue_fraction > 0
        ):  # 0 = the release's own decisions; otherwise also refuse meaningless results
            well_posed = full_rank & (max_concentrations > 0).all(dim=-1)
            valid = valid & well_posed & (tissue_count >= min_tissue_fraction * num_pixels)
        return _StainDecomposition(stain_matrix, projection, to_concentrations, max_concentrations, valid)

    @staticmethod
    def _shifted_log_intensity(
        flat: torch.Tensor, weights: torch.Tensor, workspace: _Workspace, scratch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log(I + 1) - shift`` [N, 3, P] and the shift [N, 3, 1]: about the tissue mean of ``log(I + 1)``,
        from every ``_SHIFT_SAMPLE_STRIDE``-th pixel.

        Not ``torch.log1p``: on some CPUs (seen on AMD EPYC with torch 2.14) it runs 20x slower until the process
        happens to call ``torch.atan2``. uint8 images are looked up in a 256-entry table per image and channel,
        shift included; float images take ``log(I + 1)``.
        """
        sample = torch.log(flat[..., ::_SHIFT_SAMPLE_STRIDE].float() + 1)
        # all background pixels together weigh as much as one tissue pixel: a sample without tissue gets its mean
        sample_weights = weights[..., ::_SHIFT_SAMPLE_STRIDE] + 1 / sample.shape[-1]
        shift = (sample * sample_weights).sum(dim=-1, keepdim=True) / sample_weights.sum(dim=-1, keepdim=True)
        shifted = workspace.log_intensity
        if flat.dtype != torch.uint8:
            return shifted.copy_(flat).add_(1).log_().sub_(shift), shift
        n = flat.shape[0]
        tables = _LOG_INTENSITY_TABLE.to(flat.device) - shift  # [N, 3, 256]
        indices = scratch.view(torch.int32).copy_(flat)
        indices += torch.arange(0, n * 3 * 256, 256, dtype=torch.int32, device=flat.device).view(n, 3, 1)
        torch.index_select(tables.view(-1), 0, indices.view(-1), out=shifted.view(-1))
        return shifted, shift

    def _tissue_weights(self, flat: torch.Tensor, workspace: _Workspace) -> torch.Tensor:
        """[N, 1, P] float32: 1 on tissue, 0 on background. Tissue: every OD channel >= beta, i.e. the brightest
        channel's OD >= beta, exactly the release's float32 test."""
        brightest = torch.amax(flat, dim=1, out=workspace.brightest)
        weights = workspace.weights.squeeze(1)
        if flat.dtype == torch.uint8:
            torch.lt(brightest, _uint8_tissue_limit(self.io, self.beta), out=weights)
        else:
            torch.ge(-torch.log((brightest + 1) / self.io), self.beta, out=weights)
        return workspace.weights

    def _lowest_angle_key(self) -> float:
        """A bound below every tissue pixel's angle key: an angle (> -pi) or a slope -x/y, where |x| <= |OD| <=
        sqrt(3) log(io) and |y| >= beta (see ``_decompose``)."""
        if self.beta <= 0:
            return -math.pi
        return -(math.sqrt(3) * max(math.log(self.io), 1.0) / self.beta + math.pi)


def _group_by_shape(images: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault((image.dtype, image.device, *image.shape), []).append(index)
    return groups


def _validated_images(images: ImageBatch, name: str) -> list[torch.Tensor]:
    """Split ``images`` into a list of 3×H×W tensors, with a clear error for anything Macenko cannot take."""
    if isinstance(images, torch.Tensor):
        if images.dim() not in (3, 4):
            raise ValueError(
                f"`{name}` must be N×3×H×W or 3×H×W; got a tensor of shape {tuple(images.shape)}"
            )
        batch = list(images.unbind(0)) if images.dim() == 4 else [images]
        if not batch:
            raise ValueError(f"`{name}` is empty: pass at least one 3×H×W image")
        if (
            _check_image(images, f"`{name}`") is not None
        ):  # one check of the whole batch, then name the culprit
            for index, image in enumerate(batch):
                _raise_if_invalid(image, f"`{name}[{index}]`")
            _raise_if_invalid(images, f"`{name}`")
        return batch
    if not isinstance(images, Sequence) or isinstance(images, str):
        raise TypeError(f"`{name}` must be a tensor or a list of tensors, got {type(images).__name__}")
    if not images:
        raise ValueError(f"`{name}` is empty: pass at least one 3×H×W image")
    for index, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise ValueError(
                f"`{name}[{index}]` must be a 3×H×W tensor; got {type(image).__name__} "
                f"{tuple(getattr(image, 'shape', ()))} (use ExaonePathImageProcessor for PIL/numpy images)"
            )
        _raise_if_invalid(image, f"`{name}[{index}]`")
    return list(images)


def _check_image(image: torch.Tensor, where: str) -> str | None:
    """Why ``image`` (3×H×W or N×3×H×W) cannot be normalized, or None."""
    shape = tuple(image.shape)
    if shape[-3] != 3 or shape[-2] == 0 or shape[-1] == 0:
        return f"{where} must be RGB with channels first (3×H×W); got shape {shape}"
    if image.dtype != torch.uint8 and not image.is_floating_point():
        return f"{where} must be uint8 or float on the 0..255 scale; got dtype {image.dtype}"
    if image.is_floating_point():
        low, high = torch.aminmax(image)
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            return f"{where} contains NaN or infinite values; clean or drop it before normalizing"
        if low < 0 or high > 255:
            return f"{where} must be on the 0..255 scale; got values in [{float(low):.4g}, {float(high):.4g}]"
    return None


def _raise_if_invalid(image: torch.Tensor, where: str) -> None:
    problem = _check_image(image, where)
    if problem is not None:
        raise TypeError(problem) if "dtype" in problem else ValueError(problem)
