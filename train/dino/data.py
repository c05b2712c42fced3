"""Streaming patch data for DINO: every rank and loader worker reads its own shards exactly once.

Sources (all read through `datasets`, streaming): a local folder of images, an `exaonepath-tile` output
folder or any parquet glob, webdataset `.tar` shards, or a hub dataset id. The pipeline per image, in the
loader workers: read bytes → decode (an unreadable image is skipped, logged and counted) → Macenko with the
package normalizer (p = 1; a fallback returns the image unchanged and is counted) → DINO multi-crop. With
`data.augment_on: gpu` the workers stop after decoding and the rest runs on the device (`gpu_augment`).

Distribution: `split_dataset_by_node` gives each rank its shards and `datasets` gives each worker a subset of
those; the loader is *not* passed to `accelerator.prepare` (that would shard a second time). Each worker's
stream is endless (it starts its next epoch itself), so ranks never run out at different steps; the price:
near an epoch boundary one worker may already show patches of the next epoch while another finishes the
current one. Every example's augmentation is seeded from its position, so a run resumes exactly: the
checkpoint stores each worker's position and the next worker in the loader's round-robin (`StreamState`).

Shuffling: the shard order is reshuffled every epoch (`shuffle_shards`) and each worker's examples go through a
buffer of `data.shuffle_buffer` that reads one example per example it yields (`steady_shuffle`), fed by one
shard at a time. Not through `datasets`' buffer, which reads a whole buffer before its first example and half
of one between bursts: the worker stalls meanwhile, and the round-robin loader waits for it. Not by several
interleaved shards (`datasets`' default): that path ends every pass over parquet shards with a sleep of
`datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN` seconds, which a small corpus (a demo, a fine-tuning set)
pays every few steps with the cores idle.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from ...images import IMAGE_SUFFIXES, decode_rgb, image_files, source_name
from ...tiling.output import resolve_shards, tiling_output_folder
from ...tiling.slide_io import SLIDE_SUFFIXES
from .shuffle import steady_shuffle

__all__ = [
    "SOURCE_KINDS",
    "build_rank_loader",
    "check_source",
    "OrderedBatches",
    "PatchSource",
    "PatchStream",
    "StreamState",
    "count_samples",
    "decode_image",
    "load_pretraining_patches",
    "resolve_source",
    "shuffle_shards",
]

logger = logging.getLogger(__name__)

_DATASETS_BUFFER = 32  # examples; see `shuffle_shards`


@dataclass(frozen=True)
class PatchSource:
    """Where the patches come from: `kind` is imagefolder, parquet, webdataset or hub."""

    kind: str
    files: tuple[str, ...] = ()
    hub_id: str | None = None


#: What `data.source` takes, for the errors that say what to pass.
SOURCE_KINDS = "a folder of images, an exaonepath-tile output folder, a parquet or webdataset .tar glob, or a hub dataset id"


def check_source(source: str) -> None:
    """Raises ValueError, naming what to pass instead, when `data.source` is unset, is a path that does not exist
    or is a slide; cheap (no listing), so that a run checks it before building anything."""
    if not source:
        raise ValueError(
            f"data.source is not set: add data.source=PATCHES to the command, where PATCHES is {SOURCE_KINDS} "
            "(to try it: exaonepath-tile a slide, e.g. the package's sample slide, and pass its --out folder)"
        )
    path = Path(source).expanduser()
    if path.suffix.lower() in set(SLIDE_SUFFIXES) - set(IMAGE_SUFFIXES):  # a .tif may be a patch
        raise ValueError(
            f"data.source {source} is a slide: tile it first (exaonepath-tile {source} --out tiles) "
            "and pass data.source=tiles"
        )
    if source.startswith((".", "/", "~")) and not (path.exists() or glob.has_magic(source)):
        raise ValueError(f"data.source {source} does not exist: pass {SOURCE_KINDS}")


def resolve_source(source: str) -> PatchSource:
    """What `data.source` names: a tiling output, a folder or glob of shards or images, or a hub dataset id."""
    check_source(source)
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_source(path, source)
    if path.is_file() or glob.has_magic(source):
        return _files_source(sorted(glob.glob(str(path), recursive=True)), source)
    return PatchSource("hub", hub_id=source)


def _folder_source(path: Path, source: str) -> PatchSource:
    if tiling_output_folder(path) is not None:
        files = resolve_shards(path)
        if not files:
            raise ValueError(f"data.source {source}: the tiling manifest lists no shards")
        return PatchSource("parquet", tuple(files))
    for pattern, kind in (
        ("shards/*.parquet", "parquet"),
        ("**/*.parquet", "parquet"),
        ("**/*.tar", "webdataset"),
    ):
        files = sorted(str(p) for p in path.glob(pattern))
        if files:
            # tiling outputs inside the folder contribute the shards of their complete slides only
            return PatchSource(kind, tuple(resolve_shards(files) if kind == "parquet" else files))
    images = [str(p) for p in image_files(path)]
    if not images:
        raise ValueError(f"data.source {source} holds no images ({', '.join(IMAGE_SUFFIXES)}) nor shards")
    return PatchSource("imagefolder", tuple(images))


def _files_source(files: list[str], source: str) -> PatchSource:
    if not files:
        raise ValueError(f"data.source {source} matches no file")
    suffixes = {Path(f).suffix.lower() for f in files}
    if suffixes == {".parquet"}:
        # a glob over a tiling output's shards/ must not reach the shards of slides the tiler never completed
        return PatchSource("parquet", tuple(resolve_shards(files)))
    if suffixes == {".tar"}:
        return PatchSource("webdataset", tuple(files))
    if suffixes <= set(IMAGE_SUFFIXES):
        return PatchSource("imagefolder", tuple(files))
    raise ValueError(f"data.source {source} mixes or holds unsupported files ({sorted(suffixes)})")


def _image_paths(shards: list[list[str]]) -> Iterator[dict[str, Any]]:
    for shard in shards:
        for path in shard:
            yield {"image": {"path": path, "bytes": None}}


def load_pretraining_patches(
    source: PatchSource, split: str = "train", image_column: str | None = None, shard_multiple: int = 1
):
    """A streaming `datasets.IterableDataset` whose image column is left undecoded (decoded in `PatchStream`).

    Image folders are cut into a multiple of `shard_multiple` (world size x loader workers) shards of files when
    there are enough files, so that ranks and workers split shards, not examples.
    Returns the dataset and the name of its image column.
    """
    if source.kind == "imagefolder":
        # `load_dataset("imagefolder", streaming=True)` makes a single shard: one worker per rank, and every
        # rank would read every file.
        files = list(source.files)
        num_shards = len(files) // shard_multiple * shard_multiple or len(files)
        shards = [list(chunk) for chunk in np.array_split(np.array(files, dtype=object), num_shards)]
        features = datasets.Features({"image": datasets.Image(decode=False)})
        dataset = datasets.IterableDataset.from_generator(
            _image_paths, gen_kwargs={"shards": shards}, features=features
        )
        return dataset, "image"
    if source.kind in ("parquet", "webdataset"):
        dataset = datasets.load_dataset(
            source.kind, data_files=list(source.files), split="train", streaming=True
        )
    else:
        dataset = _load_hub_dataset(source.hub_id, split)
    features = dataset.features or {}
    if image_column is None:
        image_column = next(
            (name for name, feat in features.items() if isinstance(feat, datasets.Image)), None
        )
    if image_column is None or image_column not in features:
        raise ValueError(
            f"no image column found in {source.hub_id or source.files[0]} (columns: {list(features)}); "
            "set data.image_column"
        )
    return dataset.cast_column(image_column, datasets.Image(decode=False)), image_column


def _load_hub_dataset(hub_id: str, split: str):
    """The streaming hub dataset `hub_id`; a name that is neither a local path nor a reachable dataset (often
    a folder the user has not made yet, e.g. `tiles`) is one ValueError saying so."""
    try:
        return datasets.load_dataset(hub_id, split=split, streaming=True)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ValueError(
            f"data.source {hub_id} is neither a file or folder in {Path.cwd()} nor a hub dataset to be had ({error}); "
            f"pass {SOURCE_KINDS}"
        ) from None


def shuffle_shards(dataset, seed: int):
    """`dataset` with its shards in a seeded order, reshuffled every epoch (`set_epoch`); the examples are
    shuffled by `PatchStream` (`steady_shuffle`). `datasets`' own buffer stays a few examples long: its bursts
    are then short, and it still hands parquet rows over in batches of that size rather than one by one.

    Shards are read one at a time (`max_buffer_input_shards=1`): `datasets` interleaves several shards
    through `CyclingMultiSourcesExamplesIterable`, which sleeps at the end of every pass over parquet shards
    (its guard for apache/arrow#45214, needed only for the reader threads of that interleaving). A
    `data.shuffle_buffer` larger than a shard still mixes several shards (slides) once it is full.
    """
    return dataset.shuffle(seed=seed, buffer_size=_DATASETS_BUFFER, max_buffer_input_shards=1)


def count_samples(source: PatchSource) -> int | None:
    """Number of patches, read from file listings and parquet footers; None when unknown without a full pass."""
    if source.kind == "imagefolder":
        return len(source.files)
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(f).metadata.num_rows for f in source.files)
    return None


def decode_image(value: dict[str, Any]) -> torch.Tensor:
    """A `datasets.Image(decode=False)` value (bytes and/or path) → uint8 tensor 3×H×W (see `decode_rgb`)."""
    return torch.from_numpy(decode_rgb(value)).permute(2, 0, 1).contiguous()


def _example_id(example: dict[str, Any], image_column: str) -> str:
    if "slide_id" in example and "x" in example and "y" in example:
        return f"{example['slide_id']}@{example.get('level', 0)}:{example['x']},{example['y']}"
    if "__key__" in example:  # webdataset: the sample key inside its shard
        return f"{example.get('__url__', '')}#{example['__key__']}"
    value = example[image_column]
    if value.get("path"):
        return str(value["path"])
    return hashlib.blake2b(value["bytes"], digest_size=12).hexdigest()


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Normalized chunk (float 0..1, already clamped) → uint8, run by the normalizer on its kept chunk buffer:
    in place there, so no fresh float image is allocated (and page-faulted) per example. On CPU the cast goes
    through numpy, whose float -> uint8 cast is vectorized where torch's is not (torch 2.14) and costs a large
    share of the normalization itself; the values are integers in 0..255 by then, so both casts agree."""
    if images.device.type != "cpu":
        return images.mul_(255).round_().to(torch.uint8)
    array = images.numpy()
    np.rint(np.multiply(array, 255, out=array), out=array)
    return torch.from_numpy(array.astype(np.uint8))


def _stack_if_one_size(images: tuple[torch.Tensor, ...]) -> torch.Tensor | list[torch.Tensor]:
    """One batch tensor, or the list of images where their sizes differ (decoded images of a mixed source)."""
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(images)
    return list(images)


def _example_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class StreamState:
    """Where a rank's data stream stands: per loader worker (epoch, examples read in that epoch), and the
    worker whose batch comes next. Valid only for the same world size and number of workers."""

    num_workers: int
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    next_worker: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "positions": {str(k): list(v) for k, v in self.positions.items()},
            "next_worker": self.next_worker,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StreamState:
        positions = {int(k): (int(v[0]), int(v[1])) for k, v in state["positions"].items()}
        return cls(int(state["num_workers"]), positions, int(state["next_worker"]))


class PatchStream(torch.utils.data.IterableDataset):
    """One rank's endless stream of collated multi-crop batches (use with `DataLoader(batch_size=None)`).

    Each yielded batch: `crops` (one entry per output of `transform`: for `DINOMultiCrop`, `num_crops` float
    tensors B×3×h×w; images of several sizes come as a list instead of a tensor), `ids`, `worker`, `position`,
    `seed`, `macenko_fallbacks` and `unreadable` (counts since the worker's previous batch). The examples of every
    epoch pass through a `steady_shuffle` buffer of `shuffle_buffer` examples.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        image_column: str,
        transform: Callable[[torch.Tensor], list[torch.Tensor]],
        batch_size: int,
        seed: int,
        rank: int = 0,
        normalizer: Any = None,
        start: StreamState | None = None,
        shuffle_buffer: int = 0,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.image_column = image_column
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.normalizer = normalizer
        self.start = start
        self.shuffle_buffer = shuffle_buffer

    def _examples(self, worker: int, num_workers: int) -> Iterator[tuple[tuple[int, int], dict | None]]:
        """(position after the example, example) forever; raw examples, skipping to the resume position."""
        epoch, skip = 0, 0
        if self.start is not None and self.start.num_workers == num_workers:
            epoch, skip = self.start.positions.get(worker, (0, 0))
        while True:
            self.dataset.set_epoch(epoch)
            index = 0
            rng = np.random.default_rng([self.seed, self.rank, worker, epoch])
            for example in steady_shuffle(self.dataset, self.shuffle_buffer, rng):
                index += 1
                if index <= skip:  # undecoded: cheap
                    continue
                yield (epoch, index), example
            if index == 0:
                raise RuntimeError(
                    f"rank {self.rank} loader worker {worker}: its shards are empty; use at least "
                    "world_size x num_workers shards (or fewer data.num_workers)"
                )
            epoch, skip = epoch + 1, 0

    def _process(self, example: dict, position: tuple[int, int], worker: int) -> tuple[list, bool] | None:
        image_value = example[self.image_column]
        try:
            image = decode_image(image_value)
        except Exception as error:  # any decoder failure: one bad file must not end the run
            logger.warning("skipping unreadable image %s: %s", source_name(image_value), error)
            return None
        fallback = False
        if self.normalizer is not None:
            output = self.normalizer.normalize(image.unsqueeze(0), then=_to_uint8)
            fallback = not bool(output.normalized[0])
            image = output.images[0]
        generator = torch.random.default_generator
        state = generator.get_state()
        generator.manual_seed(_example_seed(self.seed, self.rank, worker, *position))
        try:
            crops = self.transform(image)
        finally:
            generator.set_state(state)  # the training RNG (drop path) must not depend on the data
        return crops, fallback

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        crops, ids = [], []
        fallbacks = unreadable = 0
        epoch, readable_this_epoch, barren_epochs = None, 0, 0
        for position, example in self._examples(worker, num_workers):
            if position[0] != epoch:  # a new epoch: were the previous ones all unreadable?
                barren_epochs = barren_epochs + 1 if epoch is not None and not readable_this_epoch else 0
                if barren_epochs >= 2:  # two in a row, so at least one whole pass over the shards
                    raise RuntimeError(
                        f"rank {self.rank} loader worker {worker}: no readable image in a whole pass over "
                        "its shards; check the data (see the 'skipping unreadable image' warnings)"
                    )
                epoch, readable_this_epoch = position[0], 0
            processed = self._process(example, position, worker)
            if processed is None:
                unreadable += 1
                continue
            readable_this_epoch += 1
            crops.append(processed[0])
            fallbacks += processed[1]
            ids.append(_example_id(example, self.image_column))
            if len(crops) == self.batch_size:
                yield {
                    "crops": [_stack_if_one_size(view) for view in zip(*crops, strict=True)],
                    "ids": ids,
                    "worker": worker,
                    "position": position,
                    # for randomness drawn after the loader (`data.augment_on: gpu`): resumes exactly too
                    "seed": _example_seed(self.seed, self.rank, worker, *position),
                    "macenko_fallbacks": fallbacks,
                    "unreadable": unreadable,
                }
                crops, ids = [], []
                fallbacks = unreadable = 0


class OrderedBatches:
    """Yields a rank's batches in a fixed worker round-robin and records how far each worker was consumed.

    A `DataLoader` always starts its round-robin at worker 0; after a resume the next batch must come from the
    worker recorded in the checkpoint, so batches that arrive early wait here (at most one per worker).
    """

    def __init__(self, loader: torch.utils.data.DataLoader, state: StreamState) -> None:
        self.loader = loader
        self.state = state
        self._buffers: dict[int, deque] = {w: deque() for w in range(max(state.num_workers, 1))}
        self._iterator: Iterator | None = None

    def __iter__(self) -> OrderedBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        wanted = self.state.next_worker
        while not self._buffers[wanted]:
            batch = next(self._iterator)
            self._buffers[batch["worker"]].append(batch)
        batch = self._buffers[wanted].popleft()
        self.state.positions[wanted] = tuple(batch["position"])
        self.state.next_worker = (wanted + 1) % max(self.state.num_workers, 1)
        return batch


def build_rank_loader(
    config,
    transform: Callable[[torch.Tensor], list[torch.Tensor]],
    normalizer: Any,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    saved_streams: list[dict[str, Any]] | None = None,
    pin_memory: bool = False,
) -> tuple[OrderedBatches, int | None]:
    """This rank's batches over its own shards, resumed from `saved_streams` (every rank's `StreamState`).

    `config` is the run's `DataConfig`. The loader is never passed to `accelerator.prepare`: that would shard
    the already split stream a second time. Returns the batches and the number of samples per epoch (None if
    unknown).
    """
    from datasets.distributed import split_dataset_by_node

    source = resolve_source(config.source)
    dataset, image_column = load_pretraining_patches(
        source, config.split, config.image_column, shard_multiple=world_size * max(config.num_workers, 1)
    )
    dataset = shuffle_shards(dataset, seed)
    shards = dataset.num_shards
    if shards % world_size:
        logger.warning(
            "%d shards do not divide among %d processes: every rank reads all shards and keeps 1 example in %d",
            shards, world_size, world_size,
        )  # fmt: skip
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    rank_shards = shards if shards % world_size else shards // world_size
    num_workers = min(config.num_workers, rank_shards)
    if num_workers < config.num_workers:
        logger.warning("only %d shards per rank: using %d loader workers", rank_shards, num_workers)

    state, resumed = StreamState(max(num_workers, 1)), False
    if saved_streams and len(saved_streams) == world_size:
        saved = StreamState.from_dict(saved_streams[rank])
        if saved.num_workers == state.num_workers:
            state, resumed = saved, True
    if saved_streams and not resumed:
        logger.warning("world size or loader workers changed since the checkpoint: the data order restarts")
    stream = PatchStream(
        dataset, image_column, transform, batch_size, seed, rank, normalizer,
        start=StreamState.from_dict(state.to_dict()),  # a copy: `OrderedBatches` advances `state`
        shuffle_buffer=config.shuffle_buffer,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=config.prefetch_factor if num_workers else None,
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),  # its seed draw must not consume the training RNG (exact resume)
    )
    return OrderedBatches(loader, state), config.num_samples or count_samples(source)
