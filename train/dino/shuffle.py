"""A shuffle buffer that reads at a steady pace: one example per example it yields, never a burst of reads."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

__all__ = ["steady_shuffle"]

T = TypeVar("T")


def steady_shuffle(examples: Iterable[T], buffer_size: int, rng: np.random.Generator) -> Iterator[T]:
    """`examples` in random order, mixed through a buffer of up to `buffer_size` of them; at the end the buffer
    drains in random order.

    Once the buffer is full every output costs one read; while it fills, two (so the first output comes after
    the second read and the buffer is full after `buffer_size` outputs). `datasets`' own buffer instead reads
    `buffer_size` examples before its first output and then half of them again between bursts of outputs: a
    loader worker stalls that long, and the round-robin loader with it. Deterministic for a seeded `rng`.
    """
    buffer: list[T] = []
    source = iter(examples)
    for example in source:
        buffer.append(example)
        if len(buffer) < buffer_size:
            buffer.extend(itertools.islice(source, 1))
        index = int(rng.integers(len(buffer)))
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        yield buffer.pop()
    for index in rng.permutation(len(buffer)):
        yield buffer[index]
