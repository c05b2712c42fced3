"""Execution engine of the batched Macenko normalizer: chunking, worker threads and memory reuse.

:class:`ChunkEngine` runs a chunk function (the algorithm, see ``stain_normalization.normalize_chunk``) over the
chunks of a batch of equally sized images, on worker threads, and keeps the chunk function's scratch memory
(:class:`Buffers`) and the memory of outputs the caller has freed (:class:`_OutputMemory`) for later calls.
Everything it keeps belongs to the engine instance, i.e. to the ``MacenkoNormalizer`` that owns it, and is freed
with it. One thing it registers outside the instance: every CPU output gets a ``weakref.finalize`` on the numpy
window its tensor wraps, and CPython keeps each finalizer in ``weakref.finalize``'s class-level registry, shared
by the whole process, until the output dies; the finalizer then queues the output's block for reuse and leaves
the registry. That is sound because an entry lives exactly as long as the caller's output and holds only that
output's block and the engine's queue of returned blocks, never the engine itself (an output that outlives its
engine frees its block as usual); what the engine keeps between calls is capped at ``max_cached_bytes``
(``DEFAULT_MAX_CACHED_BYTES`` unless set); in a forked child the engine drops what it inherited on first use, and
a pickled or copied engine carries only its cap; the finalizers do not run at interpreter exit. No fork hook is
installed and no process-wide setting (torch's thread counts among them) is changed.

This file is shipped with saved processors (``trust_remote_code``): it imports only the standard library and torch.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["Buffers", "ChunkEngine"]

#: What an engine keeps between calls at most, in bytes: scratch sets beyond it are dropped after their call.
DEFAULT_MAX_CACHED_BYTES = 256 << 20


def _size_class(count: int) -> int:
    """``count`` rounded up to one of 8 steps per power of two (at most 12.5% more), so that calls on images of
    about the same size share their buffers instead of each growing them a little."""
    step = 1 << max(count.bit_length() - 4, 0)
    return -(-count // step) * step


class Buffers:
    """Named scratch tensors that keep their memory from one use to the next.

    ``empty(name, shape, dtype, device)`` is ``torch.empty(shape, ...)`` served from the memory this set kept
    under ``name``, grown when too small; ``constant(name, key, make)`` returns ``make()``, computed once per
    ``key``. Fresh buffers of a few MB and more come from the OS as new pages that the kernel faults in and
    zeroes on first touch, which costs about as much as the arithmetic on them; reused ones are mapped and often
    still in cache.

    A set is used by one thread at a time; what ``empty`` returned is valid until the next ``empty`` of the same
    name. Passing a fresh ``Buffers()`` per call, or ``None`` to the algorithm's functions, is always correct.
    """

    def __init__(self) -> None:
        self._memory: dict[str, torch.Tensor] = {}
        self._constants: dict[str, tuple[Hashable, torch.Tensor]] = {}

    def empty(
        self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str
    ) -> torch.Tensor:
        count = math.prod(shape)
        memory = self._memory.get(name)
        device = torch.device(device)
        if memory is None or memory.dtype != dtype or memory.device != device or memory.numel() < count:
            # kept beyond this call: an inference tensor could not be written by a later call outside inference
            # mode, so the memory is made outside it
            with torch.inference_mode(False):
                memory = torch.empty(_size_class(count), dtype=dtype, device=device)
            self._memory[name] = memory
        return memory[:count].view(shape)

    def constant(self, name: str, key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        kept = self._constants.get(name)
        if kept is None or kept[0] != key:
            with torch.inference_mode(False):
                kept = (key, make())
            self._constants[name] = kept
        return kept[1]

    def peek(self, name: str) -> tuple[Hashable, torch.Tensor] | None:
        """The (key, tensor) that ``constant`` keeps under ``name``, or None."""
        return self._constants.get(name)

    @property
    def nbytes(self) -> int:
        tensors = [*self._memory.values(), *(tensor for _, tensor in self._constants.values())]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


ChunkFunction = Callable[[torch.Tensor, torch.Tensor, Buffers], torch.Tensor]


class _OutputMemory:
    """CPU memory for the tensors a call returns, taken back once the caller has freed every tensor that uses it.

    An output of many MB is new memory from the OS on every call (the C allocator maps large blocks fresh and
    unmaps them on free), and the kernel faults in and zeroes each page on first write: for a batch of patches
    that costs about as much as normalizing it. Here an output is a window (a numpy view) on a kept block,
    wrapped by ``torch.from_numpy``: the tensor's storage holds the window, and when the last tensor (view,
    slice) using that storage dies, the window dies and a finalizer hands the block back. A block is never
    reused while anything can still read it.

    Finalizers run in whichever thread frees the last tensor, possibly inside this class's own calls: they only
    append to a deque (atomic), which the engine drains under its lock.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []  # uint8 blocks, the least recently returned first
        self._returned: collections.deque[torch.Tensor] = collections.deque()

    def tensor(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor of ``shape`` and ``dtype`` on a returned block of its size, or a new one."""
        nbytes = math.prod(shape) * dtype.itemsize
        size = _size_class(max(nbytes, 1))
        sizes = [block.numel() for block in self._free]
        if size in sizes:
            block = self._free.pop(len(sizes) - 1 - sizes[::-1].index(size))  # the most recently returned
        else:
            # torch's allocator, not numpy's: numpy asks for transparent huge pages, whose first touch costs
            # more where the kernel compacts memory for them
            with torch.inference_mode(False):
                block = torch.empty(size, dtype=torch.uint8)
        window = block.numpy()[:nbytes]
        weakref.finalize(window, self._returned.append, block).atexit = False
        return torch.from_numpy(window).view(dtype).view(shape)

    def take_returned(self) -> None:
        while self._returned:
            self._free.append(self._returned.popleft())

    @property
    def nbytes(self) -> int:
        return sum(block.numel() for block in self._free)

    def drop_oldest(self) -> bool:
        """Free the least recently returned block; False when none is kept."""
        if not self._free:
            return False
        del self._free[0]
        return True

    def clear(self) -> None:
        self.take_returned()
        self._free.clear()


class ChunkEngine:
    """Runs ``chunk_function(images, out, buffers) -> valid [n]`` over the chunks of a batch, on CPU on worker
    threads, and keeps each worker's :class:`Buffers` and the memory of the outputs the caller has freed for the
    next call (at most ``max_cached_bytes`` in all; returned outputs are dropped first).

    Thread-safe: concurrent calls never share a set of buffers (each takes its own from the engine, or a new
    one). Fork-safe: a process forked while another thread held the engine's lock starts over with an empty
    engine instead of waiting for that lock.
    """

    def __init__(self, max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES) -> None:
        self.max_cached_bytes = int(max_cached_bytes)
        self._start_empty()

    def _start_empty(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._free: list[Buffers] = []  # sets no call is using, the most recently returned last
        self._outputs = _OutputMemory()

    def _locked(self) -> threading.Lock:
        if self._pid != os.getpid():
            # a forked child: its copy of the lock may be held forever by a thread that does not exist here, and
            # the parent's buffers would cost a page copy each on first write
            self._start_empty()
        return self._lock

    def _take(self) -> Buffers:
        with self._locked():
            return self._free.pop() if self._free else Buffers()

    def _give_back(self, buffers: Buffers) -> None:
        if buffers.nbytes > self.max_cached_bytes:  # would push out every other set, then itself
            return
        with self._locked():
            self._free.append(buffers)
            self._trim()

    def _trim(self) -> None:
        """Drop returned outputs, then the oldest scratch sets, until what is kept fits the budget (locked)."""
        self._outputs.take_returned()
        while self._kept_bytes() > self.max_cached_bytes:
            if not self._outputs.drop_oldest():
                self._free.pop(0)

    def _kept_bytes(self) -> int:
        return sum(buffers.nbytes for buffers in self._free) + self._outputs.nbytes

    def output(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A new uninitialised output tensor; on CPU from the memory of outputs the caller has freed (see
        :class:`_OutputMemory`), elsewhere from torch's allocator (a GPU's caching allocator recycles already)."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        with self._locked():
            self._trim()
            return self._outputs.tensor(shape, dtype)

    def cached_bytes(self) -> int:
        """Bytes of scratch and freed output memory kept for later calls."""
        with self._locked():
            self._outputs.take_returned()
            return self._kept_bytes()

    def empty_cache(self) -> None:
        """Hand the memory kept for later calls back to the allocator."""
        with self._locked():
            self._free.clear()
            self._outputs.clear()

    def __getstate__(self) -> dict:
        # pickled with its normalizer (e.g. into DataLoader workers) or deep-copied with a processor: buffers and
        # the lock stay behind
        return {"max_cached_bytes": self.max_cached_bytes}

    def __setstate__(self, state: dict) -> None:
        self.max_cached_bytes = state["max_cached_bytes"]
        self._start_empty()

    def run_many(
        self,
        groups: Sequence[tuple[torch.Tensor | Sequence[torch.Tensor], int]],
        chunk_function: ChunkFunction,
        then: Callable[[torch.Tensor], torch.Tensor] | None = None,
        output_per_chunk: bool = False,
    ) -> list[tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]]:
        """Apply ``chunk_function`` to chunks of at most ``per_chunk`` images of each group ``(images, per_chunk)``:
        [N, 3, H, W], or N equally sized 3×H×W images, stacked chunk by chunk into kept memory, never all at
        once; the groups all on one device. The chunks of every group share the workers, largest first, so that
        a few small groups of mixed-size inputs do not leave a worker idle each.

        Returns per group (the float32 outputs [N, 3, H, W], or ``then``'s outputs of the chunks concatenated;
        valid [N]). With ``output_per_chunk`` the outputs are a list of per-chunk tensors instead of one batch
        tensor, so that the caller can free them one by one.
        """
        jobs = [_Job(images, per_chunk, then, output_per_chunk, self.output) for images, per_chunk in groups]
        tasks = [(job, index) for job in jobs for index in range(len(job.chunks))]
        # the longest chunks first: the last ones to finish are then short, and the workers end together
        tasks.sort(key=lambda task: -task[0].chunk_pixels(task[1]))

        def run_task(position: int, buffers: Buffers) -> None:
            job, index = tasks[position]
            job.run_chunk(index, buffers, chunk_function)

        self._run_chunks(run_task, len(tasks), jobs[0].device)
        return [(job.outputs, job.valid) for job in jobs]

    def _run_chunks(
        self, run_chunk: Callable[[int, Buffers], None], count: int, device: torch.device
    ) -> None:
        """``run_chunk(i, buffers)`` for every i < count: on CPU on up to ``torch.get_num_threads()`` worker
        threads that each hold one set of buffers, elsewhere in the caller's thread (a GPU runs each op in
        parallel already).

        The workers keep torch's intra-op setting: ``torch.set_num_threads(1)`` in them would change a
        process-wide setting (BLAS, and the default of every thread started meanwhile) under other threads'
        feet. They do not need it: the dominant steps, numpy's selections, are single-threaded anyway, and
        workers with one intra-op thread measured no faster than with the default on the development machine.
        With several chunks all of them go to workers, none to the caller, whose intra-op pool would otherwise
        run in between.
        """
        workers = min(torch.get_num_threads(), count) if device.type == "cpu" else 1
        next_chunk = iter(range(count))
        next_lock = threading.Lock()

        def work() -> None:
            buffers = self._take()
            try:
                while True:
                    with next_lock:
                        index = next(next_chunk, None)
                    if index is None:
                        return
                    run_chunk(index, buffers)
            finally:
                self._give_back(buffers)

        if workers <= 1:
            work()
            return
        # grad and inference modes are thread-local: the workers take the caller's, or tensors created under the
        # caller's torch.inference_mode() could not be written by them
        inference_mode = torch.is_inference_mode_enabled()

        def work_in_callers_mode() -> None:
            with torch.inference_mode(inference_mode), torch.no_grad():
                work()

        with ThreadPoolExecutor(workers, thread_name_prefix="macenko") as pool:
            for future in [pool.submit(work_in_callers_mode) for _ in range(workers)]:
                future.result()


class _Job:
    """One group of equally sized images of :meth:`ChunkEngine.run_many`: its chunks, outputs and flags."""

    def __init__(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        per_chunk: int,
        then: Callable[[torch.Tensor], torch.Tensor] | None,
        output_per_chunk: bool,
        new_output: Callable[[Sequence[int], torch.dtype, torch.device], torch.Tensor],
    ) -> None:
        self.images, self.then, self.new_output = images, then, new_output
        count, self.shape = len(images), tuple(images[0].shape)
        self.device = images[0].device
        self.chunks = [slice(start, min(start + per_chunk, count)) for start in range(0, count, per_chunk)]
        self.valid = torch.empty(count, dtype=torch.bool, device=self.device)
        self.outputs: list | torch.Tensor | None = None
        if output_per_chunk and then is None:
            self.outputs = [None] * len(self.chunks)
        elif then is None:
            self.outputs = new_output((count, *self.shape), torch.float32, self.device)
        self._lock = threading.Lock()

    def chunk_pixels(self, index: int) -> int:
        chunk = self.chunks[index]
        return (chunk.stop - chunk.start) * math.prod(self.shape)

    def run_chunk(self, index: int, buffers: Buffers, chunk_function: ChunkFunction) -> None:
        chunk, images = self.chunks[index], self.images
        shape = (chunk.stop - chunk.start, *self.shape)
        if isinstance(images, torch.Tensor):
            part = images[chunk]
        else:
            stacked = buffers.empty("stacked", shape, images[0].dtype, self.device)
            part = torch.stack(images[chunk], out=stacked)
        if self.then is None:
            if isinstance(self.outputs, list):
                out = self.outputs[index] = self.new_output(shape, torch.float32, self.device)
            else:
                out = self.outputs[chunk]
            self.valid[chunk] = chunk_function(part, out, buffers)
            return
        normalized = buffers.empty("normalized", shape, torch.float32, self.device)
        self.valid[chunk] = chunk_function(part, normalized, buffers)
        result = self.then(normalized)
        with self._lock:
            if self.outputs is None:  # `then`'s output shape is known once its first chunk is done
                self.outputs = self.new_output(
                    (len(self.valid), *result.shape[1:]), result.dtype, result.device
                )
        self.outputs[chunk] = result
