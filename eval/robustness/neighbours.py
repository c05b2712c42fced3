"""Exact cosine nearest neighbours over one feature matrix, as an object that keeps its searches.

A :class:`NeighbourIndex` is built once on [N, D] features (checked, L2-normalized inside) and asked for every
sample's k nearest other samples, optionally leaving out the sample's own group (case, slide): blocked matrix
products on the features' device (CPU or GPU), equal similarities ordered by the lower sample index. On the CPU
from 16,384 samples the fast path of `fast_search` finds the same neighbours several times faster (bfloat16
products, a candidate set proven complete by their error bound, float64 similarities for the candidates; the
float32 products of the plain search can misorder similarities closer than their rounding, the float64 ones
cannot). The index keeps the candidate lists of its fast searches: a later question on the same index (a smaller
k, the ranks of paired retrieval between the groups the lists were partitioned by) reads them instead of
searching again. They live as long as the index; build one per feature matrix and pass it to every metric.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import fast_search
from .checks import group_codes, per_sample, unit_features

__all__ = ["NeighbourIndex"]

# below this many samples the plain search is fast enough (and every test of the plain path stays on it)
_FAST_SEARCH_MIN_SAMPLES = 16384


class NeighbourIndex:
    """Exact cosine k-nearest neighbours of the samples of ``features`` ([N, D] torch tensor on any device, or a
    numpy array; L2-normalized inside, float64 kept as float64, float32 otherwise; NaN, infinite values and
    fewer than 2 samples raise ValueError).

    ``block`` bounds the query rows of one matrix product (fewer for large N, to bound the block's memory);
    ``fast_path`` False keeps every search on the plain float32 products (a baseline). The index is not
    thread-safe: it adds to its kept searches as it answers.
    """

    def __init__(self, features: Any, block: int = 4096, fast_path: bool = True) -> None:
        if block < 1:
            raise ValueError(f"block must be positive, got {block}")
        self.unit = unit_features(features)
        self.block = block
        self.fast_path = fast_path
        self._searches: list[fast_search.Search] = []

    def __len__(self) -> int:
        return self.unit.shape[0]

    def subset(self, rows: Sequence[int] | np.ndarray) -> NeighbourIndex:
        """An index on these rows of this one (the same unit vectors, in the order of ``rows``), with no kept
        searches."""
        part = copy.copy(self)
        part.unit = self.unit[torch.as_tensor(np.asarray(rows), dtype=torch.int64, device=self.unit.device)]
        part._searches = []
        return part

    def top_k(self, k: int, exclude_groups: Any = None, partition: Any = None) -> np.ndarray:
        """Indices [N, k] of each sample's k most cosine-similar other samples, nearest first.

        The sample itself is always left out; with ``exclude_groups`` (one group id per sample: case, slide)
        also every sample of the query's own group. Equal similarities are ordered by the lower sample index,
        both inside the k and at the k-th place, so the result is deterministic. Raises ValueError when some
        query has fewer than k candidates.

        ``partition`` (one id per sample, e.g. the centre) does not change the result: the fast path keeps its
        lists per partition group, so that they also serve `counterpart_ranks` between those groups.
        """
        n = len(self)
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        exclude = (
            None if exclude_groups is None else group_codes(per_sample(exclude_groups, "exclude_groups", n))
        )
        fewest = n - 1 if exclude is None else n - int(np.bincount(exclude).max())
        if fewest < k:
            what = "other samples" if exclude is None else "samples outside its own group (exclude_groups)"
            raise ValueError(f"k={k} neighbours requested, but some query has only {fewest} {what}")
        groups = None if partition is None else group_codes(per_sample(partition, "partition", n))
        if self._takes_fast_path(n):
            search = self._search(k, groups, exclude)
            found = None if search is None else fast_search.exact_top_k(self.unit, search, k)
            if found is not None:
                return found
        return _plain_top_k(self.unit, k, exclude, self.block)

    def counterpart_ranks(
        self, tiles: np.ndarray, conditions: Any, k: int
    ) -> dict[tuple[int, int], torch.Tensor] | None:
        """For every pair (a, b) of rows of ``tiles`` ([C, m] sample indices: condition by pair id, every pair id
        under every condition), each tile's number of pool samples ranked before its counterpart: exact below k,
        k or more otherwise (the m tiles of a, then those of b; see `fast_search.counterpart_ranks`).

        From the fast path only: the kept lists of a search over all samples partitioned by ``conditions`` (one
        per sample), such as the robustness index's by centre, else a search of the paired tiles of its own.
        None where the fast path does not apply: search the pools one by one (`subset`, `top_k`) instead.
        """
        num_conditions, m = tiles.shape
        if not self._takes_fast_path(tiles.size):
            return None
        groups = group_codes(per_sample(conditions, "conditions", len(self)))
        search = self._kept_for_pools(k, groups) if tiles.size == len(self) else None
        if search is not None:
            return fast_search.counterpart_ranks(self.unit, search, tiles, groups[tiles[:, 0]])
        # a search of its own over the paired tiles only, condition by condition, leaving out the tile itself
        pool = self.subset(tiles.reshape(-1))
        search = pool._search(k, np.repeat(np.arange(num_conditions), m), None)
        if search is None:
            return None
        pool_tiles = np.arange(tiles.size).reshape(num_conditions, m)
        return fast_search.counterpart_ranks(pool.unit, search, pool_tiles, np.arange(num_conditions))

    def _takes_fast_path(self, size: int) -> bool:
        return (
            self.fast_path
            and size >= _FAST_SEARCH_MIN_SAMPLES
            and fast_search.approximate_dtype(self.unit.device) is not None
        )

    def _search(
        self, k: int, groups: np.ndarray | None, exclude: np.ndarray | None
    ) -> fast_search.Search | None:
        """A kept search with these column groups and exclusion groups and lists for k or more, else a new one
        (kept when the fast path could run it)."""
        wanted = np.zeros(len(self), dtype=np.int64) if groups is None else groups
        for search in self._searches:
            same_exclude = (search.exclude is None and exclude is None) or (
                search.exclude is not None and exclude is not None and np.array_equal(search.exclude, exclude)
            )
            if search.k >= k and same_exclude and np.array_equal(search.groups, wanted):
                return search
        search = fast_search.approximate_search(self.unit, k, groups, exclude, self.block)
        if search is not None:
            self._searches.append(search)
        return search

    def _kept_for_pools(self, k: int, groups: np.ndarray) -> fast_search.Search | None:
        """A kept search that serves the pools of `counterpart_ranks`: these column groups, lists for k or more,
        and no exclusion groups so large that comparing their members costs as much as a search."""
        n = len(self)
        for search in sorted(self._searches, key=lambda s: s.exclude is not None):
            if search.k < k or not np.array_equal(search.groups, groups):
                continue
            if (
                search.exclude is None
                or (np.bincount(search.exclude).astype(np.float64) ** 2).sum() <= n**2 / 4
            ):
                return search
        return None


def _plain_top_k(unit: torch.Tensor, k: int, exclude: np.ndarray | None, block: int) -> np.ndarray:
    """`NeighbourIndex.top_k` by float32 products of ``block`` query rows with every sample, and a top-k."""
    n = unit.shape[0]
    device = unit.device
    if exclude is None:
        order = torch.arange(n, device=device)
        group_columns, group_of_query = None, None
    else:
        sizes = np.bincount(exclude)
        # queries run group by group, so that a block's own-group columns are a few index lists
        order_np = np.argsort(exclude, kind="stable")
        order = torch.as_tensor(order_np, device=device)
        group_of_query = exclude[order_np]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        group_columns = [order[starts[g] : starts[g + 1]] for g in range(len(sizes))]
    rows_per_block = max(1, min(block, fast_search.MAX_BLOCK_VALUES // n))
    result = torch.empty(n, k, dtype=torch.int64, device=device)
    for start in range(0, n, rows_per_block):
        queries = order[start : start + rows_per_block]
        similarity = unit[queries] @ unit.T
        if group_columns is None:
            similarity[torch.arange(len(queries), device=device), queries] = -torch.inf
        else:
            block_groups = group_of_query[start : start + len(queries)]
            for group in np.unique(block_groups):
                rows = np.flatnonzero(block_groups == group)  # contiguous: queries are sorted by group
                similarity[rows[0] : rows[-1] + 1].index_fill_(1, group_columns[group], -torch.inf)
        result[queries] = _top_k_by_index(similarity, k)
    return result.cpu().numpy()


def _top_k_by_index(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k largest values per row, ordered by (value desc, index asc)."""
    # k < N always (the sample itself is a column), so a (k+1)-th value exists; topk picks arbitrarily among
    # values equal to the k-th, and a (k+1)-th equal to it marks the rows where that choice matters
    values, indices = similarity.topk(k + 1, dim=1)
    tied = torch.nonzero(values[:, k] == values[:, k - 1]).flatten()
    values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
    rows_per_chunk = max(1, fast_search.MAX_BLOCK_VALUES // 8 // similarity.shape[1])
    for chunk in tied.split(rows_per_chunk):
        rows = similarity[chunk]
        kth = values[chunk, k - 1 : k]
        above = rows > kth
        # the lowest-indexed of the values equal to the k-th fill the places the larger values leave
        equal = rows == kth
        wanted = equal & (equal.cumsum(dim=1) <= (k - above.sum(dim=1, keepdim=True)))
        chosen = torch.nonzero(above | wanted)[:, 1].view(len(chunk), k)
        indices[chunk] = chosen
        values[chunk] = rows.gather(1, chosen)
    # order inside the k: by index first, then (stably) by value, so equal values keep ascending indices
    by_index = indices.sort(dim=1).indices
    indices, values = indices.gather(1, by_index), values.gather(1, by_index)
    by_value = values.sort(dim=1, descending=True, stable=True).indices
    return indices.gather(1, by_value)
