"""The DINO data pipeline on real H&E patches: sources, sharding, counted skips and fallbacks, exact resume."""

import io
import os
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image

from exaonepath_hf.stain_normalization import MacenkoNormalizer
from exaonepath_hf.train.dino.augmentations import AugmentationConfig, DINOMultiCrop
from exaonepath_hf.train.dino.data import (
    OrderedBatches,
    PatchStream,
    StreamState,
    _to_uint8,
    build_rank_loader,
    count_samples,
    load_pretraining_patches,
    resolve_source,
    shuffle_shards,
)

TINY_CROPS = AugmentationConfig(global_crop_size=32, local_crop_size=16, num_local_crops=2)


@pytest.fixture(scope="module")
def patch_folder(shared_data, tmp_path_factory) -> Path:
    """Mixed native sizes (224², 256², 512²), background tiles (Macenko fallbacks) and one corrupt file."""
    folder = tmp_path_factory.mktemp("patches")
    sources = sorted((shared_data / "crc-val-he-7k-samples").glob("*.png"))[:12]
    sources += sorted((shared_data / "tcga-tiles").glob("TCGA-*/*"))[:4]
    sources += sorted((shared_data / "tiles").glob("almost-white-*.png"))
    for source in sources:
        (folder / source.name).symlink_to(source)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return folder


def make_stream(source, rank=0, world_size=1, batch_size=2, start=None, normalizer=True):
    dataset, column = load_pretraining_patches(resolve_source(str(source)))
    dataset = split_dataset_by_node(shuffle_shards(dataset, 3), rank=rank, world_size=world_size)
    return PatchStream(
        dataset, column, DINOMultiCrop(TINY_CROPS), batch_size, seed=7, rank=rank,
        normalizer=MacenkoNormalizer() if normalizer else None, start=start, shuffle_buffer=8,
    )  # fmt: skip


def test_resolve_source_kinds(tmp_path, patch_folder):
    folder = resolve_source(str(patch_folder))
    assert folder.kind == "imagefolder" and len(folder.files) == len(list(patch_folder.iterdir()))
    assert count_samples(folder) == len(folder.files)
    assert resolve_source(str(patch_folder / "*.png")).kind == "imagefolder"
    assert resolve_source("1aurent/PatchCamelyon") == resolve_source("1aurent/PatchCamelyon")
    assert resolve_source("1aurent/PatchCamelyon").kind == "hub"
    with pytest.raises(ValueError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no images"):
        resolve_source(str(tmp_path))


def test_an_unusable_source_says_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"data.source is not set: add data.source=PATCHES"):
        resolve_source("")
    (tmp_path / "slide.svs").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"is a slide: tile it first \(exaonepath-tile .*slide.svs --out tiles\)"
    ):
        resolve_source(str(tmp_path / "slide.svs"))
    # A name that is no local path is a hub id: offline, one line that names the folder it looked in.
    monkeypatch.chdir(tmp_path)
    import huggingface_hub

    for module in (datasets.config, huggingface_hub.constants):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=rf"data.source tiles is neither a file or folder in {tmp_path}"):
        load_pretraining_patches(resolve_source("tiles"))


