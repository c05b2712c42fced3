"""Per-slide feature bags: TRIDENT's HDF5 layout both ways, extraction on the bundled CC0 slide against a direct
forward pass, resume, a corrupt slide reported beside a good one, and the CLS + patch-token-mean option."""

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_SLIDE, SAMPLE_SLIDE_PATCHES, extraction_argv, extraction_settings

from exaonepath_hf import ExaonePathModel
from exaonepath_hf.eval.common.encoders import Preprocessing
from exaonepath_hf.eval.slide.bags import load_slide_features, patch_geometry, write_slide_features
from exaonepath_hf.eval.slide.cli import extract_main
from exaonepath_hf.eval.slide.features import extract_slide_features
from exaonepath_hf.images import open_rgb
from exaonepath_hf.tiling import TilingConfig, tile_slides


def _direct_forward(tiles: Path, model_dir: Path, stain_normalize: bool):
    """The independent path: the shards' images (in shard order) through the processor and the model, without
    the extraction code; returns their (x, y) and the model's output."""
    rows = [
        row
        for shard in sorted((tiles / "shards").glob("*.parquet"))
        for row in pq.read_table(shard).to_pylist()
    ]
    inputs = Preprocessing(stain_normalize=stain_normalize).processor()(
        [open_rgb(row["image"]) for row in rows], return_tensors="pt"
    )
    with torch.no_grad():
        output = ExaonePathModel.from_pretrained(model_dir).eval()(inputs["pixel_values"])
    return [[row["x"], row["y"]] for row in rows], output


def _tiler_coords(tiles: Path, slide_id: str) -> np.ndarray:
    return np.loadtxt(tiles / "coords" / f"{slide_id}.csv", delimiter=",", skiprows=1, usecols=(0, 1)).astype(
        np.int64
    )


# ----------------------------------------------------------------------------------------------------------
# The file format


def test_a_file_written_by_trident_loads(tmp_path):
    """As TRIDENT's save_h5 writes it: chunked resizable datasets, attributes on coords, None as "None", a dict
    as JSON text, its `savetodir`, features in float16."""
    path = tmp_path / "TCGA-AA-0001.h5"
    features = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float16)
    coords = np.array([[0, 0], [512, 0], [1024, 0], [0, 512], [512, 512]], dtype=np.int64)
    with h5py.File(path, "w") as handle:
        for key, value in (("features", features), ("coords", coords)):
            handle.create_dataset(
                key, data=value, maxshape=(None, value.shape[1]), chunks=(1, value.shape[1])
            )
        handle["features"].attrs.update({"name": "TCGA-AA-0001", "savetodir": "/job/features_uni_v1"})
        handle["coords"].attrs.update(
            {
                "patch_size": 256,
                "patch_size_level0": 512,
                "level0_magnification": 40,
                "target_magnification": 20,
                "overlap": 0,
                "name": "TCGA-AA-0001",
                "savetodir": "/job",
                "level0_width": 40000,
                "level0_height": 30000,
                "custom": "None",
                "segmentation": json.dumps({"model": "hest", "threshold": 0.5}),
            }
        )
    bag = load_slide_features(path)
    assert bag.slide_id == "TCGA-AA-0001" and len(bag) == 5 and bag.feature_dim == 3
    assert bag.features.dtype == np.float32 and np.array_equal(bag.features, features.astype(np.float32))
    assert bag.coords.dtype == np.int64 and np.array_equal(bag.coords, coords)
    assert bag.attributes["patch_size_level0"] == 512 and bag.attributes["target_magnification"] == 20
    assert isinstance(bag.attributes["patch_size"], int) and bag.attributes["custom"] is None
    assert bag.attributes["segmentation"] == {"model": "hest", "threshold": 0.5}
    assert bag.feature_attributes["savetodir"] == "/job/features_uni_v1"


