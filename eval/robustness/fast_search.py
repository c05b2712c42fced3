"""The fast path of :class:`~.neighbours.NeighbourIndex`: on the CPU, the exact top k of tens of thousands of
samples several times faster than the plain float32 search, with the same neighbours.

The plain search spends its time in float32 products of every query with every sample (each product twice: once
in each sample's row) and in a top-k over every row. The fast path finds the same neighbours:

1. approximate products in bfloat16 (float32 where the CPU has no native bfloat16 products), each block of rows
   i <= j computed once and used for the rows of both blocks (`_CandidateLists`);
2. for every sample and column group (a partition of the samples, e.g. the centres) a running list of the largest
   approximate values; a block adds only the entries above a list's last value, found through the maxima of
   chunks of the block;
3. a bound on |approximate - exact| proves which samples can be among the exact top k (`_ErrorBound`); a list too
   short for the proof is recomputed against its whole group (`_recompute`);
4. only those candidates get exact similarities (float64 sums of the vectors' products), which decide
   (`exact_top_k`).

The lists of one search, grouped by centre and leaving out each sample's case, serve both the robustness index
(`exact_top_k`) and paired retrieval between the centres (`counterpart_ranks`).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ...progress import progress_bar

__all__ = [
    "MAX_BLOCK_VALUES",
    "Search",
    "approximate_dtype",
    "approximate_search",
    "counterpart_ranks",
    "exact_top_k",
]

# a block of the similarity matrix holds at most this many values (256 MB in float32), in every search
MAX_BLOCK_VALUES = 1 << 26
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


def approximate_dtype(device: torch.device) -> torch.dtype | None:
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
        for a, b in progress_bar(
            iterable=pairs, desc="similarity blocks", unit="block", enabled=len(pairs) >= 100
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
class Search:
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


def approximate_search(
    unit: torch.Tensor,
    k: int,
    groups: np.ndarray | None,
    exclude: np.ndarray | None,
    block: int = _FAST_BLOCK,
) -> Search | None:
    """The lists from which the exact top k of every (sample, column group) follows (`exact_top_k`): per
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
    dtype = approximate_dtype(unit.device)
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
    return Search(k, groups, exclude, bound, values, columns, complete, recomputed)


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
        for chunk in members.split(max(1, MAX_BLOCK_VALUES // 4 // len(columns))):
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


def exact_top_k(unit: torch.Tensor, search: Search, k: int) -> np.ndarray | None:
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


def counterpart_ranks(
    unit: torch.Tensor, search: Search, tiles: np.ndarray, group_of_row: np.ndarray
) -> dict[tuple[int, int], torch.Tensor] | None:
    """For every pair (a, b) of rows of ``tiles`` ([C, m] samples: condition by pair, every pair id under every
    condition), each tile's number of pool samples ranked before its counterpart (exact below the search's k, k
    or more otherwise; the m tiles of a, then those of b), from the lists of ``search`` on ``unit``: a search
    whose column group of each row of ``tiles`` is ``group_of_row``, with or without exclusion groups (their
    members are added back). None after `_outside_bound`.

    The pool of (a, b) is the 2m tiles; a tile's counterpart is the other condition's tile of its pair; a sample
    ranks before it by a larger exact similarity to the tile, or an equal one and a lower pool position (a's
    tiles first, each condition in pair order).
    """
    num_conditions, m = tiles.shape
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
    unit: torch.Tensor, search: Search, tiles: torch.Tensor, similarity: dict
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
        for chunk in torch.arange(len(members)).split(max(1, MAX_BLOCK_VALUES // 4 // len(members))):
            values = vectors[chunk] @ vectors.T
            values[torch.arange(len(chunk)), chunk] = -torch.inf
            row, col = torch.nonzero(bound.upper(values) >= lowest[members[chunk]][:, None], as_tuple=True)
            found.append((members[chunk[row]], members[col], values[row, col]))
    query, sample, value = (torch.cat(part) for part in zip(*found, strict=True))
    return query, sample, value, bound


def _ranked_before(
    unit: torch.Tensor,
    search: Search,
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
    the list's own top k all rank before the counterpart (`approximate_search`)."""
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