def test_tiler_shards_are_read_with_their_ids(tmp_path, shared_data):
    """An `exaonepath-tile` output folder: parquet shards with an Image column and slide coordinates."""
    patches = sorted((shared_data / "tcga-tiles" / "TCGA-3X-AAVA-01Z-00-DX1").iterdir())[:4]
    shards = tmp_path / "tiles" / "shards"
    shards.mkdir(parents=True)
    for index in range(2):
        rows = patches[index * 2 : index * 2 + 2]
        table = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": p.read_bytes(), "path": None} for p in rows],
                "slide_id": ["TCGA-3X-AAVA"] * 2,
                "x": [index * 512, index * 512 + 256],
                "y": [0, 0],
                "level": [0, 0],
                "size": [256, 256],
                "mpp": [0.5, 0.5],
            },
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "slide_id": datasets.Value("string"),
                    "x": datasets.Value("int64"),
                    "y": datasets.Value("int64"),
                    "level": datasets.Value("int64"),
                    "size": datasets.Value("int64"),
                    "mpp": datasets.Value("float64"),
                }
            ),
        )
        table.to_parquet(str(shards / f"shard-{index:05d}.parquet"))
    source = resolve_source(str(tmp_path / "tiles"))
    assert source.kind == "parquet" and len(source.files) == 2 and count_samples(source) == 4
    batch = next(iter(make_stream(tmp_path / "tiles", batch_size=4)))
    assert sorted(batch["ids"]) == ["TCGA-3X-AAVA@0:0,0", "TCGA-3X-AAVA@0:256,0", "TCGA-3X-AAVA@0:512,0",
                                    "TCGA-3X-AAVA@0:768,0"]  # fmt: skip
    assert [tuple(c.shape) for c in batch["crops"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2


def test_unreadable_images_are_skipped_and_counted_and_background_falls_back(patch_folder):
    stream = make_stream(patch_folder, batch_size=1)
    files = resolve_source(str(patch_folder)).files
    seen, unreadable, fallbacks = [], 0, 0
    for batch in stream:
        seen.extend(batch["ids"])
        unreadable += batch["unreadable"]
        fallbacks += batch["macenko_fallbacks"]
        if len(seen) == len(files) - 1:  # one full epoch of readable images
            break
    assert sorted(seen) == sorted(f for f in files if not f.endswith("corrupt.png"))
    assert unreadable == 1
    # The almost-white background tiles come back unchanged; real tissue is normalized.
    assert fallbacks >= 2 and fallbacks < len(seen) // 2


def test_macenko_runs_before_the_crops():
    """A flat image through the pipeline: the normalized colour (not the raw one) reaches the crops."""
    config = AugmentationConfig(
        global_crop_size=16, local_crop_size=16, num_local_crops=0, color_jitter_p=0, grayscale_p=0,
        blur_p=(0, 0, 0), solarize_p=0,
    )  # fmt: skip

    class Recorder:
        calls = 0

        def normalize(self, images, then=None):
            Recorder.calls += 1
            assert images.dtype == torch.uint8 and images.shape == (1, 3, 20, 20)
            return MacenkoNormalizer().normalize(torch.full_like(images, 128), then=then)

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 50, 50)).save(buffer, format="PNG")
    dataset = datasets.IterableDataset.from_generator(
        lambda: iter([{"image": {"bytes": buffer.getvalue(), "path": None}}]),
        features=datasets.Features({"image": datasets.Image(decode=False)}),
    )
    stream = PatchStream(dataset, "image", DINOMultiCrop(config), 1, seed=0, normalizer=Recorder())
    batch = next(iter(stream))
    # A flat grey 128 has no tissue: the normalizer returns it unchanged and flags a fallback.
    assert Recorder.calls == 1 and batch["macenko_fallbacks"] == 1
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    expected = (128 / 255 - mean) / std
    torch.testing.assert_close(batch["crops"][0][0].mean(dim=(1, 2)), expected, rtol=1e-3, atol=1e-3)


def test_ranks_read_disjoint_shards(patch_folder):
    files = resolve_source(str(patch_folder)).files
    per_rank = []
    for rank in range(2):
        ids = []
        for batch in make_stream(patch_folder, rank=rank, world_size=2, batch_size=1, normalizer=False):
            ids.extend(batch["ids"])
            if batch["position"][0] > 0:  # entered the second epoch
                ids.pop()
                break
        per_rank.append(set(ids))
    assert not per_rank[0] & per_rank[1]
    readable = {f for f in files if not f.endswith("corrupt.png")}
    assert per_rank[0] | per_rank[1] == readable


def _loader(stream, num_workers):
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, generator=torch.Generator(),
        multiprocessing_context="fork" if num_workers else None,
    )  # fmt: skip


def test_stream_resumes_exactly_with_several_workers(patch_folder):
    """Stop after an odd number of batches (the next batch belongs to worker 1), resume, compare."""
    workers = 2
    straight = OrderedBatches(
        _loader(make_stream(patch_folder, normalizer=False), workers), StreamState(workers)
    )
    reference = [next(straight) for _ in range(12)]  # crosses an epoch boundary (17 files / 2 workers)

    first = OrderedBatches(
        _loader(make_stream(patch_folder, normalizer=False), workers), StreamState(workers)
    )
    for _ in range(5):
        next(first)
    saved = StreamState.from_dict(first.state.to_dict())
    assert saved.next_worker == 1

    resumed_stream = make_stream(patch_folder, normalizer=False, start=saved)
    resumed = OrderedBatches(_loader(resumed_stream, workers), saved)
    for expected in reference[5:]:
        batch = next(resumed)
        assert batch["ids"] == expected["ids"] and batch["worker"] == expected["worker"]
        assert all(torch.equal(a, b) for a, b in zip(batch["crops"], expected["crops"], strict=True))