def test_our_file_has_tridents_names_and_reads_back(tmp_path):
    geometry = patch_geometry(
        "s1", 256, 512, level0_mpp=0.25, target_mpp=0.5, level0_width=900, level0_height=700
    )
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    coords = np.array([[0, 0], [512, 0], [0, 512], [512, 512]])
    path = write_slide_features(tmp_path / "s1.h5", features, coords, geometry, {"encoder": {"kind": "timm"}})
    assert [p.name for p in tmp_path.iterdir()] == ["s1.h5"]  # no temporary left behind
    with h5py.File(path, "r") as handle:  # what TRIDENT's read_coords and its slide encoders read
        attrs = dict(handle["coords"].attrs)
        assert handle["features"].shape == (4, 3) and handle["coords"].dtype == np.int64
        assert handle["features"].attrs["name"] == "s1"
    assert attrs["patch_size"] == 256 and attrs["patch_size_level0"] == 512 and attrs["overlap"] == 0
    assert (
        attrs["level0_magnification"] == 40 and attrs["target_magnification"] == 20 and attrs["name"] == "s1"
    )
    bag = load_slide_features(path)
    assert np.array_equal(bag.features, features) and np.array_equal(bag.coords, coords)
    assert bag.feature_attributes["encoder"] == {"kind": "timm"} and bag.attributes["level0_width"] == 900


