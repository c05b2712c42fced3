"""Several processes into one output folder: rank and world size from flags / torchrun / Slurm, a split with no
overlap and no loss, per-rank manifests that every reader merges, and a rerun after a killed rank that completes
only what is missing (tiling and slide feature extraction)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import SAMPLE_SLIDE, SAMPLE_SLIDE_PATCHES, extraction_argv, extraction_settings

from exaonepath_hf.tiling import (
    RankInfo,
    SlideFailure,
    SlideRecord,
    TilingConfig,
    TilingManifest,
    load_patch_dataset,
    read_manifest,
    resolve_rank,
    resolve_shards,
    split_for_rank,
    tile_slides,
    tiling_output_folder,
)
from exaonepath_hf.tiling.ranks import record_files, record_name

SLIDE_NAMES = ["s0", "s1", "s2", "s3"]  # round robin on sorted ids: rank 0 gets s0, s2; rank 1 s1, s3


def test_rank_comes_from_flags_then_torchrun_then_slurm():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}
    assert resolve_rank(environ={}) == RankInfo(0, 1, 0, "single process")
    info = resolve_rank(environ={**slurm, **torchrun})
    assert (info.rank, info.world_size, info.local_rank) == (3, 8, 1) and "torchrun" in info.source
    info = resolve_rank(environ=slurm)
    assert (info.rank, info.world_size, info.local_rank) == (5, 6, 2) and "Slurm" in info.source
    info = resolve_rank(1, 2, environ={**slurm, **torchrun})
    assert (info.rank, info.world_size, info.source) == (1, 2, "flags") and info.is_distributed


@pytest.mark.parametrize(
    "rank, world_size, environ, message",
    [
        (1, None, {}, "both --rank and --world_size"),
        (2, 2, {}, "0 <= rank < world_size"),
        (None, None, {"RANK": "0", "WORLD_SIZE": "zero"}, "WORLD_SIZE='zero' is not an integer"),
        (None, None, {"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, "rank 4 of world size 4"),
    ],
)
def test_impossible_ranks_are_refused(rank, world_size, environ, message):
    with pytest.raises(ValueError, match=message):
        resolve_rank(rank, world_size, environ=environ)


def test_the_split_is_disjoint_complete_balanced_and_order_free():
    ids = [f"slide-{i:03d}" for i in range(23)]
    for world_size in (1, 2, 3, 5, 30):
        shares = [split_for_rank(ids, rank, world_size) for rank in range(world_size)]
        assert sorted(i for share in shares for i in share) == ids  # no loss, no overlap
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert shares == [split_for_rank(ids[::-1], rank, world_size) for rank in range(world_size)]
    assert split_for_rank(["c", "a", "d", "b", "e"], 1, 2) == ["b", "d"]  # round robin on sorted names
    with pytest.raises(ValueError, match="names a more than once"):
        split_for_rank(["a", "b", "a"], 0, 2)


def test_record_names_and_the_files_a_reader_merges(tmp_path):
    assert record_name("manifest", 0, 1) == "manifest.json"
    assert record_name("manifest", 3, 4) == "manifest.rank-00003.json"
    for name in ("manifest.json", "manifest.rank-00000.json", "manifest.rank-00012.json", "other.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / ".manifest.json.x1y2.tmp").write_text("{}")  # an atomic write in flight
    assert [p.name for p in record_files(tmp_path, "manifest")] == [
        "manifest.json",
        "manifest.rank-00000.json",
        "manifest.rank-00012.json",
    ]


def _record(slide_id: str, num_shards: int, num_patches: int) -> SlideRecord:
    return SlideRecord(
        slide_id=slide_id, path=f"/slides/{slide_id}.svs", reader="TiffSlideReader", dimensions=(2220, 2967),
        level_count=1, slide_mpp=0.499, mpp_source="metadata", patch_size_level0=257, read_level=0,
        stored_patch_size=257, stored_mpp=0.499, num_candidates=88, num_patches=num_patches, tissue_threshold=20,
        tissue_area_fraction=0.3, shards=tuple(f"{slide_id}-{part:05d}.parquet" for part in range(num_shards)),
        shard_rows=(num_patches,) * num_shards, coords=f"coords/{slide_id}.csv",
        thumbnail=f"thumbnails/{slide_id}.png", seconds=1.0,
    )  # fmt: skip


def _failure(slide_id: str) -> SlideFailure:
    return SlideFailure(slide_id, f"/slides/{slide_id}.svs", "SlideReadError", "truncated")


def test_read_manifest_merges_ranks_and_drops_failures_a_later_run_completed(tmp_path):
    (tmp_path / "shards").mkdir()
    config = TilingConfig()
    rank0 = TilingManifest(config, {"a": _record("a", 1, 3)}, [])
    rank1 = TilingManifest(config, {"c": _record("c", 2, 5)}, [_failure("b"), _failure("d")])
    single = TilingManifest(config, {"b": _record("b", 1, 2)}, [])
    for name, manifest in (
        ("manifest.rank-00000", rank0),
        ("manifest.rank-00001", rank1),
        ("manifest", single),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps(manifest.to_dict()))
    merged = read_manifest(tmp_path / "shards")
    assert list(merged.slides) == ["a", "b", "c"] and merged.num_patches == 10 and merged.num_shards == 4
    assert merged.slides["c"] == _record("c", 2, 5) and merged.config == config
    assert merged.failures == [_failure("d")]  # b failed once, a later run completed it
    assert len(resolve_shards(tmp_path)) == 4


# ----------------------------------------------------------------------------------------------------------
# Two processes into one folder

# the command each stage runs (module, function), and the function a killed rank dies in on its second call
STAGES = {
    "tiling": (("exaonepath_hf.tiling.cli", "main"), ("exaonepath_hf.tiling.pipeline", "tile_slide")),
    "extraction": (
        ("exaonepath_hf.eval.slide.cli", "extract_main"),
        ("exaonepath_hf.eval.slide.features", "write_slide_features"),
    ),
}
KILL_ON_SECOND_CALL = """
import importlib
module = importlib.import_module({module!r})
real = getattr(module, {name!r})
done = []

