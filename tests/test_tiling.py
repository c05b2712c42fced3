"""Tiling on synthetic pyramidal TIFFs with known tissue and MPP, and the pieces (tissue, grid, readers)."""

import colorsys
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image

from exaonepath_hf.tiling import (
    MissingMPPError,
    TilingConfig,
    TissueDetectionConfig,
    level0_patch_size,
    open_slide,
    plan_patches,
    read_downsampled,
    read_downsampled_views,
    slide_io,
    tile_slide,
    tile_slides,
    tissue_fractions,
)
from exaonepath_hf.tiling.cli import main as tile_main
from exaonepath_hf.tiling.tissue import _filter_regions, otsu_threshold, saturation

# The synthetic slide is 6 x 4 patches of 128 µm (256 px at 0.5 µm/px). Tissue rectangles in patch units
# (x0, y0, x1, y1), and the grid patches (column, row) each should give with min_tissue_fraction 0.5:
TISSUE_RECTS = [
    (0.0, 0.0, 1.75, 1.0),  # (0, 0) full, (1, 0) 75 % -> both kept
    (2.0, 1.0, 4.0, 3.0),  # four full patches
    (0.0, 2.0, 1.25, 4.0),  # (0, 2), (0, 3) full; (1, 2), (1, 3) 25 % -> dropped
    (5.05, 3.05, 5.95, 3.95),  # a 0.013 mm² speck covering 81 % of (5, 3): below the 0.02 mm² region minimum
]
EXPECTED_PATCHES = {(0, 0), (1, 0), (2, 1), (3, 1), (2, 2), (3, 2), (0, 2), (0, 3)}
GRID_COLUMNS, GRID_ROWS = 6, 4
PATCH_UM = 128.0
BACKGROUND = (242, 240, 244)
TISSUE = (205, 120, 185)


