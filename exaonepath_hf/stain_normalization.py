"""Batched Macenko stain normalization in torch, exact to the EXAONEPath release and fast.

EXAONEPath Macenko-normalizes every patch with torchstain's torch algorithm (a port of HEnorm_python, Macenko et
al., ISBI 2009). This module reproduces that algorithm image by image, but runs a whole chunk of equally sized
images through each step at once:

1. tissue pixels = every OD channel ``>= beta`` (for uint8, exactly the release's float32 test, as a threshold
   on the brightest channel);
2. the covariance of the tissue OD, ``OD = log(io) - log(I + 1)``, from products of float32 values near zero
   (``log(I + 1)`` minus a sampled tissue mean; a 256-entry table per image for uint8) accumulated in float64,
   and its two leading eigenvectors (batched ``eigh``);
3. every pixel's OD projected on that plane; the nearest-rank ``alpha`` and ``100 - alpha`` percentiles of the
   tissue angles (selected on the tensor's memory, background left out as NaN; ranked by the slope ``-x/y`` where
   that orders them like the angle) give the stain vectors, hematoxylin first;
4. the least-squares concentrations of all pixels (pseudo-inverse of the 3x2 stain matrix, applied to the plane
   projection) and their nearest-rank 99th percentiles;
5. ``io * exp(-reference_stains @ scaled concentrations)``, capped at 255, returned as float 0..1, as one
   ``exp2`` of one batched product per image.

The module has two layers:

- the algorithm: :func:`decompose_stains` (steps 1-4) and :func:`normalize_chunk` (all steps, into ``out=``) on
  one chunk of equally sized images. They are stateless: the caller may pass the output tensor and a
  :class:`~.stain_engine.Buffers` to take the scratch memory from; nothing is kept between calls otherwise;
- :class:`MacenkoNormalizer`, the public API: validation, grouping by size and fitting; it owns a
  :class:`~.stain_engine.ChunkEngine` that shares the chunks out to worker threads and keeps their scratch
  memory for the instance's later calls.

Images that cannot be normalized come back unchanged (as float 0..1) and are flagged in
:attr:`MacenkoOutput.normalized`; they never produce NaN and never fail the rest of the batch. See
:class:`MacenkoNormalizer` for the exact fallback rule, :data:`DEFAULT_MIN_TISSUE_FRACTION` and
:data:`DEFAULT_MAX_STAIN_ANGLE` for why the rules beyond the release's exist. The second one leaves images that are
not H&E (IHC, pen ink, dark fluorescence-like images, noise) as they are instead of recolouring them like H&E.

This file is shipped with saved processors (``trust_remote_code``): it imports only numpy, torch and its sibling
``stain_engine.py``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .stain_engine import Buffers, ChunkEngine

__all__ = [
    "DEFAULT_MAX_STAIN_ANGLE",
    "DEFAULT_MIN_TISSUE_FRACTION",
    "DEFAULT_STAIN_REFERENCE",
    "MacenkoNormalizer",
    "MacenkoOutput",
    "StainDecomposition",
    "StainReference",
    "decompose_stains",
    "normalize_chunk",
]

#: Minimum fraction of tissue pixels (every OD channel >= beta) for an image to be normalized. The release
#: normalizes any image with at least 2 tissue pixels, but its max concentrations are 99th percentiles over *all*
#: pixels: below 1% tissue they fall on the glass, come out near zero or negative, and the "normalized" image is
#: meaningless (a tumour patch cut down to just under 1% tissue gets a negative hematoxylin maximum; background
#: crops with a fraction of a percent of tissue come out dark). On the test data, histolab's background crops
#: (almost-white, no-tissue, pen on glass) stay at about 2% tissue per 224x224 crop and mostly far below, while
#: tissue crops (including sparse adipose tissue) have more. Set ``min_tissue_fraction=0`` for the release's
#: decisions everywhere.
DEFAULT_MIN_TISSUE_FRACTION = 0.01

#: Largest stain angle, in degrees, of an image that is normalized (see :attr:`StainDecomposition.stain_angle`):
#: how far the mean optical density of its tissue lies above the plane of the standard H&E stain vectors
#: (:data:`DEFAULT_STAIN_REFERENCE`), on the side of the neutral (grey) axis. Every mixture of hematoxylin and eosin
#: lies in that plane, and lab-to-lab stain variation spreads real H&E tissue to both sides of it; brown DAB (IHC),
#: black ink, dark fluorescence-like images, noise and anything grey lie well above it, at or beyond the neutral
#: axis (itself 12.8 degrees above the plane). The threshold lies between the two groups with a margin to each, as
#: measured on the shared H&E data and on constructed non-H&E images (``tests/test_stain_normalization.py``
#: asserts both sides). Colours inside the plane cannot be told apart from H&E this way: blue ink lies beyond
#: hematoxylin, red ink near eosin. The fitted stain vectors are not what is compared: Macenko's extreme-percentile
#: vectors of real H&E tiles (debris, faint eosin, marking dye) stray further from the reference than those of an
#: IHC image. Set ``max_stain_angle=None`` to normalize every image with tissue, as the release does.
DEFAULT_MAX_STAIN_ANGLE = 10.0

ImageBatch = torch.Tensor | Sequence[torch.Tensor]

_LOG2_E = math.log2(math.e)
# the shift of the covariance pass is a tissue mean over every this-many-th pixel
_SHIFT_SAMPLE_STRIDE = 32
# log(I + 1) of every uint8 intensity I (read only)
_LOG_INTENSITY_TABLE = torch.log(torch.arange(256, dtype=torch.float64) + 1).to(torch.float32)
# float32 matrix products over this many pixels at most, accumulated in float64
_PRODUCT_BLOCK = 1 << 16
# order statistics of rows with at least this many values are bracketed by those of every this-many-th value first
_SELECT_MIN_BRACKETED, _SELECT_SAMPLE_STRIDE = 1 << 12, 32
# the release's parameters (torchstain's defaults)
_IO, _ALPHA, _BETA = 240.0, 1.0, 0.15


# Per-pixel memory of a chunk on a GPU: uint8 input, float32 output, the decomposition's float32 scratch (log
# intensities, projection, weights) and the selection's sort temporaries, rounded up.
_DEVICE_BYTES_PER_PIXEL = 64
# Beyond a few thousand 224x224 images per chunk the launch costs are amortized; a larger chunk only takes memory
# the model needs.
_DEVICE_CHUNK_BYTES = 4 << 30


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
class StainDecomposition:
    """Per-image Macenko decomposition of a chunk of N images with P pixels each (see :func:`decompose_stains`)."""

    stain_matrix: torch.Tensor  # [N, 3, 2], hematoxylin first
    projection: torch.Tensor  # [N, 2, P]: every pixel's OD in the stain plane, as (-x, y)
    to_concentrations: torch.Tensor  # [N, 2, 2]: plane coordinates -> least-squares concentrations
    max_concentrations: torch.Tensor  # [N, 2], nearest-rank 99th percentile
    valid: torch.Tensor  # [N] bool: enough tissue and a well-posed decomposition
    mean_density: torch.Tensor  # [N, 3]: the mean optical density of the tissue pixels (R, G, B)

    @property
    def stain_angle(self) -> torch.Tensor:
        """[N] degrees: how far the tissue's mean optical density lies above the plane of the standard H&E stain
        vectors, towards the neutral (grey) axis; negative below it. See :data:`DEFAULT_MAX_STAIN_ANGLE`."""
        normal = _h_and_e_plane_normal(self.mean_density.device)
        density = self.mean_density.to(torch.float32)
        # an all-zero density (no tissue: such images are flagged anyway) gives 0, not 0 / 0
        length = torch.linalg.vector_norm(density, dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.rad2deg(torch.asin((density @ normal / length).clamp(-1, 1)))


# ------------------------------------------------------------------------------------------------- the algorithm
def normalize_chunk(
    images: torch.Tensor,
    reference: StainReference | None = None,
    *,
    io: float = _IO,
    alpha: float = _ALPHA,
    beta: float = _BETA,
    min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
    max_stain_angle: float | None = DEFAULT_MAX_STAIN_ANGLE,
    out: torch.Tensor | None = None,
    workspace: Buffers | None = None,
) -> MacenkoOutput:
    """Macenko-normalize a chunk of equally sized images [N, 3, H, W] into ``out``; the release's rule per image.

    Args:
        images: uint8, or float on the 0..255 scale, on any device; not validated beyond shape and dtype (NaN in,
            NaN out): :class:`MacenkoNormalizer` checks its inputs first.
        reference: the stain appearance to map to; :data:`DEFAULT_STAIN_REFERENCE` when None.
        io, alpha, beta, min_tissue_fraction, max_stain_angle: as in :class:`MacenkoNormalizer`.
        out: float32 [N, 3, H, W], contiguous, on the images' device, not overlapping them: written and returned
            as ``images`` of the result (it serves as scratch before). A new tensor when None.
        workspace: where the per-pixel scratch memory comes from: a :class:`~.stain_engine.Buffers` kept by the
            caller between calls saves the page faults of fresh memory; None takes fresh memory.

    Returns:
        ``MacenkoOutput(images=out, normalized=valid [N])``; an image that cannot be normalized is written to
        ``out`` unchanged, as float 0..1.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_chunk needs N×3×H×W images; got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float on the 0..255 scale; got dtype {images.dtype}")
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    elif (
        out.shape != images.shape
        or out.dtype != torch.float32
        or out.device != images.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous float32 tensor of shape {tuple(images.shape)} on {images.device}; got "
            f"{tuple(out.shape)} {out.dtype} on {out.device} (contiguous: {out.is_contiguous()})"
        )
    reference = DEFAULT_STAIN_REFERENCE if reference is None else reference
    flat_out = out.view(images.shape[0], 3, -1)
    # `out` is free until the very end: it serves as the decomposition's scratch
    decomposition = decompose_stains(
        images,
        io=io,
        alpha=alpha,
        beta=beta,
        min_tissue_fraction=min_tissue_fraction,
        workspace=workspace,
        scratch=flat_out,
    )
    reference_matrix, reference_max, log2_scale = _mapping_constants(reference, io, images.device)
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
    if max_stain_angle is not None:  # not H&E: left as it is rather than recoloured like H&E
        valid &= decomposition.stain_angle <= max_stain_angle
    if not bool(valid.all()):
        out[~valid] = images[~valid].float() / 255.0
    return MacenkoOutput(images=out, normalized=valid)


