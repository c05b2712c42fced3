"""Does an encoder follow the tissue or the site? The field's metrics, as functions of features you already have.

Every function takes ``features`` ([N, D] torch tensor on any device, or a numpy array) and per-sample arrays
(strings or ints: biological ``labels``, ``centers`` = site / lab / scanner, ``case_ids`` / ``slide_ids``,
``pair_ids``). Cosine similarity is meant everywhere: features are L2-normalized inside. Neighbour search is one
helper, :func:`nearest_neighbours`: cosine kNN by blocked matrix products on the features' device (CPU or GPU),
optionally leaving out each query's own group, ties broken by the lower sample index. On the CPU from 16,384
samples an exact fast path finds the same neighbours several times faster (bfloat16 products, a candidate set
proven complete by their error bound, float64 similarities for the candidates), and the robustness index leaves
its lists to paired retrieval on the same features object. Undefined results are ``None`` with a ``reason``
(never NaN); bad input raises ``ValueError`` naming it.

- :func:`robustness_index` (PathoROB: Kömen et al., arXiv 2507.17845; first form in de Jong et al., arXiv
  2501.18055): among each query's k nearest samples of other cases, the share of "same class, other centre"
  among "same class, other centre" plus "other class, same centre". 1 = features follow the tissue, 0 = the site.
- :func:`clustering_score` (PathoROB): ARI(k-means, class) - ARI(k-means, centre), k by cosine silhouette.
- :func:`paired_retrieval` (PLISM, owkin ``plism-benchmark``): the same tile under two conditions; cosine of
  the pair and top-k retrieval of the counterpart, median over condition pairs.
- :func:`within_cross_gap` (PANDA-PLUS-Bench, arXiv 2512.14922, "WSI-specific feature collapse"): kNN class
  accuracy within a slide minus leave-one-slide-out, and the own slide's share of the nearest neighbours.
- :func:`slide_identity_knn` and :func:`between_group_variance_share`: the package's earlier collapse measures
  (they do not condition on the class, so a good encoder also scores high where classes differ by slide).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "ClusteringScore",
    "PairedRetrieval",
    "RobustnessIndex",
    "WithinCrossGap",
    "between_group_variance_share",
    "clustering_score",
    "nearest_neighbours",
    "paired_retrieval",
    "robustness_index",
    "slide_identity_knn",
    "within_cross_gap",
]

# a block of the similarity matrix holds at most this many values (256 MB in float32), whatever `block` says
_MAX_BLOCK_VALUES = 1 << 26
# silhouettes are O(N^2): scored on a seeded sample of at most this many samples (exact below it)
_SILHOUETTE_SAMPLE = 10_000
# bootstrap replicates are drawn in chunks of at most this many indices
_BOOTSTRAP_CHUNK_VALUES = 1 << 22


class _Result:
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: floats, ints, strings, None, lists of dicts of those."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------- input checks


def _unit_features(features: Any, name: str = "features") -> torch.Tensor:
    """L2-normalized [N, D] float tensor on the features' device (float64 stays float64)."""
    x = torch.as_tensor(features.detach() if isinstance(features, torch.Tensor) else np.asarray(features))
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d [N, D] array, got shape {tuple(x.shape)}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(
            f"{name} needs at least 2 samples of at least 1 dimension, got shape {tuple(x.shape)}"
        )
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers, got {x.dtype}")
    x = x.double() if x.dtype == torch.float64 else x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contain NaN or infinite values; check the feature extraction")
    return torch.nn.functional.normalize(x, dim=1)


def _per_sample(values: Any, name: str, n: int) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.ndim != 1 or len(array) != n:
        raise ValueError(f"{name} must hold one value per sample ({n}), got shape {array.shape}")
    return array


def _codes(values: np.ndarray) -> np.ndarray:
    """Integer codes 0..G-1 of the distinct values (mixed-type object arrays compared as strings)."""
    if values.dtype == object:
        values = values.astype(str)
    return np.unique(values, return_inverse=True)[1].reshape(-1)


# ---------------------------------------------------------------------------------------- neighbour search


def nearest_neighbours(
    features: Any, k: int, exclude_same: np.ndarray | None = None, block: int = 4096
) -> np.ndarray:
    """Indices [N, k] of each sample's k most cosine-similar other samples, nearest first.

    The sample itself is always left out; with ``exclude_same`` (one group id per sample: case, slide) also
    every sample of the query's own group. Similarities come from matrix products of at most ``block`` query
    rows (fewer for large N, to bound the block's memory) on the features' device. Equal similarities are
    ordered by the lower sample index, both inside the k and at the k-th place, so the result is deterministic.
    Raises ValueError when some query has fewer than k candidates.

    On the CPU from 16,384 samples a faster search returns the same neighbours (`_approximate_search`: bfloat16
    products, each block pair once, a candidate set per query proven to hold its top k, float64 similarities for
    the candidates; the float32 products of the plain search can misorder similarities closer than their
    rounding, the float64 ones cannot).
    """
    unit = _unit_features(features)
    n = unit.shape[0]
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    codes = None if exclude_same is None else _codes(_per_sample(exclude_same, "exclude_same", n))
    fewest = n - 1 if codes is None else n - int(np.bincount(codes).max())
    if fewest < k:
        what = "other samples" if exclude_same is None else "samples outside its own group (exclude_same)"
        raise ValueError(f"k={k} neighbours requested, but some query has only {fewest} {what}")
    if n >= _FAST_SEARCH_MIN_SAMPLES:
        search = _approximate_search(unit, int(k), None, codes, block)
        found = None if search is None else _exact_top_k(unit, search, int(k))
        if found is not None:
            return found
    return _plain_nearest(unit, int(k), codes, block)