def write_synthetic_slide(
    path: Path, mpp: float | None, downsamples=(1, 4, 16), seed=0, dpi: float | None = None
) -> Path:
    """A pyramidal RGB TIFF of the layout above at `mpp` µm/px (no resolution tags when None, unless `dpi`
    gives a print resolution tag in pixels per inch, as some exporters write)."""
    patch_px = round(PATCH_UM / (mpp or 0.5))
    height, width = GRID_ROWS * patch_px, GRID_COLUMNS * patch_px
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUND
    for x0, y0, x1, y1 in TISSUE_RECTS:
        image[round(y0 * patch_px) : round(y1 * patch_px), round(x0 * patch_px) : round(x1 * patch_px)] = (
            TISSUE
        )
    noise = rng.integers(-4, 5, size=image.shape)
    image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    options = dict(tile=(256, 256), photometric="rgb", compression="zlib")
    with tifffile.TiffWriter(path) as tif:
        for i, factor in enumerate(downsamples):
            level = image.reshape(height // factor, factor, width // factor, factor, 3).mean(axis=(1, 3))
            level = np.rint(level).astype(np.uint8)
            extra = {}
            if mpp is not None:
                extra = dict(resolution=(1e4 / (mpp * factor),) * 2, resolutionunit="CENTIMETER")
            elif dpi is not None:
                extra = dict(resolution=(dpi / factor,) * 2, resolutionunit="INCH")
            if i == 0:
                tif.write(level, subifds=len(downsamples) - 1, **options, **extra)
            else:
                tif.write(level, subfiletype=1, **options, **extra)
    return path


@pytest.fixture(scope="module")
def synthetic_slides(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("synthetic")
    return {
        "mpp025": write_synthetic_slide(folder / "mpp025.tif", 0.25, downsamples=(1, 4, 16)),
        "mpp05": write_synthetic_slide(folder / "mpp05.tif", 0.5, downsamples=(1, 4)),
        "nompp": write_synthetic_slide(folder / "nompp.tif", None, downsamples=(1, 4)),
    }


# ---------------------------------------------------------------- pieces


def test_saturation_matches_colorsys():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    expected = np.array(
        [[round(colorsys.rgb_to_hsv(*(c / 255 for c in px))[1] * 255) for px in row] for row in rgb], np.uint8
    )
    np.testing.assert_array_equal(saturation(rgb), expected)


def test_otsu_threshold_maximises_between_class_variance():
    rng = np.random.default_rng(2)
    values = (
        np.concatenate([rng.normal(20, 6, 3000), rng.normal(110, 20, 1000)]).clip(0, 255).astype(np.uint8)
    )

    def between_class_variance(t):  # direct definition: split {<= t} / {> t}
        low, high = values[values <= t].astype(float), values[values > t].astype(float)
        if len(low) == 0 or len(high) == 0:
            return 0.0
        return len(low) * len(high) / len(values) ** 2 * (low.mean() - high.mean()) ** 2

    scores = [between_class_variance(t) for t in range(256)]
    assert otsu_threshold(values) == int(np.argmax(scores))
    assert 30 < otsu_threshold(values) < 90


def test_region_filter_drops_small_regions_and_fills_small_holes():
    mask = np.zeros((60, 60), bool)
    mask[5:45, 5:45] = True  # a 1600 px region ...
    mask[10:12, 10:12] = False  # ... with a 4 px hole (filled)
    mask[20:40, 20:40] = False  # ... and a 400 px hole (kept) ...
    mask[27:33, 27:33] = True  # ... holding a 36 px island (a region of its own: kept)
    mask[50:53, 50:53] = True  # a 9 px speck (dropped)
    out = _filter_regions(mask, min_area_px=30, min_hole_px=10, max_holes=None)
    assert out[10:12, 10:12].all()
    assert not out[21:26, 21:26].any()
    assert out[27:33, 27:33].all()
    assert not out[50:53, 50:53].any()
    assert out[5:10, 5:45].all()
    np.testing.assert_array_equal(
        _filter_regions(mask, 30, 10, max_holes=1), out
    )  # one large hole: no change
    # max_holes=0: every hole of a kept region is filled (the island is then inside tissue anyway).
    assert _filter_regions(mask, 30, 10, max_holes=0)[5:45, 5:45].all()


def test_max_holes_keeps_the_largest_holes_of_each_region():
    mask = np.zeros((40, 80), bool)
    mask[0:40, 0:38] = True  # region 1: holes of 36, 16 and 25 px
    mask[5:11, 5:11] = mask[20:24, 5:9] = mask[28:33, 20:25] = False
    mask[0:40, 42:80] = True  # region 2: one 16 px hole
    mask[10:14, 50:54] = False
    out = _filter_regions(mask, min_area_px=30, min_hole_px=1, max_holes=2)
    assert not out[5:11, 5:11].any() and not out[28:33, 20:25].any()  # the two largest stay holes
    assert out[20:24, 5:9].all()  # the third is filled
    assert not out[10:14, 50:54].any()  # ranking is per region


def test_tissue_fractions_are_area_weighted():
    rng = np.random.default_rng(3)
    mask = rng.random((20, 30)) > 0.5
    scale, patch = 4.0, 10  # patch borders fall inside mask pixels
    coords = np.array([[0, 0], [6, 2], [50, 30], [110, 65]])
    full = np.kron(mask, np.ones((4, 4)))  # the mask at level-0 resolution
    expected = [full[y : y + patch, x : x + patch].mean() for x, y in coords]
    np.testing.assert_allclose(tissue_fractions(mask, scale, coords, patch), expected, atol=1e-12)


def test_config_round_trips_through_json():
    config = TilingConfig(
        patch_size=224, mpp=0.25, tissue=TissueDetectionConfig(threshold=20, max_holes_per_region=8)
    )
    assert TilingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert "mpp" not in config.output_settings() and "backend" not in config.output_settings()
    with pytest.raises(ValueError, match="min_tissue_fraction"):
        TilingConfig(min_tissue_fraction=0.0)
    with pytest.raises(ValueError, match="threshold"):
        TissueDetectionConfig(threshold="triangle")


def test_level0_patch_size():
    assert level0_patch_size(256, 0.5, 0.25) == 512
    assert level0_patch_size(256, 0.5, 0.5) == 256
    assert level0_patch_size(256, 0.5, 0.499) == 257  # 256.51 rounded
    with pytest.raises(ValueError, match="coarser"):
        level0_patch_size(256, 0.5, 28.97)


def test_read_downsampled_is_blockwise_exact(synthetic_slides, monkeypatch):
    with open_slide(synthetic_slides["mpp05"]) as reader:
        whole, scale = read_downsampled(reader, 16)
        assert scale == 16  # level 1 (4x) averaged in 4x4 blocks
        level = reader.read_region((0, 0), 1, reader.level_dimensions[1])
        h, w = whole.shape[:2]
        expected = level[: h * 4, : w * 4].reshape(h, 4, w, 4, 3).astype(float).mean(axis=(1, 3))
        assert np.abs(whole.astype(float) - expected).max() <= 0.5
        fine, fine_scale = read_downsampled(reader, 6)  # level 1 (4x) as it is: scale 4
        monkeypatch.setattr(slide_io, "_DOWNSAMPLE_BLOCK_SIDE", 24)  # many blocks, ragged edges
        blocked, _ = read_downsampled(reader, 16)
        # Several views from one level share its reads and equal the views read one by one.
        shared = read_downsampled_views(reader, [16, 6, 1])
        single = read_downsampled(reader, 1)
    np.testing.assert_array_equal(blocked, whole)
    assert [scale for _, scale in shared] == [16, fine_scale, 1]
    for (view, _), alone in zip(shared, [whole, fine, single[0]], strict=True):
        np.testing.assert_array_equal(view, alone)


# ---------------------------------------------------------------- the synthetic grid


@pytest.mark.parametrize("name, mpp, patch_px", [("mpp025", 0.25, 512), ("mpp05", 0.5, 256)])
def test_synthetic_slide_gives_exactly_the_expected_grid(synthetic_slides, name, mpp, patch_px):
    with open_slide(synthetic_slides[name]) as reader:
        assert reader.mpp() == pytest.approx(mpp)
        plan = plan_patches(reader, TilingConfig())
    assert plan.patch_size_level0 == patch_px
    assert plan.num_candidates == GRID_COLUMNS * GRID_ROWS
    kept = {(int(x) // patch_px, int(y) // patch_px) for x, y in plan.coordinates}
    assert kept == EXPECTED_PATCHES
    assert all(x % patch_px == 0 and y % patch_px == 0 for x, y in plan.coordinates)
    fractions = dict(
        zip(map(tuple, (plan.coordinates // patch_px).tolist()), plan.tissue_fractions, strict=True)
    )
    assert fractions[(1, 0)] == pytest.approx(0.75, abs=0.07)
    assert fractions[(2, 1)] == pytest.approx(1.0, abs=0.02)


def test_speck_is_removed_by_the_region_filter_only(synthetic_slides):
    config = TilingConfig(tissue=TissueDetectionConfig(min_region_area_mm2=0.0))
    with open_slide(synthetic_slides["mpp05"]) as reader:
        plan = plan_patches(reader, config)
    kept = {(int(x) // 256, int(y) // 256) for x, y in plan.coordinates}
    assert kept == EXPECTED_PATCHES | {(5, 3)}


def test_both_resolutions_cut_the_same_physical_patches(synthetic_slides, tmp_path):
    records = {name: tile_slide(synthetic_slides[name], tmp_path / name) for name in ("mpp025", "mpp05")}
    tables = {name: pq.read_table(tmp_path / name / "shards" / records[name].shards[0]) for name in records}
    physical = {
        name: sorted(
            (round(x * m, 6), round(y * m, 6))
            for x, y, m in zip(
                t["x"].to_pylist(), t["y"].to_pylist(), [records[name].slide_mpp] * t.num_rows, strict=True
            )
        )
        for name, t in tables.items()
    }
    assert physical["mpp025"] == physical["mpp05"]
    assert tables["mpp025"]["size"].to_pylist() == [512] * 8
    assert tables["mpp025"]["mpp"].to_pylist() == [0.25] * 8
    first = Image.open(io.BytesIO(tables["mpp025"]["image"][0]["bytes"].as_py()))
    assert first.size == (512, 512)  # native size by default


def test_resize_to_target_stores_target_size_and_mpp(synthetic_slides, tmp_path):
    config = TilingConfig(resize_to_target=True)
    record = tile_slide(synthetic_slides["mpp025"], tmp_path, config)
    table = pq.read_table(tmp_path / "shards" / record.shards[0])
    assert set(table["mpp"].to_pylist()) == {0.5}
    assert set(table["size"].to_pylist()) == {512}
    with open_slide(synthetic_slides["mpp025"]) as reader:
        for row in table.slice(0, 3).to_pylist():
            stored = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
            assert stored.shape == (256, 256, 3)
            native = reader.read_region((row["x"], row["y"]), 0, (512, 512)).astype(float)
            block_mean = native.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
            assert np.abs(stored - block_mean).mean() < 3  # a faithful 2x reduction of the same area


def test_missing_mpp_is_a_clear_error_unless_given(synthetic_slides, tmp_path):
    with pytest.raises(MissingMPPError, match="--mpp"):
        tile_slide(synthetic_slides["nompp"], tmp_path / "a")
    record = tile_slide(synthetic_slides["nompp"], tmp_path / "b", TilingConfig(mpp=0.5))
    assert record.mpp_source == "fallback"
    assert record.num_patches == len(EXPECTED_PATCHES)
    # The metadata wins over --mpp when the slide has it.
    record = tile_slide(synthetic_slides["mpp025"], tmp_path / "c", TilingConfig(mpp=0.5))
    assert record.slide_mpp == pytest.approx(0.25) and record.patch_size_level0 == 512


def test_implausible_metadata_mpp_counts_as_missing(tmp_path, caplog, capsys):
    # A 72-dpi resolution tag reads as 352.8 µm/px: not a microscope's pixel size, so --mpp applies.
    slide = write_synthetic_slide(tmp_path / "dpi72.tif", None, downsamples=(1,), dpi=72)
    with open_slide(slide) as reader:
        assert reader.metadata_mpp == (pytest.approx(352.78, abs=0.01),) * 2
    out = tmp_path / "out"
    assert tile_main([str(slide), "--out", str(out), "--quiet", "--mpp", "0.5"]) == 0
    record = json.loads((out / "slides" / "dpi72.json").read_text())
    assert record["slide_mpp"] == 0.5 and record["mpp_source"] == "fallback"
    assert record["patch_size_level0"] == 256 and record["num_patches"] == len(EXPECTED_PATCHES)
    assert "dpi72.tif" in caplog.text and "352.8" in caplog.text
    # Without --mpp: a clear error that names the value and the flag (not a coarser --target_mpp).
    with pytest.raises(MissingMPPError, match=r"352\.8 µm/px.*implausible.*--mpp"):
        tile_slide(slide, tmp_path / "none")
    assert tile_main([str(slide), "--out", str(tmp_path / "none"), "--quiet"]) == 1
    assert "target_mpp" not in capsys.readouterr().err


def test_missing_mpp_slide_is_a_failure_in_a_run(synthetic_slides, tmp_path):
    summary = tile_slides([synthetic_slides["nompp"], synthetic_slides["mpp05"]], tmp_path, progress=False)
    assert summary.tiled == ["mpp05"]
    [failure] = summary.failures
    assert failure.slide_id == "nompp" and failure.error == "MissingMPPError" and "--mpp" in failure.message
    assert json.loads((tmp_path / "failures.json").read_text())[0]["slide_id"] == "nompp"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert list(manifest["slides"]) == ["mpp05"] and manifest["num_patches"] == len(EXPECTED_PATCHES)


def test_truncated_tiles_are_a_read_error_in_a_run(synthetic_slides, tmp_path):
    data = synthetic_slides["mpp05"].read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    summary = tile_slides([cut, synthetic_slides["mpp05"]], tmp_path / "out", progress=False)
    assert summary.tiled == ["mpp05"]
    [failure] = summary.failures
    assert failure.error == "SlideReadError" and "truncated or corrupt" in failure.message
    assert not list((tmp_path / "out" / "shards").glob("cut*"))


def test_cli_tiles_reports_failures_and_resumes_with_mpp(synthetic_slides, tmp_path, capsys):
    out = tmp_path / "out"
    slides = [str(synthetic_slides["mpp05"]), str(synthetic_slides["nompp"])]
    assert tile_main([*slides, "--out", str(out), "--quiet"]) == 1
    assert "nompp" in capsys.readouterr().err
    # Rerun with --mpp (slides given as a list file): the complete slide is skipped, the failed one is tiled
    # with the fallback MPP.
    listing = tmp_path / "slides.txt"
    listing.write_text("# slides to tile\n" + "\n".join(slides) + "\n\n")
    assert tile_main([str(listing), "--slide-list", "--out", str(out), "--quiet", "--mpp", "0.5"]) == 0
    assert "1 slides tiled, 1 already complete, 0 failed" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["slides"]) == ["mpp05", "nompp"] and manifest["failures"] == []
    # Other patch settings would mix incompatible patches into one folder: refused.
    assert tile_main([*slides, "--out", str(out), "--quiet", "--patch-size", "128"]) == 2
    assert "patch_size" in capsys.readouterr().err