def test_webdataset_shards_are_read(tmp_path, shared_data):
    import tarfile

    patches = sorted((shared_data / "crc-val-he-7k-samples").glob("*.png"))[:6]
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for index, patch in enumerate(patches[shard * 3 : shard * 3 + 3]):
                tar.add(patch, arcname=f"sample{shard}{index}.png")
    source = resolve_source(str(tmp_path / "*.tar"))
    assert source.kind == "webdataset" and count_samples(source) is None  # needs data.num_samples
    dataset, column = load_pretraining_patches(source)
    assert column == "png" and dataset.num_shards == 2
    batch = next(iter(make_stream(tmp_path / "*.tar", batch_size=6, normalizer=False)))
    assert len(set(batch["ids"])) == 6 and batch["unreadable"] == 0
    assert all(i.split("#")[0].endswith(".tar") and "#sample" in i for i in batch["ids"])


@pytest.fixture(scope="module")
def tiled_slide(tmp_path_factory) -> Path:
    """`exaonepath-tile` output of the bundled CC0 slide, in shards of 8 patches."""
    import exaonepath_hf
    from exaonepath_hf.tiling.cli import main as tile

    slide = Path(exaonepath_hf.__file__).parent / "data" / "CMU-1-Small-Region.svs"
    out = tmp_path_factory.mktemp("tiling") / "tiles"
    assert tile([str(slide), "--out", str(out), "--shard_size", "8", "--quiet"]) == 0
    return out


def test_reads_the_tilers_real_output_split_across_ranks(tiled_slide):
    """Each of 2 ranks streams its own shards of a real tiling output."""
    out = tiled_slide
    source = resolve_source(str(out))
    total = count_samples(source)
    # 28 patches in shards of 8: 4 shards, 2 per rank.
    assert source.kind == "parquet" and len(source.files) % 2 == 0 and total >= 16
    per_rank = []
    for rank in range(2):
        ids = []
        for batch in make_stream(out, rank=rank, world_size=2, batch_size=1, normalizer=False):
            if batch["position"][0] > 0:
                break
            ids.extend(batch["ids"])
        per_rank.append(ids)
    assert all(i.startswith("CMU-1-Small-Region@0:") for ids in per_rank for i in ids)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == len(per_rank[0]) + len(per_rank[1]) == total


def test_a_worker_whose_shards_hold_no_readable_image_fails_clearly(tmp_path):
    for index in range(3):
        (tmp_path / f"broken{index}.png").write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match="no readable image in a whole pass"):
        next(iter(make_stream(tmp_path, normalizer=False)))


def test_a_tiling_output_yields_only_the_shards_its_manifest_completed(tiled_slide, tmp_path):
    """A run killed while publishing a slide leaves shards the manifest does not list: never read them."""
    out = tmp_path / "tiles"
    shutil.copytree(tiled_slide, out)
    complete = resolve_source(str(out)).files
    shards = out / "shards"
    stray = shards / "partial-slide-00000.parquet"
    shutil.copyfile(complete[0], stray)
    for source in (out, shards):
        resolved = resolve_source(str(source))
        assert resolved.kind == "parquet" and resolved.files == complete, source
        assert str(stray) not in resolved.files
    # a glob over the shards is narrowed the same way; files outside a tiling output are taken as given
    assert resolve_source(str(shards / "*.parquet")).files == complete
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copyfile(stray, loose / "a.parquet")
    assert resolve_source(str(loose / "*.parquet")).files == (str(loose / "a.parquet"),)