@functools.lru_cache(maxsize=16)
def _h_and_e_plane_normal(device: torch.device) -> torch.Tensor:
    """Unit normal [3] of the plane of the standard H&E stain vectors, on the neutral axis' side, on ``device``.
    Read only."""
    hematoxylin, eosin = np.array(DEFAULT_STAIN_REFERENCE.stain_matrix, dtype=np.float64).T
    normal = np.cross(hematoxylin, eosin)
    normal *= np.sign(normal.sum()) / np.linalg.norm(normal)
    with torch.inference_mode(False):
        return torch.tensor(normal, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=16)
def _mapping_constants(
    reference: StainReference, io: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's stain matrix and maxima and ``log2(io / 255)`` [1, 1, 1] on ``device``, made once: a
    tensor made from Python numbers per chunk costs more than the arithmetic of a small chunk. Read only."""
    with torch.inference_mode(False):
        return (*reference.tensors(device), torch.full((1, 1, 1), math.log2(io / 255.0), device=device))


def decompose_stains(
    images: torch.Tensor,
    *,
    io: float = _IO,
    alpha: float = _ALPHA,
    beta: float = _BETA,
    min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
    workspace: Buffers | None = None,
    scratch: torch.Tensor | None = None,
) -> StainDecomposition:
    """Stain matrix, plane projection, concentration map and 99th percentiles of every image of a chunk at once.

    ``images`` [N, 3, H, W] or [N, 3, P], uint8 or float on the 0..255 scale; ``scratch`` a float32 [N, 3, P]
    buffer that is overwritten (from ``workspace`` when None). The projection of the result is a buffer of
    ``workspace``: valid until the workspace's next use. ``min_tissue_fraction=0`` gives the release's decisions.
    """
    n = images.shape[0]
    flat = images.reshape(n, 3, -1)
    num_pixels, device = flat.shape[-1], flat.device
    if scratch is None:
        scratch = _empty(workspace, "scratch", (n, 3, num_pixels), torch.float32, device)
    weights = _tissue_weights(flat, io, beta, workspace)
    tissue_count = weights.sum(dim=-1).squeeze(-1).round().to(torch.int64)  # exact below 2^24 pixels
    enough_tissue = tissue_count >= 2

    shifted, shift = _shifted_log_intensity(flat, weights, workspace, scratch)
    plane, shifted_mean = _leading_plane(shifted, weights, tissue_count, scratch)
    mean_density = (math.log(io) - (shift.double() + shifted_mean)).squeeze(-1).to(torch.float32)
    # the plane coordinates are taken as (-x, y): their ratio is then the angle key of `_stain_vectors` without
    # a negation pass, and `to_concentrations` below takes the sign back (negation is exact: same results)
    signed_plane = torch.cat((-plane[..., :1], plane[..., 1:]), dim=-1)
    plane_t = signed_plane.transpose(-1, -2)
    # every pixel's OD in the plane: plane^T (log(io) - shift) - plane^T shifted
    projection = _empty(workspace, "projection", (n, 2, num_pixels), torch.float32, device)
    torch.baddbmm(plane_t @ (math.log(io) - shift), plane_t, shifted, alpha=-1, out=projection)
    # the log intensities are done with once projected: their buffer holds the angle keys, then concentrations
    keys, concentrations = shifted.view(-1).split((n * num_pixels, n * 2 * num_pixels))
    stain_matrix = _stain_vectors(
        projection, plane, weights, tissue_count, keys.view(n, num_pixels), (alpha, beta)
    )

    # least-squares concentrations (closed-form pseudo-inverse). Its rows lie in the stain plane, so it
    # sees only a pixel's projection: a 2x2 map of the plane coordinates instead of a pass over the OD.
    unmixing, full_rank = _pseudo_inverse_3x2(stain_matrix)
    to_concentrations = unmixing @ signed_plane
    concentrations = torch.bmm(to_concentrations, projection, out=concentrations.view(n, 2, num_pixels))
    kth = _nearest_rank(num_pixels, 99) - 1
    max_concentrations = _order_statistics(
        concentrations.view(n * 2, num_pixels), torch.full((n * 2, 1), kth, device=device)
    ).view(n, 2)

    valid = enough_tissue
    if min_tissue_fraction > 0:  # 0 = the release's own decisions; otherwise also refuse meaningless results
        well_posed = full_rank & (max_concentrations > 0).all(dim=-1)
        valid = valid & well_posed & (tissue_count >= min_tissue_fraction * num_pixels)
    return StainDecomposition(
        stain_matrix, projection, to_concentrations, max_concentrations, valid, mean_density
    )


def _empty(workspace: Buffers | None, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.empty(name, shape, dtype, device)


def _tissue_weights(flat: torch.Tensor, io: float, beta: float, workspace: Buffers | None) -> torch.Tensor:
    """[N, 1, P] float32: 1 on tissue, 0 on background. Tissue: every OD channel >= beta, i.e. the brightest
    channel's OD >= beta, exactly the release's float32 test."""
    n, _, num_pixels = flat.shape
    brightest = _empty(workspace, "brightest", (n, num_pixels), flat.dtype, flat.device)
    torch.amax(flat, dim=1, out=brightest)
    weights = _empty(workspace, "weights", (n, 1, num_pixels), torch.float32, flat.device)
    if flat.dtype == torch.uint8:
        torch.lt(brightest, _uint8_tissue_limit(io, beta), out=weights.squeeze(1))
    else:
        torch.ge(-torch.log((brightest + 1) / io), beta, out=weights.squeeze(1))
    return weights


def _shifted_log_intensity(
    flat: torch.Tensor, weights: torch.Tensor, workspace: Buffers | None, scratch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log(I + 1) - shift`` [N, 3, P] and the shift [N, 3, 1]: about the tissue mean of ``log(I + 1)``,
    from every ``_SHIFT_SAMPLE_STRIDE``-th pixel, so that the float32 products of the covariance lose no
    precision to cancellation.

    Not ``torch.log1p``: on some CPUs (seen on AMD EPYC with torch 2.14) it runs many times slower until the
    process happens to call ``torch.atan2``. uint8 images are looked up in a 256-entry table per image and
    channel, shift included; float images take ``log(I + 1)``.
    """
    sample = torch.log(flat[..., ::_SHIFT_SAMPLE_STRIDE].float() + 1)
    # all background pixels together weigh as much as one tissue pixel: a sample without tissue gets its mean
    sample_weights = weights[..., ::_SHIFT_SAMPLE_STRIDE] + 1 / sample.shape[-1]
    shift = (sample * sample_weights).sum(dim=-1, keepdim=True) / sample_weights.sum(dim=-1, keepdim=True)
    n = flat.shape[0]
    shifted = _empty(workspace, "log_intensity", flat.shape, torch.float32, flat.device)
    if flat.dtype != torch.uint8:
        return shifted.copy_(flat).add_(1).log_().sub_(shift), shift
    tables = _LOG_INTENSITY_TABLE.to(flat.device) - shift  # [N, 3, 256]
    indices = scratch.view(torch.int32).copy_(flat)
    indices += torch.arange(0, n * 3 * 256, 256, dtype=torch.int32, device=flat.device).view(n, 3, 1)
    torch.index_select(tables.view(-1), 0, indices.view(-1), out=shifted.view(-1))
    return shifted, shift


def _leading_plane(
    shifted: torch.Tensor, weights: torch.Tensor, tissue_count: torch.Tensor, scratch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two leading eigenvectors [N, 3, 2] (the largest last) of the covariance of the tissue OD: that of
    ``log(I + 1)``, taken about the shift of ``shifted``; and the tissue mean of ``shifted`` [N, 3, 1] (float64;
    finite but meaningless for images with fewer than 2 tissue pixels, which are flagged)."""
    n = shifted.shape[0]
    weighted = torch.mul(shifted, weights, out=scratch)
    # the sum is pairwise; a matrix product would accumulate it in order, losing precision on large images
    offset = weighted.sum(dim=-1, keepdim=True).double()  # tissue count * (mean - shift)
    count = tissue_count.to(torch.float64).clamp(min=2)[:, None, None]
    products = _blocked_products(weighted, shifted)
    covariance = (products - offset @ offset.transpose(1, 2) / count) / (count - 1)
    # images with < 2 tissue pixels get the identity so that the batched eigh never sees NaN; they are flagged
    identity = torch.eye(3, dtype=covariance.dtype, device=shifted.device).expand(n, 3, 3)
    covariance = torch.where((tissue_count >= 2)[:, None, None], covariance, identity)
    return torch.linalg.eigh(covariance).eigenvectors[..., 1:].to(torch.float32), offset / count


def _stain_vectors(
    projection: torch.Tensor,
    plane: torch.Tensor,
    weights: torch.Tensor,
    tissue_count: torch.Tensor,
    keys: torch.Tensor,
    parameters: tuple[float, float],
) -> torch.Tensor:
    """The stain matrix [N, 3, 2], hematoxylin first, from the alpha / 100-alpha nearest-rank percentiles of the
    tissue angles atan2(y, x), x and y a pixel's coordinates along the second and the largest eigenvector, given
    as ``projection`` [N, 2, P] = (-x, y). ``keys`` [N, P] is scratch; ``parameters`` are (alpha, beta).

    Where y has one sign over the tissue, the angle is sign(y) pi/2 + atan(-x/y): -x/y orders the pixels as their
    angles do at the cost of a division instead of a much slower atan2. That holds whenever the leading
    eigenvector's components share a sign (usual for H&E): tissue OD is >= beta > 0 in every channel.
    """
    alpha, beta = parameters
    leading = plane[..., 1]
    one_signed = (leading > 0).all(dim=-1) | (leading < 0).all(dim=-1)
    by_slope = one_signed & (beta > 0)
    if bool(by_slope.any()):
        torch.div(projection[:, 0], projection[:, 1], out=keys)
    if not bool(by_slope.all()):
        by_angle = (~by_slope).nonzero().squeeze(1)
        keys[by_angle] = torch.atan2(projection[by_angle, 1], -projection[by_angle, 0])
    # background keys become NaN, which sorts after every tissue key: key * 0 / 0 (also for what a division by 0
    # gave there); tissue keys stay exact (key * 1 / 1). Two arithmetic passes cost less than a masked fill.
    weights = weights.squeeze(1)
    keys.mul_(weights).div_(weights)
    # Plain Python on the N counts: the selection takes its positions as Python ints anyway, and the same
    # arithmetic as tensor ops is many small ops per chunk, which costs more.
    counts = tissue_count.tolist()
    positions = [[_nearest_rank(count, q) - 1 for q in (alpha, 100 - alpha)] for count in counts]
    # an image without tissue gets 0 (it is flagged), not NaN: NaN would fail the SVD of its stain matrix
    wanted = torch.tensor(positions, device=keys.device)
    extreme_keys = _order_statistics(keys, wanted, counts).nan_to_num_(0.0)
    quarter_turns = torch.where(leading[:, :1] > 0, math.pi / 2, -math.pi / 2).to(torch.float64)
    from_slopes = (quarter_turns + torch.atan(extreme_keys.to(torch.float64))).to(torch.float32)
    angles = torch.where(by_slope.unsqueeze(1), from_slopes, extreme_keys)  # [N, 2]: min, max
    # [N, 3, 2]: v_min, v_max
    vectors = plane @ torch.stack((torch.cos(angles), torch.sin(angles)), dim=1)
    # hematoxylin first: the vector with the larger red OD component (HEnorm's heuristic)
    min_first = (vectors[:, 0, 0] > vectors[:, 0, 1])[:, None, None]
    return torch.where(min_first, vectors, vectors.flip(-1))


def _blocked_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` [N, R, R] in float64 for [N, R, P] float32 inputs: float32 products over blocks of pixels, summed
    in float64. BLAS accumulates a long product in few running sums, which over a large target image is off
    enough to turn its stain plane when the two smaller eigenvalues are close."""
    products = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[-1], _PRODUCT_BLOCK):
        block = slice(start, start + _PRODUCT_BLOCK)
        products += torch.bmm(a[..., block], b[..., block].transpose(1, 2))
    return products


def _nearest_rank(count: int, percent: float) -> int:
    """1-based rank of the ``percent`` percentile among ``count`` values, torchstain's rule:
    ``1 + round(0.01 * q * (n - 1))``, rounding half to even in float64."""
    return 1 + round((0.01 * percent) * (count - 1))


def _order_statistics(
    rows: torch.Tensor, positions: torch.Tensor, counts: Sequence[int] | None = None
) -> torch.Tensor:
    """The values at 0-based ``positions`` [R, m] of each row of ``rows`` [R, P] sorted ascending, NaN last; exact.

    ``counts``: how many values of each row are not NaN, when not all of them (NaN marks values to leave out).
    ``rows`` is scratch: it may be reordered in place. On CPU each value is selected by :func:`_select` in
    numpy, on the tensor's own memory: O(P) on the values alone, where ``torch.topk``/``kthvalue`` select
    (value, index) pairs, several times slower. Elsewhere torch's own ops.
    """
    if rows.device.type != "cpu":
        return _order_statistics_by_torch(rows, positions)
    array, kths = rows.numpy(), positions.tolist()
    counts = [array.shape[1]] * len(kths) if counts is None else counts
    selected = [
        [_select(row, kth, count) for kth in row_kths]
        for row, row_kths, count in zip(array, kths, counts, strict=True)
    ]
    return torch.from_numpy(np.array(selected, dtype=array.dtype).reshape(positions.shape))


def _select(row: np.ndarray, kth: int, count: int):
    """The ``kth`` smallest value (0-based) of the 1-D numpy array ``row``, of which ``count`` values are not NaN
    (NaN sorts last), exactly; ``row`` may be reordered in place.

    A row of many values is narrowed first: the ranks of every ``_SELECT_SAMPLE_STRIDE``-th value bracket ``kth``
    within a few standard deviations, and only the values inside the bracket, after a count of those below it,
    are sorted. Comparing and gathering are cheap vector passes, and numpy sorts a small array fast on every
    dispatch path, where its selection (``partition``) costs several times more per value on some CPUs (numpy's
    AVX-512 dispatch on AMD Zen 4, whose compressing stores to memory are slow). Should the bracket miss, which
    the counts tell exactly, the whole row is partitioned.
    """
    size = row.shape[0]
    if not 0 <= kth < count:  # no such value (an image without tissue)
        return row.dtype.type(math.nan)
    if count < _SELECT_MIN_BRACKETED:
        values = row[~np.isnan(row)] if count < size else row  # then a partition does not move the NaN too
        values.partition(kth)
        return values[kth]
    sample = row[::_SELECT_SAMPLE_STRIDE].copy()
    if count < size:
        sample = sample[~np.isnan(sample)]
    sampled = sample.shape[0]
    expected = kth * sampled / count
    margin = 4 * math.sqrt(expected * max(sampled - expected, 0) / max(sampled, 1)) + 8
    # a bound only where the bracket would not reach the first or last eighth: one comparison pass fewer
    low_rank = math.floor(expected - margin) if kth >= count // 8 else 0
    high_rank = math.ceil(expected + margin) if count - kth > count // 8 else sampled - 1
    bounded = [rank for rank in (low_rank, high_rank) if 0 < rank < sampled - 1]
    if not bounded:
        row.partition(kth)
        return row[kth]
    sample.partition(bounded)
    low = sample[low_rank] if 0 < low_rank else None
    high = sample[high_rank] if high_rank < sampled - 1 else None
    # comparisons with NaN are false: the NaN are never inside, nor counted below
    if low is None:
        below, inside = 0, row[row <= high]
    elif high is None:
        inside = row[row >= low]
        below = count - inside.shape[0]
    else:
        below, inside = np.count_nonzero(row < low), row[(row >= low) & (row <= high)]
    rank = kth - below
    if not 0 <= rank < inside.shape[0]:
        row.partition(kth)
        return row[kth]
    inside.sort()
    return inside[rank]


def _order_statistics_by_torch(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``_order_statistics`` with torch ops, for GPUs: a selection where every row wants one and the same
    position (the concentration percentiles), otherwise a segmented sort, which GPUs do fast."""
    if positions.shape[1] == 1 and bool((positions == positions[0]).all()):
        return rows.kthvalue(int(positions[0, 0]) + 1, dim=-1, keepdim=True).values
    return rows.sort(dim=-1).values.gather(1, positions)


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
def _uint8_tissue_limit(io: float, beta: float) -> int:
    """OD >= beta <=> I < this, for uint8 intensities I, with the 256 ODs computed the release's way (float32)."""
    table = -torch.log((torch.arange(256, dtype=torch.float32) + 1) / io)
    return int((table >= beta).sum())


# ------------------------------------------------------------------------------------------------ the public API
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
            per-pixel intermediates; a single larger image is processed whole). By default (None) the pixels of
            eight 224x224 images with one worker thread, and of twenty-four with several: one worker is fastest
            on chunks whose per-pixel buffers stay in cache, while several spend more on handing the GIL to each
            other at every one of a chunk's small tensor operations, which fewer, larger chunks save. On CPU the
            chunks are also made small enough that every worker thread gets one. On a GPU a chunk's cost is its
            fixed number of kernel launches, so by default chunks are as large as a memory budget allows (a
            quarter of the free memory, at most 4 GiB of intermediates).
        max_stain_angle: images whose tissue is not H&E-coloured, i.e. whose stain angle (degrees; see
            :attr:`StainDecomposition.stain_angle`) is above this, are returned unchanged; see
            :data:`DEFAULT_MAX_STAIN_ANGLE`. None switches the check off.

    Memory: fresh memory costs a page fault per page on first touch, about as much as the arithmetic on it, so
    the normalizer keeps, for its later calls, the per-pixel scratch buffers of its worker threads (about 1.5 MB
    per 224x224 image of a chunk and thread) and, on CPU, the memory of outputs once the caller has freed every
    tensor (and view) using it; at most ``ChunkEngine.max_cached_bytes`` (256 MB) in all. Outputs are tensors the
    caller owns: never written again while any of it is alive (CPU outputs are not resizable in place). What is
    kept belongs to this instance and goes with it; :meth:`cached_bytes` tells how much and :meth:`empty_cache`
    frees it. One normalizer may be used from several threads at once (each call takes its own buffers), and
    pickled or copied (without its buffers).

    An image comes back unchanged (float 0..1) with ``normalized=False`` when:

    - it has fewer than 2 tissue pixels (the release raises and returns the input), or its per-image
      coefficients are not finite (the release's output has NaN and it returns the input): the release's rule;
    - with ``min_tissue_fraction > 0`` (default :data:`DEFAULT_MIN_TISSUE_FRACTION`), also when its tissue
      fraction is below the threshold or its decomposition is degenerate: a rank-deficient stain matrix (both
      stain vectors equal, e.g. a single-coloured image) or a non-positive 99th-percentile concentration. The
      release returns meaningless images for those;
    - with ``max_stain_angle`` set (default :data:`DEFAULT_MAX_STAIN_ANGLE`), also when its tissue is not
      H&E-coloured: brown DAB (IHC), black or green ink, dark fluorescence-like images, noise. The release
      recolours those to look like H&E. The check costs a few arithmetic operations per image; it compares the
      tissue's mean optical density with the standard H&E stain plane whatever ``reference`` is, so switch it off
      to normalize other stains (e.g. with a reference fitted to an IHC target).

    ``min_tissue_fraction=0, max_stain_angle=None`` therefore reproduces the release's decisions exactly, and its
    outputs to float32 rounding (except where the tissue covariance is rank-deficient, e.g. 2 tissue pixels: the
    stain plane is then arbitrary in both implementations).
    """

    def __init__(
        self,
        reference: StainReference = DEFAULT_STAIN_REFERENCE,
        io: float = _IO,
        alpha: float = _ALPHA,
        beta: float = _BETA,
        min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
        max_batch_pixels: int | None = None,
        max_stain_angle: float | None = DEFAULT_MAX_STAIN_ANGLE,
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
        self.max_batch_pixels = None if max_batch_pixels is None else int(max_batch_pixels)
        self.max_stain_angle = _validated_max_stain_angle(max_stain_angle)
        self._engine = ChunkEngine()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(reference={self.reference}, io={self.io}, alpha={self.alpha}, "
            f"beta={self.beta}, min_tissue_fraction={self.min_tissue_fraction}, "
            f"max_stain_angle={self.max_stain_angle})"
        )

    def fit(self, images: ImageBatch) -> StainReference:
        """Fit the reference to one or more target images, set it on this normalizer and return it.

        Several targets are pooled: their pixels are treated as one image, which for a single target equals the
        release's (torchstain's) ``fit``.
        """
        batch = _validated_images(images, "images")
        pooled = torch.cat([image.reshape(3, -1) for image in batch], dim=1).unsqueeze(0)
        decomposition = decompose_stains(
            pooled, io=self.io, alpha=self.alpha, beta=self.beta, min_tissue_fraction=0.0
        )
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
        groups = list(_group_by_shape(batch).values())
        # a list comes back as a list: chunk-sized outputs, which the allocator recycles once freed
        results = self._normalize_groups([[batch[i] for i in indices] for indices in groups], then, True)
        for indices, (outputs, valid) in zip(groups, results, strict=True):
            if isinstance(outputs, list):
                outputs = [image for chunk in outputs for image in chunk.unbind(0)]
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

    def normalize_stacks(
        self, groups: Sequence[ImageBatch], then: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> list[MacenkoOutput]:
        """:meth:`normalize_stack` on several groups (each of one size, dtype and device) in one call: the chunks
        of all groups share the worker threads, which keeps them busy on mixed-size inputs made of a few images
        per size."""
        batches = []
        for group in groups:
            batch = _validated_images(group, "images")
            if len(_group_by_shape(batch)) > 1:
                raise ValueError("normalize_stacks needs every group of one shape, dtype and device")
            batches.append(group if isinstance(group, torch.Tensor) and group.dim() == 4 else batch)
        results = self._normalize_groups(batches, then)
        return [MacenkoOutput(images=outputs, normalized=flags) for outputs, flags in results]

    def cached_bytes(self) -> int:
        """Bytes of scratch memory this normalizer keeps for its later calls."""
        return self._engine.cached_bytes()

    def empty_cache(self) -> None:
        """Free the scratch memory this normalizer keeps for its later calls."""
        self._engine.empty_cache()

    def _normalize_equal_sized(
        self,
        images: torch.Tensor | list[torch.Tensor],
        then: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """Normalize [N, 3, H, W] (or N equally sized 3×H×W images); see :meth:`_normalize_groups`."""
        return self._normalize_groups([images], then)[0]

    def _normalize_groups(
        self,
        groups: list[torch.Tensor | list[torch.Tensor]],
        then: Callable[[torch.Tensor], torch.Tensor] | None,
        output_per_chunk: bool = False,
    ) -> list[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]]:
        """Normalize groups of equally sized images with the engine, each in chunks of at most
        ``max_batch_pixels``, the groups of one device together; see :meth:`ChunkEngine.run_many`."""
        # the settings of this call, read once: a concurrent fit() must not change them between chunks
        chunk_function = functools.partial(
            _normalized_flags,
            reference=self.reference,
            io=self.io,
            alpha=self.alpha,
            beta=self.beta,
            min_tissue_fraction=self.min_tissue_fraction,
            max_stain_angle=self.max_stain_angle,
        )
        by_device: dict[torch.device, list[int]] = {}
        for index, images in enumerate(groups):
            by_device.setdefault(images[0].device, []).append(index)
        results: list = [None] * len(groups)
        for device, indices in by_device.items():
            workers = torch.get_num_threads() if device.type == "cpu" else 1
            chunk_pixels = self.max_batch_pixels
            if chunk_pixels is None:
                chunk_pixels = _default_chunk_pixels(device, workers)
            # at most an even share of the device's images per chunk, so that every worker gets work
            share = -(-sum(len(groups[index]) for index in indices) // workers)
            jobs = []
            for index in indices:
                height, width = groups[index][0].shape[-2:]
                per_chunk = min(len(groups[index]), max(1, chunk_pixels // (height * width)), share)
                jobs.append((groups[index], per_chunk))
            for index, result in zip(
                indices, self._engine.run_many(jobs, chunk_function, then, output_per_chunk), strict=True
            ):
                results[index] = result
        return results


def _validated_max_stain_angle(value: float | None) -> float | None:
    """``max_stain_angle`` as a float (or None), with a clear error for anything else."""
    # False would read as a threshold of 0 degrees, which refuses much of real H&E
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if value is not None and not (is_number and 0 <= value <= 90):
        raise ValueError(
            f"max_stain_angle must be an angle in [0, 90] degrees, or None to switch the check off; got {value!r}"
        )
    return None if value is None else float(value)


def _default_chunk_pixels(device: torch.device, workers: int) -> int:
    """Pixels per chunk when ``max_batch_pixels`` is None.

    On CPU a cache-sized chunk (see :class:`MacenkoNormalizer`). Elsewhere the cost of a chunk is dominated by its
    fixed number of kernel launches and host synchronisations, so chunks are as large as a memory budget allows:
    a quarter of the device's free memory (CUDA), at most ``_DEVICE_CHUNK_BYTES``, at
    ``_DEVICE_BYTES_PER_PIXEL`` bytes of inputs, outputs and intermediates per pixel.
    """
    if device.type == "cpu":
        return (8 if workers == 1 else 24) * 224 * 224
    budget = _DEVICE_CHUNK_BYTES
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 4)
    return max(budget // _DEVICE_BYTES_PER_PIXEL, 224 * 224)


def _normalized_flags(
    images: torch.Tensor, out: torch.Tensor, workspace: Buffers, **settings
) -> torch.Tensor:
    return normalize_chunk(images, out=out, workspace=workspace, **settings).normalized


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
        # one check of the whole batch; only when it fails, the images one by one to name the culprit
        if _check_image(images, f"`{name}`") is not None:
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
