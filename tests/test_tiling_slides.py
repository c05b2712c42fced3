"""Tiling real slides: CMU-1-Small-Region.svs (Aperio, 0.499 µm/px) and a DICOM WSI; streaming the shards
across ranks and workers; failures, resume after a kill, parallel workers."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import exaonepath_hf
from exaonepath_hf.tiling import (
    PATCH_COLUMNS,
    SlideFailure,
    SlideRecord,
    TilingConfig,
    load_patch_dataset,
    open_slide,
    resolve_shards,
    tile_slide,
    tile_slides,
)
from exaonepath_hf.tiling.cli import main as tile_main

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CMU_NAME = "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def cmu_slide(request) -> Path:
    """The CC0 sample slide bundled with the package, else the shared data copy."""
    bundled = Path(exaonepath_hf.__file__).parent / "data" / CMU_NAME
    if bundled.is_file():
        return bundled
    path = request.getfixturevalue("shared_data") / "wsi" / CMU_NAME
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def cmu_tiled(cmu_slide, tmp_path_factory) -> tuple[Path, SlideRecord]:
    out = tmp_path_factory.mktemp("cmu")
    return out, tile_slide(cmu_slide, out)


def _slide_copies(source: Path, folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for name in names:
        copy = folder / f"{name}.svs"
        os.symlink(source, copy)
        copies.append(copy)
    return copies


def _rows(files) -> list[tuple[str, int, int]]:
    return [
        (r["slide_id"], r["x"], r["y"])
        for f in files
        for r in pq.read_table(f, columns=["slide_id", "x", "y"]).to_pylist()
    ]


def _own_tissue_fraction(rgb: np.ndarray) -> float:
    """Independent of the tiler: a pixel is tissue when it is clearly coloured or dark (not glass)."""
    rgb = rgb.astype(int)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    return float(((chroma > 25) | (rgb.mean(axis=2) < 180)).mean())


# ---------------------------------------------------------------- CMU-1-Small-Region


def test_cmu_grid_has_the_mpp_correct_patch_size(cmu_tiled):
    _, record = cmu_tiled
    assert record.slide_mpp == pytest.approx(0.499)
    assert record.patch_size_level0 == round(256 * 0.5 / 0.499) == 257
    width, height = record.dimensions
    assert record.num_candidates == (width // 257) * (height // 257)
    assert 0 < record.num_patches < record.num_candidates


def test_cmu_kept_patches_are_tissue_and_background_is_excluded(cmu_tiled, cmu_slide):
    out, record = cmu_tiled
    kept = {(x, y) for _, x, y in _rows([out / "shards" / s for s in record.shards])}
    with open_slide(cmu_slide) as reader:
        width, height = reader.dimensions
        for y in range(0, height - 256, 257):
            for x in range(0, width - 256, 257):
                own = _own_tissue_fraction(reader.read_region((x, y), 0, (257, 257)))
                if (x, y) in kept:
                    assert own > 0.35, f"kept patch at {(x, y)} is mostly glass ({own:.2f} tissue)"
                elif own > 0.9:
                    pytest.fail(f"patch at {(x, y)} is {own:.2f} tissue but was dropped")
                if own < 0.05:  # white background
                    assert (x, y) not in kept


def test_cmu_patches_read_back_at_their_coordinates(cmu_tiled, cmu_slide):
    out, record = cmu_tiled
    table = pq.read_table(out / "shards" / record.shards[0])
    assert table.column_names[: len(PATCH_COLUMNS)] == list(PATCH_COLUMNS)
    import tiffslide  # the reference reader, used directly

    slide = tiffslide.TiffSlide(cmu_slide)
    for row in table.to_pylist():
        stored = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
        assert stored.shape == (257, 257, 3) and row["size"] == 257 and row["level"] == 0
        assert row["mpp"] == pytest.approx(0.499)
        expected = slide.read_region(
            (row["x"], row["y"]), row["level"], (row["size"], row["size"]), as_array=True
        )
        np.testing.assert_array_equal(stored, expected)
    coords = (out / record.coords).read_text().splitlines()
    assert coords[0] == "x,y,level,size,mpp,tissue_fraction"
    assert [tuple(map(int, line.split(",")[:2])) for line in coords[1:]] == list(
        zip(table["x"].to_pylist(), table["y"].to_pylist(), strict=True)
    )


def test_cmu_thumbnail_shows_mask_and_grid(cmu_tiled):
    out, record = cmu_tiled
    thumbnail = Image.open(out / record.thumbnail)
    assert thumbnail.format == "PNG" and max(thumbnail.size) <= 1024
    scale = record.dimensions[0] / thumbnail.size[0]
    pixels = np.asarray(thumbnail.convert("RGB"))
    x, y = map(int, (out / record.coords).read_text().splitlines()[1].split(",")[:2])
    # The kept patch's outline is drawn in blue along its top edge.
    edge = pixels[round(y / scale), round(x / scale) + 2 : round((x + 257) / scale) - 2]
    assert (edge == (0, 60, 255)).all(axis=1).mean() > 0.9
    # Glass near the top-left corner (left of the tissue) is neither tinted nor outlined.
    corner = pixels[40:80, 60:200].astype(int)
    assert (corner.min(axis=2) > 200).all()


def test_openslide_backend_reads_the_same_pixels(cmu_slide):
    pytest.importorskip("openslide", reason="openslide-python (optional backend) is not installed")
    with open_slide(cmu_slide, "tiffslide") as a, open_slide(cmu_slide, "openslide") as b:
        assert a.mpp() == b.mpp() and a.level_dimensions == b.level_dimensions
        np.testing.assert_array_equal(
            a.read_region((700, 900), 0, (257, 257)), b.read_region((700, 900), 0, (257, 257))
        )


# ---------------------------------------------------------------- DICOM


def test_dicom_wsi_opens_and_tiles(shared_data, tmp_path):
    pytest.importorskip("wsidicom", reason="DICOM needs the optional extra: pip install wsidicom")
    from wsidicom import WsiDicom

    path = shared_data / "wsi" / "camelyon_multiframe.dcm"
    with open_slide(path) as reader:  # "auto" picks wsidicom for .dcm
        assert type(reader).__name__ == "WsiDicomReader"
        assert reader.dimensions == (1152, 700)
        assert reader.mpp() == pytest.approx(28.97, abs=0.01)
        region = reader.read_region((100, 50), 0, (300, 200))
    with WsiDicom.open(path) as reference:
        np.testing.assert_array_equal(region, reference.read_region((100, 50), 0, (300, 200), as_array=True))
    # At its coarse resolution the slide can still be tiled, at a matching target.
    record = tile_slide(path, tmp_path, TilingConfig(patch_size=32, target_mpp=32.0))
    assert record.patch_size_level0 == round(32 * 32.0 / 28.969) == 35
    assert record.num_patches > 0
    row = pq.read_table(tmp_path / "shards" / record.shards[0]).to_pylist()[0]
    with WsiDicom.open(path) as reference:
        expected = reference.read_region((row["x"], row["y"]), 0, (35, 35), as_array=True)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["image"]["bytes"]))), expected)


# ---------------------------------------------------------------- streaming across ranks and workers


@pytest.fixture(scope="module")
def three_slides_tiled(cmu_slide, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("three")
    slides = _slide_copies(cmu_slide, folder / "slides", ["slide_a", "slide_b", "slide_c"])
    summary = tile_slides(slides, folder / "out", TilingConfig(patches_per_shard=5), progress=False)
    assert summary.ok and len(summary.tiled) == 3
    return folder / "out"


def test_shards_stream_with_datasets_glob(three_slides_tiled):
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    dataset = load_dataset(
        "parquet", data_files=str(three_slides_tiled / "shards" / "*.parquet"), split="train", streaming=True
    )
    assert isinstance(dataset.features["image"], ImageFeature)
    example = next(iter(dataset))
    assert set(PATCH_COLUMNS) <= set(example)
    assert isinstance(example["image"], Image.Image) and example["image"].size == (257, 257)
    assert example["slide_id"] in {"slide_a", "slide_b", "slide_c"} and example["mpp"] == pytest.approx(0.499)


def _keys(dataset) -> list[tuple[str, int, int]]:
    return [(e["slide_id"], e["x"], e["y"]) for e in dataset.remove_columns("image")]


def test_two_ranks_get_disjoint_complete_shares(three_slides_tiled):
    manifest = json.loads((three_slides_tiled / "manifest.json").read_text())
    everything = _rows(resolve_shards(three_slides_tiled))
    assert len(everything) == len(set(everything)) == manifest["num_patches"] == 3 * 28
    assert manifest["num_shards"] == 3 * 6  # 28 patches in shards of at most 5, split evenly
    shares = [_keys(load_patch_dataset(three_slides_tiled, rank=r, world_size=2)) for r in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(everything)
    assert len(shares[0]) == len(shares[1]) == 42  # 9 of the 18 shards each


def test_odd_shard_count_still_splits_without_overlap_or_loss(cmu_slide, tmp_path):
    slides = _slide_copies(cmu_slide, tmp_path / "slides", ["odd"])
    tile_slides(slides, tmp_path / "out", TilingConfig(patches_per_shard=10), progress=False)
    assert len(resolve_shards(tmp_path / "out")) == 3
    everything = _rows(resolve_shards(tmp_path / "out"))
    shares = [_keys(load_patch_dataset(tmp_path / "out", rank=r, world_size=2)) for r in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(everything)


def test_dataloader_workers_split_a_rank_share(three_slides_tiled):
    import torch

    dataset = load_patch_dataset(three_slides_tiled, rank=1, world_size=2).remove_columns("image")
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    seen = [(e["slide_id"], int(e["x"]), int(e["y"])) for e in loader]
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(_keys(load_patch_dataset(three_slides_tiled, rank=1, world_size=2)))


# ---------------------------------------------------------------- faults and resume


def test_truncated_slide_is_reported_and_the_others_finish_in_parallel(cmu_slide, tmp_path):
    slides = _slide_copies(cmu_slide, tmp_path / "slides", ["good_1", "good_2"])
    truncated = tmp_path / "slides" / "truncated.svs"
    data = cmu_slide.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    summary = tile_slides([slides[0], truncated, slides[1]], tmp_path / "out", num_workers=2, progress=False)
    assert sorted(summary.tiled) == ["good_1", "good_2"]
    [failure] = summary.failures
    assert failure.slide_id == "truncated" and failure.path == str(truncated)
    assert failure.error == "SlideReadError" and "truncated or corrupt" in failure.message
    assert json.loads((tmp_path / "out" / "failures.json").read_text()) == [
        {"slide_id": "truncated", "path": str(truncated), "error": failure.error, "message": failure.message}
    ]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(manifest["slides"]) == ["good_1", "good_2"] and manifest["num_patches"] == 2 * 28
    assert not list((tmp_path / "out" / "shards").glob("truncated*"))
    assert not (tmp_path / "out" / ".staging" / "truncated").exists()


def _crash_on_bad_slide(task):
    """A stand-in for tiling, run in the worker processes: the slide named "bad" kills its worker."""
    if task.slide_id == "bad":
        os._exit(3)
    time.sleep(0.2)
    return {"slide_id": task.slide_id}


def test_a_worker_crash_is_pinned_on_its_slide_and_the_run_goes_on(tmp_path):
    from exaonepath_hf.tiling.pipeline import _run_in_processes, _Task

    names = ["a", "b", "bad", "c", "d", "e"]
    tasks = [_Task(f"/slides/{n}.svs", n, str(tmp_path), TilingConfig()) for n in names]
    outcomes = []
    _run_in_processes(
        tasks, 2, lambda task, outcome: outcomes.append((task.slide_id, outcome)), _crash_on_bad_slide
    )
    assert sorted(slide_id for slide_id, _ in outcomes) == sorted(names)  # each slide reported exactly once
    results = dict(outcomes)
    assert isinstance(results["bad"], SlideFailure) and results["bad"].error == "WorkerCrashed"
    assert all(results[n] == {"slide_id": n} for n in names if n != "bad")


def test_leftovers_of_an_interrupted_slide_are_replaced(cmu_slide, tmp_path):
    slides = _slide_copies(cmu_slide, tmp_path / "slides", ["s"])
    out = tmp_path / "out"
    config = TilingConfig(patches_per_shard=10)
    tile_slides(slides, out, config, progress=False)
    reference = _rows(resolve_shards(out))
    # What a kill during publishing leaves: one shard published, one still staged, no slide record.
    (out / "slides" / "s.json").unlink()
    (out / "shards" / "s-00002.parquet").unlink()
    (out / ".staging" / "s").mkdir(parents=True)
    (out / ".staging" / "s" / "s-00002.parquet.tmp").write_bytes(b"partial")
    summary = tile_slides(slides, out, config, progress=False)
    assert summary.tiled == ["s"]
    assert sorted(_rows(out.glob("shards/*.parquet"))) == sorted(reference)
    assert not (out / ".staging" / "s").exists()


def test_killed_run_restarts_with_no_duplicate_and_no_missing_patch(cmu_slide, tmp_path):
    names = ["k1", "k2", "k3", "k4"]
    slides = _slide_copies(cmu_slide, tmp_path / "slides", names)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "exaonepath_hf.tiling.cli",
        *map(str, slides),
        "--out",
        str(out),
        "--quiet",
    ]
    command += ["--shard-size", "8"]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(out.glob("slides/*.json")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the tiler did not finish a slide in 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list(out.glob("slides/*.json")))
    assert done_before < len(names), "the run finished before it could be killed"

    summary = tile_slides(slides, out, TilingConfig(patches_per_shard=8), progress=False)
    assert len(summary.skipped) == done_before and len(summary.tiled) == len(names) - done_before
    rows = _rows(out.glob("shards/*.parquet"))
    assert len(rows) == len(set(rows)) == 4 * 28
    single = _rows(sorted(out.glob(f"shards/{names[0]}-*.parquet")))
    expected = {(n, x, y) for n in names for (_, x, y) in single}
    assert set(rows) == expected
    assert not list(out.glob(".staging/*"))


def test_a_folder_of_slides_is_expanded_not_read_as_dicom(cmu_slide, tmp_path, capsys):
    _slide_copies(cmu_slide, tmp_path / "slides", ["b", "a"])
    (tmp_path / "slides" / "notes.txt").write_text("not a slide")
    out = tmp_path / "out"
    assert tile_main([str(tmp_path / "slides"), "--out", str(out), "--quiet"]) == 0
    assert "2 slides tiled, 0 already complete, 0 failed" in capsys.readouterr().out
    assert sorted(json.loads((out / "manifest.json").read_text())["slides"]) == ["a", "b"]
    # A folder with neither slide files nor .dcm files is refused in one line that names it.
    (tmp_path / "empty").mkdir()
    assert tile_main([str(tmp_path / "empty"), "--out", str(out), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "empty") in error and ".svs" in error and ".dcm" in error


def test_slide_ids_must_be_unique(cmu_slide, tmp_path):
    a = _slide_copies(cmu_slide, tmp_path / "a", ["same"])
    b = _slide_copies(cmu_slide, tmp_path / "b", ["same"])
    with pytest.raises(ValueError, match="share the id 'same'"):
        tile_slides([*a, *b], tmp_path / "out", progress=False)