def first_call_only(*args, **kwargs):
    if done:
        os._exit(9)
    done.append(real(*args, **kwargs))
    return done[-1]

setattr(module, {name!r}, first_call_only)
"""


def _start(stage: str, argv: list[str], rank: int, kill: bool = False) -> subprocess.Popen:
    """A rank of a 2-process run, as torchrun starts it (RANK / WORLD_SIZE in the environment)."""
    (command, function), (module, name) = STAGES[stage]
    kill_code = KILL_ON_SECOND_CALL.format(module=module, name=name) if kill else ""
    script = (
        f"import os, sys\n{kill_code}\nfrom {command} import {function}\nsys.exit({function}({argv!r}))\n"
    )
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _run_ranks(stage: str, argv: list[str], kill_rank: int | None = None) -> list[int]:
    processes = [_start(stage, argv, rank, kill=rank == kill_rank) for rank in (0, 1)]
    codes = []
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode in (0, 9), stderr[-3000:]
        codes.append(process.returncode)
    return codes


@pytest.fixture
def slides(tmp_path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in SLIDE_NAMES:
        (folder / f"{name}.svs").symlink_to(SAMPLE_SLIDE)
    return folder


def _slide_args(slides: Path) -> list[str]:
    return [str(slides / f"{name}.svs") for name in SLIDE_NAMES]


@pytest.mark.slow
def test_two_ranks_tile_into_one_folder_with_no_overlap_and_no_loss(slides, tmp_path):
    out = tmp_path / "tiles"
    assert _run_ranks("tiling", [*_slide_args(slides), "--out", str(out), "--quiet"]) == [0, 0]

    assert not (out / "manifest.json").exists()  # no file both ranks write
    shares = [json.loads((out / f"manifest.rank-0000{r}.json").read_text())["slides"] for r in (0, 1)]
    assert sorted(shares[0]) == ["s0", "s2"] and sorted(shares[1]) == ["s1", "s3"]
    assert tiling_output_folder(out) == out and list(read_manifest(out).slides) == SLIDE_NAMES
    rows = list(load_patch_dataset(out, streaming=False))  # the reader training and evaluation use
    assert len(rows) == 4 * SAMPLE_SLIDE_PATCHES
    assert {name: sum(r["slide_id"] == name for r in rows) for name in SLIDE_NAMES} == dict.fromkeys(
        SLIDE_NAMES, SAMPLE_SLIDE_PATCHES
    )
    assert len({(r["slide_id"], r["x"], r["y"]) for r in rows}) == len(rows)


@pytest.mark.slow
def test_a_killed_tiling_rank_is_completed_by_a_rerun_and_nothing_else_is_redone(slides, tmp_path):
    out = tmp_path / "tiles"
    argv = [*_slide_args(slides), "--out", str(out), "--quiet"]
    assert _run_ranks("tiling", argv, kill_rank=1) == [0, 9]
    # rank 1 tiled s1, then died in s3 before writing its manifest: readers see rank 0's slides only
    assert list(read_manifest(out).slides) == ["s0", "s2"]
    records = {name: (out / "slides" / f"{name}.json").stat().st_mtime_ns for name in ("s0", "s1", "s2")}

    config = TilingConfig()
    rerun = [
        tile_slides(list(map(Path, argv[:4])), out, config, progress=False, rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert (rerun[0].tiled, rerun[0].skipped) == ([], ["s0", "s2"])
    assert (rerun[1].tiled, rerun[1].skipped) == (["s3"], ["s1"])
    assert {name: (out / "slides" / f"{name}.json").stat().st_mtime_ns for name in records} == records
    assert list(read_manifest(out).slides) == SLIDE_NAMES
    shards = resolve_shards(out)
    assert sorted(Path(f).name for f in shards) == sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert len(list(load_patch_dataset(out, streaming=False))) == 4 * SAMPLE_SLIDE_PATCHES


@pytest.mark.slow
def test_two_ranks_extract_and_a_killed_rank_is_completed_by_a_rerun(slides, tiny_model_dir, tmp_path):
    from exaonepath_hf.eval.slide.bags import load_slide_features
    from exaonepath_hf.eval.slide.features import extract_slide_features

    out = tmp_path / "features"
    assert _run_ranks("extraction", extraction_argv([slides], tiny_model_dir, out), kill_rank=1) == [0, 9]
    # rank 0 tiled and extracted s0 and s2; rank 1 extracted s1 and died writing s3
    assert sorted(p.stem for p in out.glob("*.h5")) == ["s0", "s1", "s2"]
    assert not list(out.glob(".*.tmp"))  # the killed write left no partial file behind
    report = json.loads((out / "extraction_report.rank-00000.json").read_text())
    assert report["extracted"] == ["s0", "s2"] and report["world_size"] == 2
    assert not (out / "extraction_report.rank-00001.json").exists()
    done = {name: (out / f"{name}.h5").stat().st_mtime_ns for name in ("s0", "s1", "s2")}

    settings = extraction_settings([slides], tiny_model_dir, out)
    reruns = [extract_slide_features(replace(settings, rank=r, world_size=2)) for r in (0, 1)]
    assert (reruns[0].extracted, reruns[0].skipped) == ([], ["s0", "s2"])
    assert (reruns[1].extracted, reruns[1].skipped) == (["s3"], ["s1"])
    assert {name: (out / f"{name}.h5").stat().st_mtime_ns for name in done} == done
    bags = {name: load_slide_features(out / f"{name}.h5") for name in SLIDE_NAMES}
    for name, bag in bags.items():  # copies of one slide: the same bag whichever rank made it
        assert bag.slide_id == name and bag.coords.tolist() == bags["s0"].coords.tolist()
        assert abs(bag.features - bags["s0"].features).max() < 1e-5
    assert list(read_manifest(out / "tiles").slides) == SLIDE_NAMES
