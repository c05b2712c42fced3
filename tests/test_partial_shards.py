"""A tiling run killed in the middle of a slide leaves shards that only the manifest knows to be incomplete:
training, evaluation (the robustness loaders too) and feature collapse must read the manifest's shards only, and
a rerun completes the slide.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import SAMPLE_SLIDE

from exaonepath_hf.tiling import TilingConfig, load_patch_dataset, resolve_shards, tile_slides

PATCHES_PER_SHARD = 8  # the sample slide has 28 patches: 4 shards per slide

# Each snippet patches the tiler so that the process dies (os._exit, no cleanup: as a kill) at that point.
KILL_POINTS = {
    "writing the second shard": """
        calls = 0
        real_encode = pipeline.encode_patch

        def encode_patch(*args, **kwargs):
            global calls
            calls += 1
            if calls == PATCHES_PER_SHARD + 3:
                os._exit(9)
            return real_encode(*args, **kwargs)

        pipeline.encode_patch = encode_patch
    """,
    "publishing the shards": """
        from pathlib import Path

        def move_first_then_die(staging, target):
            first = sorted(Path(staging).iterdir())[0]
            os.replace(first, Path(target) / first.name)
            os._exit(9)

        pipeline.move_files_into = move_first_then_die
    """,
}


def _tile_and_die(kill_point: str, slide: Path, out: Path) -> int:
    script = (
        textwrap.dedent(
            f"""
        import os
        from exaonepath_hf.tiling import TilingConfig, tile_slides
        from exaonepath_hf.tiling import pipeline

        PATCHES_PER_SHARD = {PATCHES_PER_SHARD}
        """
        )
        + textwrap.dedent(KILL_POINTS[kill_point])
        + textwrap.dedent(
            f"""
        tile_slides([{str(slide)!r}], {str(out)!r}, TilingConfig(patches_per_shard=PATCHES_PER_SHARD), 1)
        """
        )
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True).returncode


@pytest.fixture(params=sorted(KILL_POINTS))
def killed_run(request, tmp_path) -> Path:
    """Slide `complete` tiled; then a run on slide `killed` dies at the kill point."""
    for name in ("complete", "killed"):
        (tmp_path / f"{name}.svs").symlink_to(SAMPLE_SLIDE)
    out = tmp_path / "tiles"
    tile_slides([tmp_path / "complete.svs"], out, TilingConfig(patches_per_shard=PATCHES_PER_SHARD), 1)
    assert _tile_and_die(request.param, tmp_path / "killed.svs", out) == 9
    if request.param == "publishing the shards":  # the case the manifest exists for
        assert sorted(p.name for p in (out / "shards").glob("killed-*.parquet")) == ["killed-00000.parquet"]
    return out


def test_readers_of_tiling_output_see_only_complete_slides(killed_run):
    from exaonepath_hf.eval.robustness.grouped_images import load_grouped_images
    from exaonepath_hf.eval.robustness.samples import load_robustness_samples
    from exaonepath_hf.eval.robustness.tasks import RobustnessTaskSpec, load_robustness_task
    from exaonepath_hf.train.dino.data import resolve_source

    complete = resolve_shards(killed_run)
    assert [Path(f).name for f in complete] == [f"complete-{part:05d}.parquet" for part in range(4)]
    assert json.loads((killed_run / "manifest.json").read_text())["slides"].keys() == {"complete"}
    # a robustness task whose columns a tiling output has: the slide is the centre and the case
    spec = RobustnessTaskSpec(
        name="tiles", display_name="tiles", hub_id="local/tiles", license="CC0-1.0", center_column="slide_id",
        case_column="slide_id",
    )  # fmt: skip

    for source in (killed_run, killed_run / "shards", f"{killed_run}/shards/*.parquet"):
        assert resolve_shards(source) == complete
        assert list(resolve_source(str(source)).files) == complete  # training
        grouped = load_grouped_images(source, group_by="slide_id")  # evaluation and feature collapse
        assert set(grouped.dataset["slide_id"]) == {"complete"}
        assert len(grouped.dataset) == 28
        # exaonepath-robustness --data DIR, and a registered task's local copy (--task NAME --data DIR)
        assert set(load_robustness_samples(source).table.slide_id) == {"complete"}
        task = load_robustness_task(spec, data_dir=source)
        assert set(task.dataset["slide_id"]) == {"complete"} and len(task.dataset) == 28
    assert {row["slide_id"] for row in load_patch_dataset(killed_run)} == {"complete"}


def test_a_rerun_completes_the_killed_slide(killed_run):
    slides = [killed_run.parent / "complete.svs", killed_run.parent / "killed.svs"]
    summary = tile_slides(slides, killed_run, TilingConfig(patches_per_shard=PATCHES_PER_SHARD), 1)
    assert summary.skipped == ["complete"] and summary.tiled == ["killed"]
    names = sorted(Path(f).name for f in resolve_shards(killed_run))
    assert names == sorted(p.name for p in (killed_run / "shards").glob("*.parquet"))
    assert len(names) == 8