class _SleepRecorder:
    """Stands in for the `time` module inside `datasets.iterable_dataset`: records `sleep` instead of sleeping."""

    def __init__(self, real) -> None:
        self.real, self.sleeps = real, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def test_passes_over_parquet_shards_never_reach_datasets_shutdown_sleep(tiled_slide, monkeypatch):
    """Many passes over a small tiling output, built as training builds it: `datasets` must never sleep.

    Interleaving shards in `datasets`' shuffle sleeps `SLEEP_TIME_ON_THREADS_SHUTDOWN` seconds at the end of
    every pass over parquet shards, which left the cores idle most of the time on small corpora.
    """
    import datasets.iterable_dataset as iterable_dataset

    from exaonepath_hf.train.dino.config import DataConfig

    recorder = _SleepRecorder(iterable_dataset.time)
    monkeypatch.setattr(iterable_dataset, "time", recorder)
    config = DataConfig(source=str(tiled_slide), shuffle_buffer=8, num_workers=0)
    batches, total = build_rank_loader(
        config, DINOMultiCrop(TINY_CROPS), None, batch_size=8, seed=0, rank=0, world_size=1
    )
    epochs = {next(batches)["position"][0] for _ in range(3 * total // 8 + 1)}
    assert len(epochs) >= 3  # several passes over the shards
    assert recorder.sleeps == []


def test_uint8_conversion_of_normalized_chunks_rounds_half_to_even_like_torch():
    # every 1/510 step: exact halves after scaling by 255, and both ends
    values = torch.arange(0, 511, dtype=torch.float32) / 510
    chunk = values.repeat(2, 3, 1).reshape(2, 3, 7, 73)
    expected = (chunk * 255).round().to(torch.uint8)
    converted = _to_uint8(chunk.clone())
    assert converted.dtype == torch.uint8 and converted.shape == chunk.shape
    assert torch.equal(converted, expected)
    assert converted[0, 0, 0, :3].tolist() == [0, 0, 1]  # 0, 0.5 -> 0 (half to even), 1.0


# ------------------------------------------------------------------------------ steady reading


class _CountedReads:
    """An iterable of 0..n-1 that counts how many values were read from it."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __iter__(self):
        for value in range(self.n):
            self.reads += 1
            yield value


def test_steady_shuffle_reads_one_example_per_example_it_yields():
    import numpy as np

    from exaonepath_hf.train.dino.shuffle import steady_shuffle

    source = _CountedReads(200)
    outputs, reads = [], []
    for value in steady_shuffle(source, 50, np.random.default_rng(0)):
        outputs.append(value)
        reads.append(source.reads)
    assert sorted(outputs) == list(range(200)) and outputs != list(range(200))
    assert reads[0] == 2  # not a whole buffer before the first output
    steps = np.diff(reads)
    assert steps.max() <= 2 and (steps[49:150] == 1).all()  # two reads per output while filling, then one
    assert (steps[150:] == 0).all()  # the buffer drains at the end
    again = list(steady_shuffle(range(200), 50, np.random.default_rng(0)))
    assert again == outputs and again != list(steady_shuffle(range(200), 50, np.random.default_rng(1)))


def test_a_large_shuffle_buffer_does_not_delay_the_first_batch():
    """Only a few examples are read before the first batch, whatever `shuffle_buffer` (datasets' own buffer
    would read all of it first, the worker idle meanwhile)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 50, 50)).save(buffer, format="PNG")
    reads = []

    def examples():
        for index in range(5000):
            reads.append(index)
            yield {"image": {"bytes": buffer.getvalue(), "path": f"{index}.png"}}

    dataset = datasets.IterableDataset.from_generator(
        examples, features=datasets.Features({"image": datasets.Image(decode=False)})
    )
    stream = PatchStream(
        shuffle_shards(dataset, 0), "image", lambda image: [image], 4, seed=0, shuffle_buffer=10_000
    )
    batch = next(iter(stream))
    assert batch["crops"][0].shape == (4, 3, 16, 16) and len(reads) < 100


def _process_id(image: torch.Tensor) -> list[torch.Tensor]:
    """A worker transform that tells which process ran it."""
    return [torch.tensor(os.getpid())]


def test_loader_workers_serve_every_epoch_without_restarting(tiled_slide):
    """Persistent workers with endless streams: the process that made a worker's first batch also makes its
    batches of later epochs (a worker restart per pass would make the next batches wait)."""
    from exaonepath_hf.train.dino.config import DataConfig

    config = DataConfig(source=str(tiled_slide), shuffle_buffer=8, num_workers=2)
    batches, total = build_rank_loader(config, _process_id, None, batch_size=4, seed=0, rank=0, world_size=1)
    processes, epochs = {}, set()
    for _ in range(3 * total // 4 + 2):
        batch = next(batches)
        processes.setdefault(batch["worker"], set()).update(batch["crops"][0].tolist())
        epochs.add(batch["position"][0])
    assert len(epochs) >= 3 and sorted(processes) == [0, 1]
    assert all(len(pids) == 1 for pids in processes.values()) and os.getpid() not in set().union(
        *processes.values()
    )