def test_bad_files_and_arrays_are_refused_with_the_reason(tmp_path):
    with h5py.File(tmp_path / "slide_embedding.h5", "w") as handle:  # a TRIDENT slide encoder's output
        handle["features"] = np.zeros(768, dtype=np.float32)
        handle["coords"] = np.zeros((10, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="not a patch feature bag"):
        load_slide_features(tmp_path / "slide_embedding.h5")
    with h5py.File(tmp_path / "no_coords.h5", "w") as handle:
        handle["features"] = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="no dataset coords"):
        load_slide_features(tmp_path / "no_coords.h5")
    (tmp_path / "garbage.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        load_slide_features(tmp_path / "garbage.h5")
    with pytest.raises(ValueError, match=r"coords must be \[N, 2\]"):
        write_slide_features(tmp_path / "x.h5", np.zeros((3, 4)), np.zeros((2, 2)), {})
    with pytest.raises(ValueError, match="NaN"):
        write_slide_features(tmp_path / "x.h5", np.full((1, 4), np.nan), np.zeros((1, 2)), {})
    assert not (tmp_path / "x.h5").exists()


# ----------------------------------------------------------------------------------------------------------
# Extraction


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """The bundled slide tiled with image shards (8 patches each: 4 shards)."""
    out = tmp_path_factory.mktemp("tiles")
    summary = tile_slides([SAMPLE_SLIDE], out, TilingConfig(patches_per_shard=8), progress=False)
    assert summary.ok and summary.num_patches == SAMPLE_SLIDE_PATCHES
    return out


@pytest.fixture(scope="module")
def extracted(tiles, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    summary = extract_slide_features(extraction_settings([tiles], tiny_model_dir, out))
    return out, summary


def test_features_of_a_tiling_folder_equal_a_direct_forward_pass(tiles, extracted, tiny_model_dir):
    out, summary = extracted
    assert (
        summary.ok
        and summary.extracted == ["CMU-1-Small-Region"]
        and summary.num_patches == SAMPLE_SLIDE_PATCHES
    )
    bag = load_slide_features(out / "CMU-1-Small-Region.h5")
    assert bag.slide_id == "CMU-1-Small-Region" and bag.features.shape == (SAMPLE_SLIDE_PATCHES, 64)
    assert np.array_equal(bag.coords, _tiler_coords(tiles, "CMU-1-Small-Region"))

    coords, output = _direct_forward(tiles, tiny_model_dir, stain_normalize=True)
    assert np.array_equal(bag.coords, coords)
    np.testing.assert_allclose(bag.features, output.pooler_output.numpy(), rtol=1e-4, atol=1e-5)

    record = json.loads((out / "extraction_report.json").read_text())
    assert record["extracted"] == ["CMU-1-Small-Region"] and record["failures"] == []
    assert bag.attributes["patch_size"] == 256 and bag.attributes["target_mpp"] == 0.5
    slide_record = json.loads((tiles / "slides" / "CMU-1-Small-Region.json").read_text())
    assert (
        bag.attributes["patch_size_level0"] == slide_record["patch_size_level0"] == 257
    )  # 256 * 0.5 / 0.499
    assert bag.attributes["level0_mpp"] == pytest.approx(0.499)
    assert bag.feature_attributes["tokens"] == "cls" and bag.feature_attributes["precision"] == "fp32"
    assert bag.feature_attributes["preprocessing"]["stain_normalize"] is True


def test_a_rerun_skips_the_complete_slide(tiles, extracted, tiny_model_dir):
    out, _ = extracted
    path = out / "CMU-1-Small-Region.h5"
    before = path.stat().st_mtime_ns
    summary = extract_slide_features(extraction_settings([tiles], tiny_model_dir, out))
    assert summary.skipped == ["CMU-1-Small-Region"] and summary.extracted == [] and summary.num_patches == 0
    assert summary.forward_seconds == 0 and path.stat().st_mtime_ns == before


def test_other_settings_in_the_same_folder_are_refused(tiles, extracted, tiny_model_dir, capsys):
    out, _ = extracted
    code = extract_main(
        [str(tiles), "--model", str(tiny_model_dir), "--output_dir", str(out), "--stain_normalization", "off"]
    )
    assert code == 2 and "preprocessing differ" in capsys.readouterr().err


def test_a_corrupt_slide_is_reported_and_the_good_one_written(extracted, tiny_model_dir, tmp_path, capsys):
    """Slides given as files are tiled on the way (coordinates only; pixels read from the slide)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "good.svs").symlink_to(SAMPLE_SLIDE)
    (slides / "corrupt.svs").write_bytes(SAMPLE_SLIDE.read_bytes()[:20000])
    out = tmp_path / "features"
    argv = extraction_argv([slides], tiny_model_dir, out)
    assert extract_main(argv) == 1
    assert "corrupt.svs" in capsys.readouterr().err

    report = json.loads((out / "extraction_report.json").read_text())
    assert report["extracted"] == ["good"]
    assert [(f["slide_id"], f["stage"], f["error"]) for f in report["failures"]] == [
        ("corrupt", "tiling", "SlideReadError")
    ]
    assert sorted(p.name for p in out.glob("*.h5")) == ["good.h5"]
    bag = load_slide_features(out / "good.h5")
    assert np.array_equal(bag.coords, _tiler_coords(out / "tiles", "good"))
    # read from the slide, the same pixels as the PNG shards: the same features
    reference = load_slide_features(extracted[0] / "CMU-1-Small-Region.h5")
    np.testing.assert_allclose(bag.features, reference.features, rtol=1e-5, atol=1e-6)
    assert not list((out / "tiles" / "shards").iterdir())  # coordinates only

    (slides / "corrupt.svs").unlink()  # the user removes the bad slide: the rerun is clean
    assert extract_main(argv) == 0


def test_cls_plus_mean_doubles_the_feature(tiles, extracted, tiny_model_dir, tmp_path):
    summary = extract_slide_features(
        extraction_settings([tiles], tiny_model_dir, tmp_path, tokens="cls+mean", stain_normalize=False)
    )
    assert summary.ok
    bag = load_slide_features(tmp_path / "CMU-1-Small-Region.h5")
    assert (
        bag.features.shape == (SAMPLE_SLIDE_PATCHES, 128) and bag.feature_attributes["tokens"] == "cls+mean"
    )

    _, output = _direct_forward(tiles, tiny_model_dir, stain_normalize=False)
    hidden = output.last_hidden_state
    np.testing.assert_allclose(bag.features[:, :64], hidden[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bag.features[:, 64:], hidden[:, 1:].mean(1).numpy(), rtol=1e-4, atol=1e-5)


def test_bad_input_is_named(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere.svs"
    assert (
        extract_main([str(missing), "--model", str(tiny_model_dir), "--output_dir", str(tmp_path / "o")]) == 2
    )
    assert "nowhere.svs" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="a folder with neither slide files"):
        extract_slide_features(extraction_settings([empty], tiny_model_dir, tmp_path / "o"))
    os.symlink(SAMPLE_SLIDE, tmp_path / "CMU-1-Small-Region.svs")
    with pytest.raises(ValueError, match="slide id 'CMU-1-Small-Region'"):
        extract_slide_features(
            extraction_settings([SAMPLE_SLIDE, tmp_path / "CMU-1-Small-Region.svs"], tiny_model_dir, tmp_path)
        )


def test_cls_plus_mean_of_a_timm_encoder_comes_from_its_tokens():
    timm = pytest.importorskip("timm")
    from exaonepath_hf.eval.common.encoders import Encoder

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        embed_dim=24,
        depth=1,
        num_heads=2,
    ).eval()
    encoder = Encoder(model, "timm:tiny", "test", "timm", "timm-default", 24)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(pixels)  # [3, 1 + 4 patches, 24], after the final norm
    both = encoder.features(pixels, tokens="cls+mean")
    torch.testing.assert_close(both, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1))
    torch.testing.assert_close(encoder.features(pixels), tokens[:, 0])
    mean_pooled = Encoder(model, "timm:tiny", "test", "timm", "mean", 24)
    with pytest.raises(ValueError, match="need a CLS feature"):
        mean_pooled.features(pixels, tokens="cls+mean")


# ----------------------------------------------------------------------------------------------------------
# Patches chosen by CLAM or TRIDENT (`--coords`)


def _write_coords_h5(path: Path, coords: np.ndarray, attributes: dict) -> Path:
    """A patch-coordinates file as CLAM's `process_contours` and TRIDENT's `coords_to_h5` write it: `coords`
    [N, 2] level-0 top-left (resizable, chunked), the patch geometry as attributes of `coords`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=(1, 2))
        handle["coords"].attrs.update(attributes)
    return path


def _slides_folder(root: Path, names: tuple[str, ...] = ("CMU-1-Small-Region",)) -> Path:
    slides = root / "slides"
    slides.mkdir()
    for name in names:
        (slides / f"{name}.svs").symlink_to(SAMPLE_SLIDE)
    return slides


def _rows_at(bag, coords: np.ndarray) -> np.ndarray:
    """`bag`'s features in the order of `coords`."""
    row_of = {(int(x), int(y)): i for i, (x, y) in enumerate(bag.coords)}
    return bag.features[[row_of[(int(x), int(y))] for x, y in coords]]


def test_trident_coordinates_give_the_tilers_features(tiles, extracted, tiny_model_dir, tmp_path):
    """TRIDENT's job folder (`patches/<slide>_patches.h5`) at the tiler's coordinates, listed in another order:
    the same patches, read from the slide and sized as the tiler sizes them (native, or with --resize resized
    to the file's patch_size), so the same features as the tiler's path."""
    coords = _tiler_coords(tiles, "CMU-1-Small-Region")[::-1].copy()
    job = tmp_path / "20x_256px_0px_overlap"
    trident = {
        "patch_size": 256,  # at the target magnification
        "patch_size_level0": 257,  # the tiler's side for 256 px at 0.5 µm/px of this 0.499 µm/px slide
        "level0_magnification": 20,
        "target_magnification": 20,
        "overlap": 0,
        "name": "CMU-1-Small-Region",
        "savetodir": str(job),
        "level0_width": 2220,
        "level0_height": 2967,
    }
    _write_coords_h5(job / "patches" / "CMU-1-Small-Region_patches.h5", coords, trident)
    _write_coords_h5(job / "patches" / "another-slide_patches.h5", coords[:2], trident)
    slides = _slides_folder(tmp_path)
    resized = tmp_path / "tiled-resized"
    tiling = TilingConfig(resize_to_target=True)
    assert extract_slide_features(
        extraction_settings([SAMPLE_SLIDE], tiny_model_dir, resized, tiling=tiling)
    ).ok
    for reference_dir, flags in ((extracted[0], []), (resized, ["--resize"])):
        out = tmp_path / f"features{''.join(flags)}"
        argv = extraction_argv([slides], tiny_model_dir, out)
        assert extract_main([*argv, "--coords", str(job), *flags]) == 0

        bag = load_slide_features(out / "CMU-1-Small-Region.h5")
        assert np.array_equal(bag.coords, coords)  # the file's order
        reference = load_slide_features(reference_dir / "CMU-1-Small-Region.h5")
        np.testing.assert_allclose(bag.features, _rows_at(reference, coords), rtol=0, atol=1e-5)
        assert bag.attributes["coords_layout"] == "trident" and bag.attributes["patch_size_level0"] == 257
        assert bag.attributes["patch_size"] == 256 and bag.attributes["target_magnification"] == 20
        report = json.loads((out / "extraction_report.json").read_text())
        assert report["extracted"] == ["CMU-1-Small-Region"] and report["failures"] == []
        assert report["unused_coords_files"] == ["another-slide_patches.h5"]
        assert not (out / "tiles").exists()  # read at the file's patches, not tiled


def test_clam_coordinates_give_the_tilers_features_at_native_size(tiny_model_dir, tmp_path):
    """CLAM's `patches/<slide>.h5` (patch_size pixels of patch_level, handed to the encoder unresized) at the
    coordinates of the tiler run without resizing (`resize_to_target=False`, the same pixels): equal features."""
    reference_dir = tmp_path / "tiled"
    tiling = TilingConfig(resize_to_target=False)
    assert extract_slide_features(
        extraction_settings([SAMPLE_SLIDE], tiny_model_dir, reference_dir, tiling=tiling)
    ).ok
    coords = _tiler_coords(reference_dir / "tiles", "CMU-1-Small-Region")
    clam = {
        "patch_size": 257,
        "patch_level": 0,
        "downsample": (1.0, 1.0),
        "downsampled_level_dim": (2220, 2967),
        "level_dim": (2220, 2967),
        "name": "CMU-1-Small-Region",
        "save_path": str(tmp_path / "clam" / "patches"),
    }
    _write_coords_h5(tmp_path / "clam" / "patches" / "CMU-1-Small-Region.h5", coords, clam)
    out = tmp_path / "features"
    argv = extraction_argv([_slides_folder(tmp_path)], tiny_model_dir, out)
    assert extract_main([*argv, "--coords", str(tmp_path / "clam" / "patches")]) == 0

    bag = load_slide_features(out / "CMU-1-Small-Region.h5")
    reference = load_slide_features(reference_dir / "CMU-1-Small-Region.h5")
    assert np.array_equal(bag.coords, reference.coords)
    np.testing.assert_allclose(bag.features, reference.features, rtol=0, atol=1e-5)
    assert bag.attributes["coords_layout"] == "clam" and bag.attributes["patch_size_level0"] == 257
    assert bag.attributes["level0_mpp"] == pytest.approx(0.499)


def test_coordinates_that_do_not_fit_are_named(tiny_model_dir, tmp_path, capsys):
    """A slide without a coordinates file stops the run before any work, naming it; a file whose patches lie
    outside its slide (another slide's file) fails that slide only, in the report."""
    slides = _slides_folder(tmp_path, ("good", "far", "missing"))
    coords_dir = tmp_path / "patches"
    geometry = {"patch_size": 256, "patch_level": 0}
    _write_coords_h5(coords_dir / "good.h5", np.array([[512, 512]]), geometry)
    _write_coords_h5(coords_dir / "far.h5", np.array([[512, 512], [9000, 0]]), geometry)
    out = tmp_path / "features"
    argv = [*extraction_argv([slides], tiny_model_dir, out), "--coords", str(coords_dir)]
    assert extract_main(argv) == 2
    error = capsys.readouterr().err
    assert "slides without a coordinates file" in error and "1 (missing)" in error and not out.exists()

    (slides / "missing.svs").unlink()
    assert extract_main(argv) == 1
    report = json.loads((out / "extraction_report.json").read_text())
    assert report["extracted"] == ["good"]
    assert [(f["slide_id"], f["stage"]) for f in report["failures"]] == [("far", "coords")]
    assert "outside the 2220x2967 slide" in report["failures"][0]["message"]
    assert load_slide_features(out / "good.h5").coords.tolist() == [[512, 512]]
