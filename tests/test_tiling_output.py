"""The output format of `exaonepath-tile` and its readers (`exaonepath_hf.tiling.output`): slide records and
coordinate files round-trip against hand-written values, the manifest reads back typed, one resolver lists only
the shards of complete slides, and a slide's patches read back from its shards."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_SLIDE, SAMPLE_SLIDE_PATCHES

from exaonepath_hf.images import decode_rgb
from exaonepath_hf.tiling import (
    PatchCoords,
    ShardPatches,
    SlideRecord,
    TiledSlide,
    TilingConfig,
    read_coords_csv,
    read_manifest,
    resolve_shards,
    tile_slides,
    write_coords_csv,
)

RECORD_JSON = """{
  "coords": "coords/TCGA-XX.csv",
  "dimensions": [2220, 2967],
  "level_count": 1,
  "mpp_source": "metadata",
  "num_candidates": 88,
  "num_patches": 3,
  "patch_size_level0": 257,
  "path": "/slides/TCGA-XX.svs",
  "read_level": 0,
  "reader": "TiffSlideReader",
  "seconds": 1.25,
  "shard_rows": [2, 1],
  "shards": ["TCGA-XX-00000.parquet", "TCGA-XX-00001.parquet"],
  "slide_id": "TCGA-XX",
  "slide_mpp": 0.499,
  "stored_mpp": 0.499,
  "stored_patch_size": 257,
  "thumbnail": "thumbnails/TCGA-XX.png",
  "tissue_area_fraction": 0.304817,
  "tissue_threshold": 20
}
"""

COORDS_CSV = """x,y,level,size,mpp,tissue_fraction
0,0,0,257,0.499,1.0000
257,0,0,257,0.499,0.5123
514,771,0,257,0.499,0.9999
"""


def test_slide_record_round_trips_its_json():
    values = json.loads(RECORD_JSON)
    record = SlideRecord.from_dict(values)
    assert record.slide_id == "TCGA-XX" and record.dimensions == (2220, 2967)
    assert record.shards == ("TCGA-XX-00000.parquet", "TCGA-XX-00001.parquet") and record.shard_rows == (2, 1)
    assert record.slide_mpp == 0.499 and record.num_patches == 3 and record.tissue_threshold == 20
    assert record.coords == "coords/TCGA-XX.csv" and record.thumbnail == "thumbnails/TCGA-XX.png"
    assert record.to_dict() == values
    assert SlideRecord.from_dict(record.to_dict()) == record


def test_a_record_of_another_format_is_refused():
    values = json.loads(RECORD_JSON)
    del values["shard_rows"]
    with pytest.raises(ValueError, match=r"lacks \['shard_rows'\].*re-tile"):
        SlideRecord.from_dict(values)
    with pytest.raises(ValueError, match=r"unknown \['colour'\]"):
        SlideRecord.from_dict({**json.loads(RECORD_JSON), "colour": "blue"})


def test_coords_csv_round_trips(tmp_path):
    path = tmp_path / "coords" / "TCGA-XX.csv"
    xy = np.array([[0, 0], [257, 0], [514, 771]])
    write_coords_csv(path, xy, np.array([1.0, 0.51234, 0.99991]), level=0, size=257, mpp=0.499)
    assert path.read_text() == COORDS_CSV
    coords = read_coords_csv(path)
    assert len(coords) == 3 and coords.xy.dtype == np.int64
    np.testing.assert_array_equal(coords.xy, xy)
    np.testing.assert_array_equal(coords.level, [0, 0, 0])
    np.testing.assert_array_equal(coords.size, [257, 257, 257])
    np.testing.assert_array_equal(coords.mpp, [0.499] * 3)
    np.testing.assert_array_equal(coords.tissue_fraction, [1.0, 0.5123, 0.9999])
    assert not list(path.parent.glob(".*.tmp"))  # written atomically


def test_coords_csv_of_a_slide_without_patches(tmp_path):
    path = tmp_path / "empty.csv"
    write_coords_csv(path, np.zeros((0, 2), dtype=np.int64), np.zeros(0), level=1, size=512, mpp=0.25)
    assert path.read_text() == "x,y,level,size,mpp,tissue_fraction\n"
    coords = read_coords_csv(path)
    assert isinstance(coords, PatchCoords) and len(coords) == 0 and coords.xy.shape == (0, 2)


def test_a_csv_of_other_columns_is_not_read_as_coordinates(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("y,x\n1,2\n")
    with pytest.raises(ValueError, match="not a coordinates file"):
        read_coords_csv(path)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> Path:
    """The sample slide tiled twice (as `a` and `b`) in shards of at most 8 patches, row groups of 3."""
    folder = tmp_path_factory.mktemp("output")
    for name in ("a", "b"):
        (folder / f"{name}.svs").symlink_to(SAMPLE_SLIDE)
    config = TilingConfig(patches_per_shard=8, row_group_size=3)
    summary = tile_slides([folder / "a.svs", folder / "b.svs"], folder / "tiles", config, progress=False)
    assert summary.ok and sorted(summary.slides) == ["a", "b"]
    return folder / "tiles"


def test_the_manifest_reads_back_typed(tiled):
    manifest = read_manifest(tiled)
    assert manifest.config == TilingConfig(patches_per_shard=8, row_group_size=3) and manifest.failures == []
    assert list(manifest.slides) == ["a", "b"] and manifest.num_patches == 2 * SAMPLE_SLIDE_PATCHES
    assert manifest.num_shards == 2 * 4  # 28 patches in shards of at most 8
    for slide_id, record in manifest.slides.items():
        assert record == SlideRecord.from_dict(
            json.loads((tiled / "slides" / f"{slide_id}.json").read_text())
        )
    assert json.loads((tiled / "manifest.json").read_text()) == {
        **manifest.to_dict(),
        "rank": 0,
        "world_size": 1,
    }


def test_a_slides_patches_read_back_from_its_shards(tiled):
    manifest = read_manifest(tiled)
    slide = TiledSlide(tiled, manifest.slides["b"], manifest.config)
    assert slide.slide_id == "b" and [p.name for p in slide.shard_files()] == list(slide.record.shards)
    patches = ShardPatches(slide.shard_files())
    assert len(patches) == SAMPLE_SLIDE_PATCHES == len(slide.coords())
    rows = [patches[i] for i in range(len(patches))]
    np.testing.assert_array_equal([(x, y) for _, x, y in rows], slide.coords().xy)  # shard order = CSV order
    assert slide.record.shard_rows == (7, 7, 7, 7)  # 28 patches split evenly
    row = pq.read_table(slide.shard_files()[1]).slice(0, 1).to_pylist()[0]
    image, x, y = patches[7]  # the first row of the second shard
    assert (x, y) == (row["x"], row["y"]) and image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), decode_rgb(row["image"]))
    assert {image.size for image, _, _ in rows} == {(257, 257)}


def test_one_resolver_lists_only_complete_shards(tiled, tmp_path):
    out = tmp_path / "tiles"
    shutil.copytree(tiled, out)
    complete = resolve_shards(out)
    assert [Path(f).name for f in complete] == [f"{s}-{p:05d}.parquet" for s in "ab" for p in range(4)]
    partial = out / "shards" / "c-00000.parquet"  # what a run killed while publishing slide c leaves
    shutil.copyfile(complete[0], partial)
    for source in (
        out,
        out / "shards",
        str(out / "shards"),
        f"{out}/shards/*.parquet",
        f"{out}/**/*.parquet",
    ):
        assert resolve_shards(source) == complete, source
    assert resolve_shards(partial) == []  # named explicitly, still not complete
    assert resolve_shards([partial, complete[3], complete[0]]) == [complete[3], complete[0]]  # order kept
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copyfile(partial, loose / "x.parquet")
    assert resolve_shards(loose / "x.parquet") == [str(loose / "x.parquet")]  # outside a tiling output
    assert resolve_shards(f"{loose}/*.parquet") == [str(loose / "x.parquet")]
    assert resolve_shards(loose) is None  # a folder, not a tiling output: no parquet named
    assert resolve_shards("1aurent/PatchCamelyon") is None