def _plain_nearest(unit: torch.Tensor, k: int, codes: np.ndarray | None, block: int) -> np.ndarray:
    """`nearest_neighbours` by float32 products of ``block`` query rows with every sample, and a top-k."""
    n = unit.shape[0]
    device = unit.device
    if codes is None:
        order = torch.arange(n, device=device)
        group_columns, group_of_query = None, None
    else:
        sizes = np.bincount(codes)
        # queries run group by group, so that a block's own-group columns are a few index lists
        order_np = np.argsort(codes, kind="stable")
        order = torch.as_tensor(order_np, device=device)
        group_of_query = codes[order_np]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        group_columns = [order[starts[g] : starts[g + 1]] for g in range(len(sizes))]
    rows_per_block = max(1, min(block, _MAX_BLOCK_VALUES // n))
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
    rows_per_chunk = max(1, _MAX_BLOCK_VALUES // 8 // similarity.shape[1])
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


# ------------------------------------------------------------------------------- exact search, fast path
#
# On tens of thousands of samples the plain search spends its time in float32 products of every query with every
# sample (each product twice: once in each sample's row) and in a top-k over every row. The fast path finds the
# same neighbours:
# 1. approximate products in bfloat16 (float32 where the CPU has no native bfloat16 products), each block of
#    rows i <= j computed once and used for the rows of both blocks (`_CandidateLists`);
# 2. for every sample and column group a running list of the largest approximate values; a block adds only the
#    entries above a list's last value, found through the maxima of chunks of the block;
# 3. a bound on |approximate - exact| proves which samples can be among the exact top k (`_ErrorBound`); a list
#    too short for the proof is recomputed against its whole group (`_recompute`);
# 4. only those candidates get exact similarities (float64 sums of the vectors' products), which decide.
# The lists of one search, grouped by centre and leaving out each sample's case, serve both the robustness index
# and paired retrieval on the same features (`_remember`).

# below this many samples the plain search is fast enough (and every test of the plain path stays on it)
_FAST_SEARCH_MIN_SAMPLES = 16384
# rows and columns of a similarity block (blocks of 4096 measured slower: their passes leave the cache)
_FAST_BLOCK = 2048
# fast-path blocks are multiples of this; also the width of the row chunks whose maxima filter a block
_ALIGN = 64
_COLUMN_CHUNK = 16
# a list keeps this many values beyond the k: bfloat16's error leaves about 5-10 extra candidates per list
_MARGIN = 16
# samples are ordered by the nearest of this many seeded samples, so that a list meets similar samples early
_CLUSTERS = 64
# the lists may take this much memory (else the plain search runs)
_LIST_BYTES = 1 << 30
# the exact similarities are computed this many vector elements at a time (buffers that stay in cache)
_EXACT_VALUES = 1 << 18
# the lists recomputed against their group may bring this many candidates (else the plain search runs)
_RECOMPUTED_CANDIDATES = 1 << 25


def _fast_search_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the approximate products: bfloat16 where the CPU multiplies it natively (AVX512_BF16 or
    AMX, through oneDNN), float32 on other CPUs; None (plain search) off the CPU."""
    if device.type != "cpu":
        return None
    capability = getattr(torch._C._cpu, "_get_cpu_capability", dict)()
    native = capability.get("avx512_bf16") or capability.get("amx_bf16")
    return torch.bfloat16 if native and torch.backends.mkldnn.is_available() else torch.float32


@dataclass(frozen=True)
class _ErrorBound:
    """|exact similarity - (shift + y)| <= base + relative * |y| for every approximate product y; lower(y) and
    upper(y) bracket the exact similarity and both increase with y."""

    shift: float
    base: float
    relative: float

    def upper(self, y: torch.Tensor) -> torch.Tensor:
        y = y.double()
        return torch.where(torch.isinf(y), y, self.shift + y + (self.base + self.relative * y.abs()))

    def lower(self, y: torch.Tensor) -> torch.Tensor:
        y = y.double()
        return torch.where(torch.isinf(y), y, self.shift + y - (self.base + self.relative * y.abs()))


def _error_bound(unit: torch.Tensor, dtype: torch.dtype, shift: float) -> _ErrorBound:
    """The bound of products of ``unit`` rounded to ``dtype``, accumulated in float32, shifted by ``shift``.

    With vectors u and their rounding v (e = u - v): u_i.u_j = v_i.v_j + e_i.u_j + v_i.e_j, so rounding the inputs
    moves a product by at most max|e| (max|u| + max|v|). The products are accumulated in float32 (oneDNN and any
    BLAS; bfloat16 products are exact in float32), which adds at most gamma_K times the sum of |terms|, gamma_K =
    K u / (1 - K u), u = 2^-24, for K terms in any order. bfloat16 results are rounded once more, by at most
    2^-8 / (1 - 2^-8) of the result.
    """
    residual = unit_norm = rounded_norm = 0.0
    for chunk in unit.split(8192):
        exact = chunk.double()
        rounded = exact if dtype == unit.dtype else chunk.to(dtype).double()
        residual = max(residual, float((exact - rounded).norm(dim=1).max()))
        unit_norm = max(unit_norm, float(exact.norm(dim=1).max()))
        rounded_norm = max(rounded_norm, float(rounded.norm(dim=1).max()))
    terms = unit.shape[1] + 1
    gamma = terms * 2.0**-24 / (1 - terms * 2.0**-24)
    base = residual * (unit_norm + rounded_norm) + gamma * (rounded_norm**2 + abs(shift))
    # the float64 arithmetic of the norms and of the bound, and subnormal products flushed to zero
    base = base * (1 + 1e-6) + 1e-12
    relative = 2.0**-8 / (1 - 2.0**-8) if dtype == torch.bfloat16 else 0.0
    return _ErrorBound(shift, base, relative)


def _approximation(
    unit: torch.Tensor, dtype: torch.dtype, shift: float
) -> tuple[torch.Tensor, torch.Tensor, _ErrorBound]:
    """Row and column matrices whose products are the approximate similarities minus ``shift`` (an extra column:
    shift times -1, which centres bfloat16 results near the values that decide the top k, where their rounding
    is small), and their bound."""
    approx = unit.to(dtype)
    if shift:
        column = torch.ones(len(approx), 1, dtype=dtype)
        rows, cols = torch.cat([approx, shift * column], dim=1), torch.cat([approx, -column], dim=1)
    else:
        rows = cols = approx
    return rows, cols, _error_bound(unit, dtype, shift)


@dataclass(frozen=True)
class _Layout:
    """Samples reordered for the fast path: by column group, inside a group by cluster (and exclusion group), each
    group padded with masked zero rows to a multiple of _ALIGN."""

    order: np.ndarray  # the samples in layout order
    position: np.ndarray  # the padded position of order[i]
    sample_at: np.ndarray  # the sample at each padded position, -1 for padding
    exclude_at: np.ndarray | None  # exclusion code at each position (ascending in a group), -1: padding
    blocks: list[tuple[int, int, int, int]]  # start, stop, group, index of the block inside its group
    real_stop: dict[int, int]  # block start -> its number of real rows, for blocks that end in padding
    num_groups: int

    @property
    def total(self) -> int:
        return len(self.sample_at)


def _layout(approx: torch.Tensor, groups: np.ndarray, exclude: np.ndarray | None, block: int) -> _Layout:
    n = len(approx)
    num_groups = int(groups.max()) + 1
    chosen = np.random.default_rng(0).choice(n, size=min(_CLUSTERS, n), replace=False)
    cluster = (approx @ approx[torch.as_tensor(chosen)].T).argmax(dim=1).numpy()
    exclude_of = None
    if exclude is None:
        key = cluster
    else:
        # an exclusion group goes to the cluster of most of its members; its code is renumbered in (cluster, code)
        # order, so that the codes ascend inside every block and agree between column groups
        count = int(exclude.max()) + 1
        votes = np.bincount(exclude * _CLUSTERS + cluster, minlength=count * _CLUSTERS)
        home = votes.reshape(count, _CLUSTERS).argmax(axis=1)
        rank = np.empty(count, dtype=np.int64)
        rank[np.lexsort((np.arange(count), home))] = np.arange(count)
        key = exclude_of = rank[exclude]
    order = np.lexsort((np.arange(n), key, groups))
    sizes = np.bincount(groups, minlength=num_groups)
    starts = np.concatenate([[0], np.cumsum(-(-sizes // _ALIGN) * _ALIGN)])
    group_of = groups[order]
    position = starts[group_of] + np.arange(n) - np.concatenate([[0], np.cumsum(sizes)])[group_of]
    sample_at = np.full(int(starts[-1]), -1, dtype=np.int64)
    sample_at[position] = order
    exclude_at = None
    if exclude_of is not None:
        exclude_at = np.full(len(sample_at), -1, dtype=np.int64)
        exclude_at[position] = exclude_of[order]
    blocks, real_stop = [], {}
    for group in range(num_groups):
        begin, end = int(starts[group]), int(starts[group + 1])
        if end == begin:
            continue
        pieces = -(-(end - begin) // block)
        size = -(-(end - begin) // pieces // _ALIGN) * _ALIGN
        edges = [*range(begin, end, size), end]
        blocks += [(start, stop, group, i) for i, (start, stop) in enumerate(itertools.pairwise(edges))]
        if sizes[group] % _ALIGN:
            real_stop[edges[-2]] = begin + int(sizes[group]) - edges[-2]
    return _Layout(order, position, sample_at, exclude_at, blocks, real_stop, num_groups)


class _CandidateLists:
    """Running lists of the largest approximate values per (sample position, column group) over all block pairs."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, layout: _Layout, length: int) -> None:
        self.rows, self.cols, self.layout, self.length = rows, cols, layout, length
        size = layout.total * layout.num_groups
        self.values = torch.full((size, length), -torch.inf)
        self.columns = torch.full((size, length), -1, dtype=torch.int64)

    def run(self) -> None:
        blocks = self.layout.blocks
        pairs = [(a, b) for a in range(len(blocks)) for b in range(a, len(blocks))]
        # blocks at the same place of their groups first (the diagonal, and similar samples of the other groups),
        # then outwards: the lists start with high values, so that later blocks add few entries
        pairs.sort(key=lambda p: (abs(blocks[p[0]][3] - blocks[p[1]][3]), p[1] - p[0], p[0]))
        for a, b in tqdm(
            pairs, desc="similarity blocks", unit="block", mininterval=5, disable=len(pairs) < 100
        ):
            self._block(blocks[a], blocks[b])

    def _block(self, row_block: tuple, col_block: tuple) -> None:
        (r0, r1, row_group, _), (c0, c1, col_group, _) = row_block, col_block
        values = (self.rows[r0:r1] @ self.cols[c0:c1].T).float()
        self._mask(row_block, col_block, values)
        self._update(r0, r1, col_group, values, c0, across=False)
        if col_block is not row_block:
            self._update(c0, c1, row_group, values, r0, across=True)

    def _mask(self, row_block: tuple, col_block: tuple, values: torch.Tensor) -> None:
        r0, c0 = row_block[0], col_block[0]
        real_rows = self.layout.real_stop.get(r0, len(values))
        real_cols = self.layout.real_stop.get(c0, values.shape[1])
        values[real_rows:] = -torch.inf
        values[:, real_cols:] = -torch.inf
        codes = self.layout.exclude_at
        if codes is None:
            if row_block is col_block:
                values.fill_diagonal_(-torch.inf)
            return
        row_codes, col_codes = codes[r0 : r0 + real_rows], codes[c0 : c0 + real_cols]
        if row_codes[-1] < col_codes[0] or col_codes[-1] < row_codes[0]:
            return
        for code in np.intersect1d(row_codes, col_codes):
            top, bottom = np.searchsorted(row_codes, code), np.searchsorted(row_codes, code, side="right")
            left, right = np.searchsorted(col_codes, code), np.searchsorted(col_codes, code, side="right")
            values[top:bottom, left:right] = -torch.inf

    def _update(
        self, start: int, stop: int, group: int, values: torch.Tensor, offset: int, across: bool
    ) -> None:
        """Add block ``values`` to the lists of positions start..stop for column ``group``: the block's rows
        (``across`` False) or its columns (True); the other side of the block starts at position ``offset``."""
        lists = torch.arange(start, stop) * self.layout.num_groups + group
        last = self.values[lists, self.length - 1]
        real = self.layout.real_stop.get(start, stop - start)
        last[real:] = torch.inf  # padding positions take nothing
        side = values.T if across else values
        if bool(torch.isinf(last[:real]).any()):  # lists not full yet: the block's own top values
            self._merge_top(lists, side, offset)
            return
        entry_row, entry_col, entry_value = (self._hits_down if across else self._hits_along)(values, last)
        if len(entry_row) == 0:
            return
        counts = torch.bincount(entry_row, minlength=len(lists))
        # a list that meets many larger values in one block takes the block's top values directly
        heavy = counts > 4 * self.length
        if bool(heavy.any()):
            self._merge_top(lists[heavy], side[heavy], offset)
            light = ~heavy[entry_row]
            entry_row, entry_col, entry_value = entry_row[light], entry_col[light], entry_value[light]
            counts[heavy] = 0
            if len(entry_row) == 0:
                return
        hit = torch.nonzero(counts).flatten()
        width = int(counts.max())
        slot = torch.repeat_interleave(torch.arange(len(hit)), counts[hit])
        place = (
            slot * width + torch.arange(len(entry_row)) - (torch.cumsum(counts[hit], 0) - counts[hit])[slot]
        )
        new_values = torch.full((len(hit), width), -torch.inf)
        new_columns = torch.full((len(hit), width), -1, dtype=torch.int64)
        new_values.view(-1)[place] = entry_value
        new_columns.view(-1)[place] = entry_col + offset
        self._merge(lists[hit], new_values, new_columns)

    def _merge_top(self, lists: torch.Tensor, side: torch.Tensor, offset: int) -> None:
        top = side.contiguous().topk(min(self.length, side.shape[1]), dim=1)
        self._merge(lists, top.values, top.indices + offset)

    @staticmethod
    def _hits_along(values: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Entries above their row's ``last``, ordered by row: chunks along the rows whose maximum exceeds it."""
        rows, width = values.shape
        maxima = values.reshape(rows, width // _ALIGN, _ALIGN).amax(dim=2)
        hit_row, hit_chunk = torch.nonzero(maxima > last[:, None], as_tuple=True)
        chunks = values.reshape(-1, _ALIGN).index_select(0, hit_row * (width // _ALIGN) + hit_chunk)
        entry, within = torch.nonzero(chunks > last[hit_row, None], as_tuple=True)
        return hit_row[entry], hit_chunk[entry] * _ALIGN + within, chunks[entry, within]

    @staticmethod
    def _hits_down(values: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Entries above their column's ``last``, ordered by column: chunks down the columns (contiguous in
        memory), taken in memory order so that the gathers stay in cache."""
        rows, width = values.shape
        maxima = values.reshape(rows // _COLUMN_CHUNK, _COLUMN_CHUNK, width).amax(dim=1)
        hit_chunk, hit_col = torch.nonzero(maxima > last[None, :], as_tuple=True)
        inside = (hit_chunk[:, None] * _COLUMN_CHUNK + torch.arange(_COLUMN_CHUNK)) * width + hit_col[:, None]
        chunks = values.reshape(-1)[inside]
        entry, within = torch.nonzero(chunks > last[hit_col, None], as_tuple=True)
        by_col = torch.argsort(hit_col[entry], stable=True)
        entry, within = entry[by_col], within[by_col]
        return hit_col[entry], hit_chunk[entry] * _COLUMN_CHUNK + within, chunks[entry, within]

    def _merge(self, lists: torch.Tensor, new_values: torch.Tensor, new_columns: torch.Tensor) -> None:
        values = torch.cat([self.values.index_select(0, lists), new_values], dim=1)
        columns = torch.cat([self.columns.index_select(0, lists), new_columns], dim=1)
        top = values.topk(self.length, dim=1)
        self.values.index_copy_(0, lists, top.values)
        self.columns.index_copy_(0, lists, columns.gather(1, top.indices))


def _shift(approx: torch.Tensor, layout: _Layout, k: int) -> float:
    """The median over 256 seeded samples of their k-th largest approximate similarity in each column group,
    rounded to the approximate dtype: the value near which the top k are decided."""
    chosen = np.random.default_rng(0).choice(
        len(layout.order), size=min(256, len(layout.order)), replace=False
    )
    positions = torch.as_tensor(layout.position[chosen])
    values = (approx[positions] @ approx.T).float()
    values[:, torch.as_tensor(layout.sample_at < 0)] = -torch.inf
    values[torch.arange(len(positions)), positions] = -torch.inf
    if layout.exclude_at is not None:
        codes = layout.exclude_at
        values[torch.as_tensor(codes[positions.numpy()][:, None] == codes[None, :])] = -torch.inf
    spans: dict[int, list[int]] = {}
    for start, stop, group, _ in layout.blocks:
        spans.setdefault(group, [start, stop])[1] = stop
    kth = [values[:, a:b].topk(k, dim=1).values[:, -1] for a, b in spans.values() if b - a >= k]
    kth = torch.cat(kth) if kth else torch.empty(0)
    kth = kth[torch.isfinite(kth)]
    return float(kth.median().to(approx.dtype)) if len(kth) else 0.0


@dataclass(frozen=True)
class _Search:
    """Approximate lists of one fast search, by sample: for every (sample, column group) the largest approximate
    values ``values`` [N, G, L] (descending, -inf where empty) of the samples ``columns`` (-1 where empty); for
    lists not proven ``complete`` [N, G] every candidate instead, as ``recomputed`` (sample, group, column,
    value) rows. Every value y brackets an exact similarity by ``bound``."""

    k: int
    groups: np.ndarray
    exclude: np.ndarray | None
    bound: _ErrorBound
    values: torch.Tensor
    columns: torch.Tensor
    complete: torch.Tensor
    recomputed: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _approximate_search(
    unit: torch.Tensor,
    k: int,
    groups: np.ndarray | None,
    exclude: np.ndarray | None,
    block: int = _FAST_BLOCK,
) -> _Search | None:
    """The lists from which the exact top k of every (sample, column group) follows (`_exact_top_k`): per
    sample and group (codes 0..G-1; None = one group) of the other samples, leaving out the sample itself and
    every sample of its ``exclude`` group.

    Proof that a complete list misses no member of its exact top k (ties included): every approximate value y
    has lower(y) <= exact <= upper(y), both increasing in y. A list holds the largest y of its row, and every y
    left out is at most its last value y_last; its k-th, y_k, comes with k samples whose exact similarity is
    >= lower(y_k), so the exact k-th similarity is >= lower(y_k). Where upper(y_last) < lower(y_k) (or nothing
    was left out) every left-out sample is strictly below the exact k-th: it can neither be in the top k nor tie
    with it. Other lists are recomputed against their whole group, and their candidates are all samples with
    upper(y) >= lower(own k-th y).

    None (use the plain search) off the CPU, where the lists would not fit in _LIST_BYTES, and on degenerate
    features (so many equal values that the recomputed lists bring over _RECOMPUTED_CANDIDATES candidates).
    """
    dtype = _fast_search_dtype(unit.device)
    n, dim = unit.shape
    groups = np.zeros(n, dtype=np.int64) if groups is None else groups
    num_groups = int(groups.max()) + 1
    length = k + _MARGIN + 1
    if dtype is None or (n + _ALIGN * num_groups) * num_groups * length * 12 > _LIST_BYTES:
        return None
    block = max(_ALIGN, min(block, _FAST_BLOCK) // _ALIGN * _ALIGN)
    layout = _layout(unit.to(dtype), groups, exclude, block)
    padded = torch.zeros(layout.total, dim, dtype=unit.dtype)
    padded[torch.as_tensor(layout.position)] = unit[torch.as_tensor(layout.order)]
    shift = _shift(padded.to(dtype), layout, k) if dtype == torch.bfloat16 else 0.0
    rows, cols, bound = _approximation(padded, dtype, shift)
    del padded
    lists = _CandidateLists(rows, cols, layout, length)
    lists.run()
    # back to samples: row i of the lists of `order` is sample order[i]
    position, sample_at = torch.as_tensor(layout.position), torch.as_tensor(layout.sample_at)
    values = torch.empty(n, num_groups, length)
    columns = torch.empty(n, num_groups, length, dtype=torch.int64)
    order = torch.as_tensor(layout.order)
    values[order] = lists.values.view(layout.total, num_groups, length)[position]
    found = lists.columns.view(layout.total, num_groups, length)[position]
    columns[order] = torch.where(found >= 0, sample_at[found.clamp_min(0)], found)
    del lists
    y_k, y_last = values[:, :, k - 1], values[:, :, -1]
    complete = torch.isinf(y_last) | (bound.upper(y_last) < bound.lower(y_k))
    recomputed = _recompute(rows, cols, layout, bound, k, *torch.nonzero(~complete[order], as_tuple=True))
    if recomputed is None:
        return None
    return _Search(k, groups, exclude, bound, values, columns, complete, recomputed)


def _recompute(
    rows: torch.Tensor,
    cols: torch.Tensor,
    layout: _Layout,
    bound: _ErrorBound,
    k: int,
    missing: torch.Tensor,
    missing_group: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Every candidate (sample, group, column sample, value) of the lists (``missing``: indices into the layout
    order) whose completeness was not proven: the samples of the group whose upper(y) reaches the lower bound of
    the row's own k-th value. None past _RECOMPUTED_CANDIDATES."""
    found = [(torch.empty(0, dtype=torch.int64),) * 3 + (torch.empty(0),)]
    total = 0
    position, sample_at = torch.as_tensor(layout.position), torch.as_tensor(layout.sample_at)
    codes = None if layout.exclude_at is None else torch.as_tensor(layout.exclude_at)
    for group in range(layout.num_groups):
        members = missing[missing_group == group]
        if len(members) == 0:
            continue
        spans = [(start, stop) for start, stop, g, _ in layout.blocks if g == group]
        columns = torch.arange(spans[0][0], spans[-1][1])
        columns = columns[sample_at[columns] >= 0]
        for chunk in members.split(max(1, _MAX_BLOCK_VALUES // 4 // len(columns))):
            at = position[chunk]
            values = (rows[at] @ cols[columns].T).float()
            values[at[:, None] == columns[None, :]] = -torch.inf
            if codes is not None:
                values[codes[at][:, None] == codes[columns][None, :]] = -torch.inf
            lower = bound.lower(values.topk(min(k, len(columns)), dim=1).values[:, -1])
            reach = (bound.upper(values) >= lower[:, None]) & torch.isfinite(values)
            row, col = torch.nonzero(reach, as_tuple=True)
            total += len(row)
            if total > _RECOMPUTED_CANDIDATES:
                return None
            samples = torch.as_tensor(layout.order)[chunk[row]]
            found.append((samples, torch.full_like(row, group), sample_at[columns[col]], values[row, col]))
    return tuple(torch.cat(part) for part in zip(*found, strict=True))


def _exact_similarities(unit: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """float64 dot products unit[left[e]] . unit[right[e]] (a CPU tensor), each summed in the same order (equal
    vectors give equal values), a chunk at a time through buffers that stay in cache. In numpy: one thread per
    operation, where torch's small parallel operations wait for a busy second core."""
    vectors, left, right = unit.numpy(), left.numpy(), right.numpy()
    per_chunk = max(1, min(len(left), _EXACT_VALUES // unit.shape[1]))
    result = np.empty(len(left))
    gathered = np.empty((2, per_chunk, unit.shape[1]), dtype=vectors.dtype)
    wide = gathered if vectors.dtype == np.float64 else np.empty(gathered.shape)
    for start in range(0, len(left), per_chunk):
        size = min(per_chunk, len(left) - start)
        for side, indices in enumerate((left, right)):
            np.take(vectors, indices[start : start + size], axis=0, out=gathered[side, :size])
            if wide is not gathered:
                wide[side, :size] = gathered[side, :size]
        a, b = wide[0, :size], wide[1, :size]
        np.sum(np.multiply(a, b, out=a), axis=1, out=result[start : start + size])
    return torch.from_numpy(result)


def _outside_bound(bound: _ErrorBound, approximate: torch.Tensor, exact: torch.Tensor) -> bool:
    """Whether some exact similarity lies outside its approximate value's bound (a backend that does not
    accumulate in float32); warns, and the caller runs the plain search."""
    y = approximate.double()
    outside = bool(((exact - (bound.shift + y)).abs() > bound.base + bound.relative * y.abs()).any())
    if outside:
        warnings.warn(
            "approximate similarities outside their error bound (the backend does not accumulate products in "
            "float32): the plain float32 search runs instead",
            RuntimeWarning,
            stacklevel=3,
        )
    return outside


def _exact_top_k(unit: torch.Tensor, search: _Search, k: int) -> np.ndarray | None:
    """[N, k] indices of every sample's k most similar samples over all column groups of ``search`` (ordered by
    exact similarity desc, index asc); None after `_outside_bound`.

    Candidates: the entries whose upper bound reaches the lower bound of the row's k-th largest approximate value
    over all its lists (at least the per-list bound, so every list's proof holds)."""
    n, num_groups, length = search.values.shape
    values = search.values.clone()
    columns = search.columns
    values[~search.complete] = -torch.inf  # their candidates come from `recomputed`
    extra_row, _, extra_col, extra_value = search.recomputed
    flat_values = values.view(n, num_groups * length)
    kth = flat_values.topk(k, dim=1).values[:, -1]
    if len(extra_row):
        # rows with recomputed lists: the k-th over their lists and their recomputed candidates
        rows, local = torch.unique(extra_row, return_inverse=True)
        by_row = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=len(rows))
        place = torch.empty_like(local)
        place[by_row] = torch.arange(len(local)) - (torch.cumsum(counts, 0) - counts).repeat_interleave(
            counts
        )
        merged = torch.full((len(rows), num_groups * length + int(counts.max())), -torch.inf)
        merged[:, : num_groups * length] = flat_values[rows]
        merged[local, num_groups * length + place] = extra_value
        kth[rows] = merged.topk(k, dim=1).values[:, -1]
    lower = search.bound.lower(kth)
    reach = (search.bound.upper(flat_values) >= lower[:, None]) & torch.isfinite(flat_values)
    take_row, take_slot = torch.nonzero(reach, as_tuple=True)
    keep = search.bound.upper(extra_value) >= lower[extra_row]
    row = torch.cat([take_row, extra_row[keep]])
    col = torch.cat([columns.view(n, -1)[take_row, take_slot], extra_col[keep]])
    approximate = torch.cat([flat_values[take_row, take_slot], extra_value[keep]])
    exact = _exact_similarities(unit, row, col)
    if _outside_bound(search.bound, approximate, exact):
        return None
    # by row, then similarity descending, then index ascending
    order = torch.argsort(col, stable=True)
    order = order[torch.argsort(exact[order], descending=True, stable=True)]
    order = order[torch.argsort(row[order], stable=True)]
    counts = torch.bincount(row, minlength=n)
    if int(counts.min()) < k:
        raise RuntimeError(f"the fast search found fewer than k={k} candidates for a sample")
    rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    return col[order[rank < k]].view(n, k).numpy()


# The search of the last robustness index, kept while its features object lives: paired retrieval on the same
# features (the same vectors, its conditions the centres) reads the same lists instead of searching again.
_SHARED: dict[str, Any] = {}
# the top-k of paired retrieval that the robustness index's lists also serve (PLISM's top-10)
_SHARED_TOP_K = 10


def _fingerprint(unit: torch.Tensor) -> bytes:
    return hashlib.sha1(memoryview(unit.contiguous().numpy()).cast("B"), usedforsecurity=False).digest()


def _remember(features: Any, unit: torch.Tensor, search: _Search) -> None:
    _SHARED.clear()

    def forget(anchor: weakref.ref) -> None:
        if _SHARED.get("anchor") is anchor:
            _SHARED.clear()

    try:
        anchor = weakref.ref(features, forget)
    except TypeError:  # e.g. a list: nothing to tie the lists' lifetime to
        return
    _SHARED.update(anchor=anchor, fingerprint=_fingerprint(unit), search=search)


def _recall(features: Any, unit: torch.Tensor, groups: np.ndarray, k: int) -> _Search | None:
    """The remembered search if it was made on this features object, with unchanged vectors, these column groups
    and lists for at least k."""
    anchor = _SHARED.get("anchor")
    if anchor is None or anchor() is not features:
        return None
    search = _SHARED["search"]
    if (
        search.k < k
        or not np.array_equal(search.groups, groups)
        or _fingerprint(unit) != _SHARED["fingerprint"]
    ):
        return None
    return search


def _paired_ranks(
    features: Any, unit: torch.Tensor, tiles: np.ndarray, groups: np.ndarray, k: int
) -> dict[tuple[int, int], torch.Tensor] | None:
    """For every pair (a, b) of rows of ``tiles`` ([C, m] samples: condition by pair, every pair id under every
    condition), each tile's number of pool samples ranked before its counterpart (exact below k, k or more
    otherwise; the m tiles of a, then those of b), from one fast search: the robustness index's lists on the
    same features (its exclusion groups' members added back) or a search of its own. None where the fast path
    does not apply.

    The pool of (a, b) is the 2m tiles; a tile's counterpart is the other condition's tile of its pair; a sample
    ranks before it by a larger exact similarity to the tile, or an equal one and a lower pool position (a's
    tiles first, each condition in pair order). ``groups`` holds every sample's condition code.
    """
    num_conditions, m = tiles.shape
    if _fast_search_dtype(unit.device) is None:
        return None
    search = _recall(features, unit, groups, k) if num_conditions * m == len(unit) else None
    if (
        search is not None
        and (np.bincount(search.exclude).astype(np.float64) ** 2).sum() > len(unit) ** 2 / 4
    ):
        search = None  # exclusion groups so large that comparing their members costs as much as a search
    if search is None:
        # a search of its own over the paired tiles only, condition by condition, leaving out the tile itself
        unit = unit[torch.as_tensor(tiles.reshape(-1))]
        tiles = np.arange(num_conditions * m).reshape(num_conditions, m)
        search = _approximate_search(unit, k, np.repeat(np.arange(num_conditions), m), None)
        if search is None:
            return None
        group_of_row = np.arange(num_conditions)
    else:
        group_of_row = groups[tiles[:, 0]]
    n = len(unit)
    tiles_t = torch.as_tensor(tiles)
    similarity = {
        (a, b): _exact_similarities(unit, tiles_t[a], tiles_t[b])
        for a, b in itertools.combinations(range(num_conditions), 2)
    }
    extras = _own_group_entries(unit, search, tiles_t, similarity) if search.exclude is not None else None
    ranks = {}
    for (a, b), threshold in similarity.items():
        position = torch.full((n,), -1, dtype=torch.int64)
        position[tiles_t[a]] = torch.arange(m)
        position[tiles_t[b]] = torch.arange(m, 2 * m)
        chosen = torch.as_tensor(group_of_row[[a, b]])
        halves = []
        for queries, counterparts in ((tiles_t[a], tiles_t[b]), (tiles_t[b], tiles_t[a])):
            found = _ranked_before(unit, search, queries, counterparts, threshold, chosen, position, extras)
            if found is None:
                return None
            halves.append(found)
        ranks[a, b] = torch.cat(halves)
    return ranks


def _own_group_entries(
    unit: torch.Tensor, search: _Search, tiles: torch.Tensor, similarity: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _ErrorBound]:
    """The samples the shared lists leave out but a pool holds: those of the query's own exclusion group (e.g. its
    case). Their float32 products (with their bound), kept where they can reach the lowest similarity of the
    query to any of its counterparts: (query, sample, value, bound)."""
    n = len(unit)
    lowest = torch.full((n,), torch.inf, dtype=torch.float64)
    for (a, b), values in similarity.items():
        lowest[tiles[a]] = torch.minimum(lowest[tiles[a]], values)
        lowest[tiles[b]] = torch.minimum(lowest[tiles[b]], values)
    bound = _error_bound(unit, torch.float32, 0.0)
    order = np.argsort(search.exclude, kind="stable")
    edges = np.flatnonzero(np.diff(search.exclude[order])) + 1
    found = [(torch.empty(0, dtype=torch.int64),) * 2 + (torch.empty(0),)]
    for members in np.split(order, edges):
        members = torch.as_tensor(members)
        if len(members) < 2:
            continue
        vectors = unit[members].float()
        for chunk in torch.arange(len(members)).split(max(1, _MAX_BLOCK_VALUES // 4 // len(members))):
            values = vectors[chunk] @ vectors.T
            values[torch.arange(len(chunk)), chunk] = -torch.inf
            row, col = torch.nonzero(bound.upper(values) >= lowest[members[chunk]][:, None], as_tuple=True)
            found.append((members[chunk[row]], members[col], values[row, col]))
    query, sample, value = (torch.cat(part) for part in zip(*found, strict=True))
    return query, sample, value, bound


def _ranked_before(
    unit: torch.Tensor,
    search: _Search,
    queries: torch.Tensor,
    counterparts: torch.Tensor,
    threshold: torch.Tensor,
    groups: torch.Tensor,
    position: torch.Tensor,
    extras: tuple | None,
) -> torch.Tensor | None:
    """How many pool samples rank before each query's counterpart (exact when below the lists' k; at least k
    otherwise): those whose lower bound exceeds the counterpart's exact similarity ``threshold``, and, decided
    by exact similarities, those whose bounds straddle it. Samples left out of a complete list are below it, or
    the list's own top k all rank before the counterpart (`_approximate_search`)."""
    m = len(queries)
    index = torch.full((len(unit),), -1, dtype=torch.int64)
    index[queries] = torch.arange(m)
    complete = search.complete[queries][:, groups]
    values = torch.where(complete[:, :, None], search.values[queries][:, groups], -torch.inf).flatten(1)
    columns = search.columns[queries][:, groups].flatten(1).long()
    rows = torch.arange(m)[:, None].expand_as(columns)
    taken = torch.isfinite(values)
    parts = [(rows[taken], columns[taken], values[taken], search.bound)]
    sample, group, column, value = search.recomputed
    mine = (index[sample] >= 0) & torch.isin(group, groups)
    parts.append((index[sample[mine]], column[mine], value[mine], search.bound))
    if extras is not None:
        query, other, value, bound = extras
        mine = (index[query] >= 0) & (position[other] >= 0)
        parts.append((index[query[mine]], other[mine], value[mine], bound))
    before_count = torch.zeros(m, dtype=torch.int64)
    for row, col, value, bound in parts:
        keep = col != counterparts[row]
        row, col, value = row[keep], col[keep], value[keep]
        surely = bound.lower(value) > threshold[row]
        maybe = ~surely & (bound.upper(value) >= threshold[row])
        before_count += torch.bincount(row[surely], minlength=m)
        if bool(maybe.any()):
            exact = _exact_similarities(unit, queries[row[maybe]], col[maybe])
            if _outside_bound(bound, value[maybe], exact):
                return None
            limit = threshold[row[maybe]]
            before = (exact > limit) | (
                (exact == limit) & (position[col[maybe]] < position[counterparts[row[maybe]]])
            )
            before_count += torch.bincount(row[maybe][before], minlength=m)
    return before_count


def _majority(neighbour_codes: np.ndarray) -> np.ndarray:
    """Majority vote per row of [N, k] codes, nearest first; a tie goes to the tied code met first."""
    votes = (neighbour_codes[:, :, None] == neighbour_codes[:, None, :]).sum(axis=2)
    return neighbour_codes[np.arange(len(neighbour_codes)), votes.argmax(axis=1)]


# ---------------------------------------------------------------------------------------- robustness index


@dataclass(frozen=True)
class RobustnessIndex(_Result):
    """PathoROB's robustness index: ``value`` in 0..1 (higher = follows the tissue, not the site) with its
    95% bootstrap interval over queries, the k used, the SO and OS neighbour counts behind it."""

    value: float | None
    k: int
    ci_low: float | None
    ci_high: float | None
    so: int
    os: int
    reason: str | None


def robustness_index(
    features: Any,
    labels: Any,
    centers: Any,
    case_ids: Any,
    k: int = 11,
    bootstrap: int = 1000,
    seed: int = 0,
) -> RobustnessIndex:
    """PathoROB's robustness index (Kömen et al., arXiv 2507.17845; de Jong et al., arXiv 2501.18055).

    For every query, its k nearest neighbours by cosine among the samples of *other* cases (a query's own case
    holds near-duplicates of it: they would count as same site and same class). Per neighbour: SO = same label,
    other centre; OS = other label, same centre (same-same and other-other pairs do not count).
    RI = sum SO / sum (SO + OS) over all queries and their k neighbours. PathoROB's defaults: k = 11
    (camelyon subset), 61 (tcga), 46 (tolkach_esca).

    ``k`` is clipped to the fewest candidates any query has (reported in ``k``). The interval is the 2.5 and
    97.5 percentiles of RI over ``bootstrap`` resamplings of the queries with replacement (seeded by ``seed``;
    none for ``bootstrap=0``). ``value`` is None with a ``reason`` when undefined: a single centre or class, a
    single case, or no SO or OS neighbour at all.

    On the CPU from 16,384 samples the neighbours come from the fast search (see :func:`nearest_neighbours`),
    run per centre: its lists, kept while ``features`` lives, also serve :func:`paired_retrieval` on the same
    features object.
    """
    unit = _unit_features(features)
    n = unit.shape[0]
    label_codes = _codes(_per_sample(labels, "labels", n))
    center_codes = _codes(_per_sample(centers, "centers", n))
    cases = _per_sample(case_ids, "case_ids", n)
    if k < 1 or bootstrap < 0:
        raise ValueError(f"k must be positive and bootstrap non-negative, got k={k}, bootstrap={bootstrap}")

    def undefined(reason: str, used_k: int = k) -> RobustnessIndex:
        return RobustnessIndex(None, used_k, None, None, 0, 0, reason)

    if center_codes.max() == 0:
        return undefined("a single centre: the robustness index compares centres")
    if label_codes.max() == 0:
        return undefined("a single class: the robustness index compares classes")
    candidates = n - int(np.bincount(_codes(cases)).max())
    if candidates == 0:
        return undefined("a single case: no query has neighbours from other cases", 0)
    k = min(k, candidates)
    neighbours = None
    if n >= _FAST_SEARCH_MIN_SAMPLES:
        # lists by centre: paired retrieval on the same features reads them (`_remember`)
        case_codes = _codes(cases)
        search = _approximate_search(unit, max(k, _SHARED_TOP_K), center_codes, case_codes)
        if search is not None:
            _remember(features, unit, search)
            neighbours = _exact_top_k(unit, search, k)
            if neighbours is None:
                neighbours = _plain_nearest(unit, k, case_codes, 4096)
    if neighbours is None:
        neighbours = nearest_neighbours(unit, k, exclude_same=cases)
    same_label = label_codes[neighbours] == label_codes[:, None]
    same_center = center_codes[neighbours] == center_codes[:, None]
    so = (same_label & ~same_center).sum(axis=1)
    os_ = (~same_label & same_center).sum(axis=1)
    total_so, total = int(so.sum()), int(so.sum() + os_.sum())
    if total == 0:
        return RobustnessIndex(
            None, k, None, None, 0, 0, "no neighbour is same-class-other-centre or other-class-same-centre"
        )
    ci_low = ci_high = None
    if bootstrap:
        ratios = _bootstrap_ratios(so, so + os_, bootstrap, seed)
        if len(ratios):
            ci_low, ci_high = (float(v) for v in np.percentile(ratios, [2.5, 97.5]))
    return RobustnessIndex(total_so / total, k, ci_low, ci_high, total_so, total - total_so, None)


def _bootstrap_ratios(
    numerator: np.ndarray, denominator: np.ndarray, replicates: int, seed: int
) -> np.ndarray:
    """sum numerator / sum denominator over resampled rows, for each replicate whose denominator is not 0."""
    rng = np.random.default_rng(seed)
    n = len(numerator)
    chunk = max(1, _BOOTSTRAP_CHUNK_VALUES // n)
    ratios = []
    for start in range(0, replicates, chunk):
        rows = rng.integers(0, n, size=(min(chunk, replicates - start), n))
        top, bottom = numerator[rows].sum(axis=1), denominator[rows].sum(axis=1)
        ratios.append(top[bottom > 0] / bottom[bottom > 0])
    return np.concatenate(ratios)


# --------------------------------------------------------------------------------------- clustering score


@dataclass(frozen=True)
class ClusteringScore(_Result):
    """PathoROB's clustering score ``value`` = ``ari_label`` - ``ari_center`` in -1..1 (higher = clusters
    follow the tissue), with the number of k-means clusters the silhouette chose."""

    value: float | None
    num_clusters: int | None
    ari_label: float | None
    ari_center: float | None
    reason: str | None


def clustering_score(
    features: Any, labels: Any, centers: Any, max_clusters: int = 30, restarts: int = 10, seed: int = 0
) -> ClusteringScore:
    """PathoROB's clustering score (Kömen et al., arXiv 2507.17845).

    k-means (scikit-learn, ``n_init=restarts``, ``random_state=seed``) on the L2-normalized features for every
    number of clusters in 2..min(max_clusters, N - 1); the one with the best cosine silhouette (on a seeded
    sample of 10,000 above that size) is kept; score = ARI(clusters, label) - ARI(clusters, centre). None with a
    ``reason`` for a single class or centre (the difference then measures one side only) or when no
    clustering has 2+ clusters (e.g. all features equal).
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    unit = _unit_features(features).cpu().double().numpy()
    n = len(unit)
    label_codes = _codes(_per_sample(labels, "labels", n))
    center_codes = _codes(_per_sample(centers, "centers", n))
    if max_clusters < 2 or restarts < 1:
        raise ValueError(f"max_clusters must be >= 2 and restarts >= 1, got {max_clusters}, {restarts}")
    if center_codes.max() == 0:
        return ClusteringScore(
            None, None, None, None, "a single centre: the clustering score compares centres"
        )
    if label_codes.max() == 0:
        return ClusteringScore(
            None, None, None, None, "a single class: the clustering score compares classes"
        )
    if n < 3:
        return ClusteringScore(None, None, None, None, "fewer than 3 samples: no silhouette to choose k by")
    best: tuple[float, int, np.ndarray] | None = None
    for clusters in range(2, min(max_clusters, n - 1) + 1):
        with warnings.catch_warnings():  # duplicate features: fewer distinct clusters, handled below
            warnings.simplefilter("ignore", ConvergenceWarning)
            assignment = KMeans(n_clusters=clusters, n_init=restarts, random_state=seed).fit_predict(unit)
        found = len(np.unique(assignment))
        if not 2 <= found <= n - 1:  # duplicate features can leave clusters empty
            continue
        silhouette = silhouette_score(
            unit, assignment, metric="cosine", sample_size=min(n, _SILHOUETTE_SAMPLE), random_state=seed
        )
        if best is None or silhouette > best[0]:
            best = (float(silhouette), clusters, assignment)
    if best is None:
        return ClusteringScore(None, None, None, None, "k-means found fewer than 2 distinct clusters")
    _, clusters, assignment = best
    ari_label = float(adjusted_rand_score(label_codes, assignment))
    ari_center = float(adjusted_rand_score(center_codes, assignment))
    return ClusteringScore(ari_label - ari_center, clusters, ari_label, ari_center, None)


# --------------------------------------------------------------------------------------- paired retrieval


@dataclass(frozen=True)
class PairedRetrieval(_Result):
    """PLISM-style paired figures: medians over condition pairs of the paired cosine, of the unpaired cosine
    (two different tiles, one from each condition: the level the paired cosine is to be read against, since a
    nearly collapsed model has both near 1) and of top-1 / top-10 retrieval; ``per_condition_pair`` has each
    pair's ``condition_a``, ``condition_b``, ``n``, ``cosine``, ``unpaired_cosine`` (from 2 shared tiles on) and
    ``top{k}``; ``num_pairs`` counts the pair ids present under 2+ conditions."""

    cosine: float | None
    unpaired_cosine: float | None
    top1: float | None
    top10: float | None
    num_pairs: int
    num_condition_pairs: int
    per_condition_pair: list[dict]
    reason: str | None


def paired_retrieval(
    features: Any, pair_ids: Any, conditions: Any, ks: Sequence[int] = (1, 10)
) -> PairedRetrieval:
    """Paired cross-condition similarity and retrieval (PLISM; owkin ``plism-benchmark``).

    Samples sharing a ``pair_id`` are the same tissue under different ``conditions`` (centres: staining,
    scanner, lab). For every pair of conditions A, B with n pair ids in both: the mean cosine of the n paired
    tiles, and top-k retrieval: pool the 2n tiles; a tile succeeds when its counterpart from the other condition
    is among its k nearest (itself excluded; k clipped to 2n - 1), averaged over all 2n tiles (both directions).
    ``cosine``, ``top1`` and ``top10`` are medians over the condition pairs (None when ``ks`` lacks 1 or 10).
    ``pair_ids`` None, or None / empty strings per sample, mean "no pair". A pair id may occur once per condition.
    Where every pair id occurs under every condition (on the CPU, from 16,384 tiles) one fast search serves all
    condition pairs: the lists :func:`robustness_index` left on this same features object (centres as
    conditions), else a search of its own (`_paired_ranks`); the results are those of the pool-by-pool search.
    """
    unit = _unit_features(features)
    n = unit.shape[0]
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")

    def undefined(reason: str, num_pairs: int = 0) -> PairedRetrieval:
        return PairedRetrieval(None, None, None, None, num_pairs, 0, [], reason)

    if pair_ids is None:
        return undefined("no pair ids: paired retrieval needs the same tile under several conditions")
    pairs = np.array(
        ["" if p is None else str(p) for p in _per_sample(pair_ids, "pair_ids", n)], dtype=object
    )
    condition_values = _per_sample(conditions, "conditions", n)
    condition_codes = _codes(condition_values)
    names = np.unique(condition_values.astype(str) if condition_values.dtype == object else condition_values)
    paired = pairs != ""
    if not paired.any():
        return undefined("every pair id is empty: no tile is paired")
    row_of: list[dict[str, int]] = [{} for _ in names]
    for index in np.flatnonzero(paired):
        lookup = row_of[condition_codes[index]]
        if pairs[index] in lookup:
            raise ValueError(
                f"pair_id {pairs[index]!r} occurs twice under condition {names[condition_codes[index]]!r}; "
                "a pair id names one tile per condition"
            )
        lookup[pairs[index]] = int(index)
    present = {}
    for lookup in row_of:
        for pair in lookup:
            present[pair] = present.get(pair, 0) + 1
    num_pairs = sum(count >= 2 for count in present.values())
    # every pair id under every condition that has any: one search serves all condition pairs
    with_tiles = [c for c in range(len(names)) if row_of[c]]
    ranks, row_in_tiles = None, {c: i for i, c in enumerate(with_tiles)}
    ids = sorted(row_of[with_tiles[0]])
    if (
        len(with_tiles) >= 2
        and len(with_tiles) * len(ids) >= _FAST_SEARCH_MIN_SAMPLES
        and all(row_of[c].keys() == row_of[with_tiles[0]].keys() for c in with_tiles)
    ):
        tiles = np.array([[row_of[c][p] for p in ids] for c in with_tiles])
        ranks = _paired_ranks(features, unit, tiles, condition_codes, max(ks))
    per_pair = []
    for a, b in itertools.combinations(range(len(names)), 2):
        shared = sorted(row_of[a].keys() & row_of[b].keys())
        if not shared:
            continue
        rows_a = torch.as_tensor([row_of[a][p] for p in shared], device=unit.device)
        rows_b = torch.as_tensor([row_of[b][p] for p in shared], device=unit.device)
        m = len(shared)
        tiles_a, tiles_b = unit[rows_a].double(), unit[rows_b].double()
        paired_cosines = (tiles_a * tiles_b).sum(dim=1)
        entry: dict[str, Any] = {
            "condition_a": _plain(names[a]),
            "condition_b": _plain(names[b]),
            "n": m,
            "cosine": float(paired_cosines.mean()),
        }
        if m >= 2:  # every a_i . b_j at the cost of two sums: (sum_i a_i) . (sum_j b_j), less the paired ones
            every = tiles_a.sum(dim=0) @ tiles_b.sum(dim=0)
            entry["unpaired_cosine"] = float((every - paired_cosines.sum()) / (m * (m - 1)))
        if ranks is not None:
            before = ranks[row_in_tiles[a], row_in_tiles[b]]
            for k in ks:
                entry[f"top{k}"] = int((before < k).sum()) / (2 * m)
        else:
            nearest = nearest_neighbours(unit[torch.cat([rows_a, rows_b])], min(max(ks), 2 * m - 1))
            counterpart = np.concatenate([np.arange(m, 2 * m), np.arange(m)])
            for k in ks:
                entry[f"top{k}"] = float((nearest[:, :k] == counterpart[:, None]).any(axis=1).mean())
        per_pair.append(entry)
    if not per_pair:
        return undefined("no pair id occurs under two conditions", num_pairs)

    def median(key: str) -> float | None:
        values = [entry[key] for entry in per_pair if key in entry]
        return float(np.median(values)) if values else None

    return PairedRetrieval(
        median("cosine"),
        median("unpaired_cosine"),
        median("top1"),
        median("top10"),
        num_pairs,
        len(per_pair),
        per_pair,
        None,
    )


# ----------------------------------------------------------------------------------- within / cross gap


@dataclass(frozen=True)
class WithinCrossGap(_Result):
    """PANDA-PLUS-Bench's within- vs cross-slide kNN class accuracy, their ``gap`` (large = features carry the
    slide) and the own slide's mean share of the nearest neighbours."""

    gap: float | None
    within_slide_accuracy: float | None
    cross_slide_accuracy: float | None
    same_slide_share: float | None
    reason: str | None


def within_cross_gap(
    features: Any, labels: Any, slide_ids: Any, k: int = 5, neighbours_for_share: int = 50
) -> WithinCrossGap:
    """Within- minus cross-slide kNN accuracy (PANDA-PLUS-Bench, arXiv 2512.14922, "WSI-specific feature
    collapse").

    kNN class prediction (cosine, majority of k, a tie to the class met first from the nearest): within-slide
    with neighbours from the query's own slide only (self excluded; slides with k or fewer other tiles use what
    they have; single-tile slides are skipped), and leave-one-slide-out with neighbours from the other slides
    only (k clipped to the fewest such candidates). Both accuracies are over the same queries (the tiles of
    slides with 2+ tiles). ``same_slide_share``: the mean share of the query's own slide among its
    ``neighbours_for_share`` nearest (clipped to N - 1), over all samples.
    """
    unit = _unit_features(features)
    n = unit.shape[0]
    label_codes = _codes(_per_sample(labels, "labels", n))
    slides = _per_sample(slide_ids, "slide_ids", n)
    slide_codes = _codes(slides)
    if k < 1 or neighbours_for_share < 1:
        raise ValueError(f"k and neighbours_for_share must be positive, got {k}, {neighbours_for_share}")
    share_neighbours = nearest_neighbours(unit, min(neighbours_for_share, n - 1))
    same_slide_share = float((slide_codes[share_neighbours] == slide_codes[:, None]).mean())
    sizes = np.bincount(slide_codes)
    queries = np.flatnonzero(sizes[slide_codes] >= 2)
    if len(queries) == 0:
        return WithinCrossGap(None, None, None, same_slide_share, "every slide has a single tile")
    predicted_within = np.empty(n, dtype=np.int64)
    for slide in np.flatnonzero(sizes >= 2):
        members = np.flatnonzero(slide_codes == slide)
        local = nearest_neighbours(
            unit[torch.as_tensor(members, device=unit.device)], min(k, len(members) - 1)
        )
        predicted_within[members] = _majority(label_codes[members[local]])
    within = float((predicted_within[queries] == label_codes[queries]).mean())
    candidates = n - int(sizes.max())
    if candidates == 0:
        return WithinCrossGap(None, within, None, same_slide_share, "a single slide: no leave-one-slide-out")
    cross_neighbours = nearest_neighbours(unit, min(k, candidates), exclude_same=slides)
    predicted_cross = _majority(label_codes[cross_neighbours[queries]])
    cross = float((predicted_cross == label_codes[queries]).mean())
    return WithinCrossGap(within - cross, within, cross, same_slide_share, None)


# ------------------------------------------------------------------------------ the earlier collapse measures


def slide_identity_knn(features: Any, slide_ids: Any, k: int = 5) -> float:
    """Leave-one-out kNN accuracy of predicting each sample's slide from its k nearest others (cosine,
    majority vote, a tie to the slide met first from the nearest; k clipped to N - 1). Chance is the share of
    agreement of a prevalence-matched guess, sum_s p_s^2."""
    unit = _unit_features(features)
    codes = _codes(_per_sample(slide_ids, "slide_ids", unit.shape[0]))
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    neighbours = nearest_neighbours(unit, min(k, unit.shape[0] - 1))
    return float((_majority(codes[neighbours]) == codes).mean())


def between_group_variance_share(features: Any, groups: Any) -> float:
    """Between-group sum of squares over the total sum of squares, summed over feature dimensions (eta^2;
    raw features, not normalized). (G - 1) / (N - 1) at chance; 0 for constant features."""
    x = torch.as_tensor(features.detach() if isinstance(features, torch.Tensor) else np.asarray(features))
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {tuple(x.shape)}")
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features contain NaN or infinite values; check the feature extraction")
    codes = torch.as_tensor(_codes(_per_sample(groups, "groups", x.shape[0])), device=x.device)
    grand = x.mean(dim=0)
    total = ((x - grand) ** 2).sum()
    counts = torch.bincount(codes).double()
    means = torch.zeros(len(counts), x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, codes, x)
    means = means / counts[:, None]
    between = (counts[:, None] * (means - grand) ** 2).sum()
    return float(between / total) if total > 0 else 0.0
