"""Does an encoder follow the tissue or the site? The field's metrics, as functions of features you already have.

Every function takes ``features`` ([N, D] torch tensor on any device, or a numpy array) and per-sample arrays
(strings or ints: biological ``labels``, ``centers`` = site / lab / scanner, ``case_ids`` / ``slide_ids``,
``pair_ids``). Cosine similarity is meant everywhere: features are L2-normalized inside. The neighbour-based
metrics also take a :class:`~.neighbours.NeighbourIndex` in place of the features (exact cosine kNN, fast on the
CPU from 16,384 samples): one index passed to every metric searches once where they can share its lists, as the
robustness index and paired retrieval between the same centres do. Undefined results are ``None`` with a
``reason`` (never NaN); bad input raises ``ValueError`` naming it.

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
import itertools
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .checks import group_codes, per_sample, unit_features
from .neighbours import NeighbourIndex

__all__ = [
    "ClusteringScore",
    "PairedRetrieval",
    "RobustnessIndex",
    "WithinCrossGap",
    "between_group_variance_share",
    "clustering_score",
    "paired_retrieval",
    "robustness_index",
    "slide_identity_knn",
    "within_cross_gap",
]

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


def _index(features: NeighbourIndex | Any) -> NeighbourIndex:
    """The index the metric searches: the one given, else a new one on the features."""
    return features if isinstance(features, NeighbourIndex) else NeighbourIndex(features)


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
    features: NeighbourIndex | Any,
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

    ``features`` may be a :class:`~.neighbours.NeighbourIndex`: its search, partitioned by centre, then also
    serves :func:`paired_retrieval` between the centres on the same index.
    """
    index = _index(features)
    n = len(index)
    label_codes = group_codes(per_sample(labels, "labels", n))
    center_codes = group_codes(per_sample(centers, "centers", n))
    cases = per_sample(case_ids, "case_ids", n)
    if k < 1 or bootstrap < 0:
        raise ValueError(f"k must be positive and bootstrap non-negative, got k={k}, bootstrap={bootstrap}")

    def undefined(reason: str, used_k: int = k) -> RobustnessIndex:
        return RobustnessIndex(None, used_k, None, None, 0, 0, reason)

    if center_codes.max() == 0:
        return undefined("a single centre: the robustness index compares centres")
    if label_codes.max() == 0:
        return undefined("a single class: the robustness index compares classes")
    candidates = n - int(np.bincount(group_codes(cases)).max())
    if candidates == 0:
        return undefined("a single case: no query has neighbours from other cases", 0)
    k = min(k, candidates)
    neighbours = index.top_k(k, exclude_groups=cases, partition=center_codes)
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

    unit = unit_features(features).cpu().double().numpy()
    n = len(unit)
    label_codes = group_codes(per_sample(labels, "labels", n))
    center_codes = group_codes(per_sample(centers, "centers", n))
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
    features: NeighbourIndex | Any, pair_ids: Any, conditions: Any, ks: Sequence[int] = (1, 10)
) -> PairedRetrieval:
    """Paired cross-condition similarity and retrieval (PLISM; owkin ``plism-benchmark``).

    Samples sharing a ``pair_id`` are the same tissue under different ``conditions`` (centres: staining,
    scanner, lab). For every pair of conditions A, B with n pair ids in both: the mean cosine of the n paired
    tiles, and top-k retrieval: pool the 2n tiles; a tile succeeds when its counterpart from the other condition
    is among its k nearest (itself excluded; k clipped to 2n - 1), averaged over all 2n tiles (both directions).
    ``cosine``, ``top1`` and ``top10`` are medians over the condition pairs (None when ``ks`` lacks 1 or 10).
    ``pair_ids`` None, or None / empty strings per sample, mean "no pair". A pair id may occur once per condition.
    Where every pair id occurs under every condition (on the CPU, from 16,384 tiles) one fast search serves all
    condition pairs (`NeighbourIndex.counterpart_ranks`): with ``features`` a
    :class:`~.neighbours.NeighbourIndex`, the lists :func:`robustness_index` left on it (centres as
    conditions), else a search of its own; the results are those of the pool-by-pool search.
    """
    index = _index(features)
    n = len(index)
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if pair_ids is None:
        return _no_paired_retrieval(
            "no pair ids: paired retrieval needs the same tile under several conditions"
        )
    pairs = np.array(["" if p is None else str(p) for p in per_sample(pair_ids, "pair_ids", n)], dtype=object)
    condition_values = per_sample(conditions, "conditions", n)
    condition_codes = group_codes(condition_values)
    names = np.unique(condition_values.astype(str) if condition_values.dtype == object else condition_values)
    if not (pairs != "").any():
        return _no_paired_retrieval("every pair id is empty: no tile is paired")
    row_of = _tiles_by_condition(pairs, condition_codes, names)
    conditions_of_pair = Counter(pair for lookup in row_of for pair in lookup)
    num_pairs = sum(count >= 2 for count in conditions_of_pair.values())
    ranks = _ranks_from_one_search(index, row_of, condition_codes, max(ks))
    per_pair = _condition_pairs(index, names, row_of, ks, ranks)
    if not per_pair:
        return _no_paired_retrieval("no pair id occurs under two conditions", num_pairs)

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


def _no_paired_retrieval(reason: str, num_pairs: int = 0) -> PairedRetrieval:
    return PairedRetrieval(None, None, None, None, num_pairs, 0, [], reason)


def _tiles_by_condition(
    pairs: np.ndarray, condition_codes: np.ndarray, names: np.ndarray
) -> list[dict[str, int]]:
    """Per condition code, the row of each of its paired tiles by pair id ("" = unpaired, left out)."""
    row_of: list[dict[str, int]] = [{} for _ in names]
    for row in np.flatnonzero(pairs != ""):
        lookup = row_of[condition_codes[row]]
        if pairs[row] in lookup:
            raise ValueError(
                f"pair_id {pairs[row]!r} occurs twice under condition {names[condition_codes[row]]!r}; "
                "a pair id names one tile per condition"
            )
        lookup[pairs[row]] = int(row)
    return row_of


def _condition_pairs(
    index: NeighbourIndex,
    names: np.ndarray,
    row_of: list[dict[str, int]],
    ks: tuple[int, ...],
    ranks: dict[tuple[int, int], torch.Tensor] | None,
) -> list[dict[str, Any]]:
    """One entry per two conditions that share pair ids: their names, ``n``, the cosines and ``top{k}``."""
    entries = []
    for a, b in itertools.combinations(range(len(names)), 2):
        shared = sorted(row_of[a].keys() & row_of[b].keys())
        if not shared:
            continue
        rows_a = np.array([row_of[a][p] for p in shared])
        rows_b = np.array([row_of[b][p] for p in shared])
        entry = {"condition_a": _plain(names[a]), "condition_b": _plain(names[b]), "n": len(shared)}
        entry.update(_pair_cosines(index.unit, rows_a, rows_b))
        entry.update(_pair_retrieval(index, rows_a, rows_b, ks, None if ranks is None else ranks[a, b]))
        entries.append(entry)
    return entries


def _ranks_from_one_search(
    index: NeighbourIndex, row_of: list[dict[str, int]], condition_codes: np.ndarray, k: int
) -> dict[tuple[int, int], torch.Tensor] | None:
    """Where every pair id occurs under every condition that has any, the ranks of every tile's counterpart
    for all condition pairs (a, b) from one search (`NeighbourIndex.counterpart_ranks`); None elsewhere or
    where the fast path does not apply."""
    with_tiles = [c for c, lookup in enumerate(row_of) if lookup]
    ids = sorted(row_of[with_tiles[0]])
    if len(with_tiles) < 2 or any(row_of[c].keys() != row_of[with_tiles[0]].keys() for c in with_tiles):
        return None
    tiles = np.array([[row_of[c][p] for p in ids] for c in with_tiles])
    ranks = index.counterpart_ranks(tiles, condition_codes, k)
    if ranks is None:
        return None
    return {(with_tiles[i], with_tiles[j]): before for (i, j), before in ranks.items()}


def _pair_cosines(unit: torch.Tensor, rows_a: np.ndarray, rows_b: np.ndarray) -> dict[str, float]:
    """The mean cosine of the paired tiles, and from 2 pairs on the mean over every two different tiles."""
    m = len(rows_a)
    tiles_a = unit[torch.as_tensor(rows_a, device=unit.device)].double()
    tiles_b = unit[torch.as_tensor(rows_b, device=unit.device)].double()
    paired_cosines = (tiles_a * tiles_b).sum(dim=1)
    cosines = {"cosine": float(paired_cosines.mean())}
    if m >= 2:  # every a_i . b_j at the cost of two sums: (sum_i a_i) . (sum_j b_j), less the paired ones
        every = tiles_a.sum(dim=0) @ tiles_b.sum(dim=0)
        cosines["unpaired_cosine"] = float((every - paired_cosines.sum()) / (m * (m - 1)))
    return cosines


def _pair_retrieval(
    index: NeighbourIndex,
    rows_a: np.ndarray,
    rows_b: np.ndarray,
    ks: tuple[int, ...],
    before: torch.Tensor | None,
) -> dict[str, float]:
    """top{k} of the pool of the 2m tiles: from the counterparts' ranks of one search (``before``) where
    given, else from a search of the pool."""
    m = len(rows_a)
    if before is not None:
        return {f"top{k}": int((before < k).sum()) / (2 * m) for k in ks}
    nearest = index.subset(np.concatenate([rows_a, rows_b])).top_k(min(max(ks), 2 * m - 1))
    counterpart = np.concatenate([np.arange(m, 2 * m), np.arange(m)])
    return {f"top{k}": float((nearest[:, :k] == counterpart[:, None]).any(axis=1).mean()) for k in ks}


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
    features: NeighbourIndex | Any, labels: Any, slide_ids: Any, k: int = 5, neighbours_for_share: int = 50
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
    index = _index(features)
    n = len(index)
    label_codes = group_codes(per_sample(labels, "labels", n))
    slides = per_sample(slide_ids, "slide_ids", n)
    slide_codes = group_codes(slides)
    if k < 1 or neighbours_for_share < 1:
        raise ValueError(f"k and neighbours_for_share must be positive, got {k}, {neighbours_for_share}")
    share_neighbours = index.top_k(min(neighbours_for_share, n - 1))
    same_slide_share = float((slide_codes[share_neighbours] == slide_codes[:, None]).mean())
    sizes = np.bincount(slide_codes)
    queries = np.flatnonzero(sizes[slide_codes] >= 2)
    if len(queries) == 0:
        return WithinCrossGap(None, None, None, same_slide_share, "every slide has a single tile")
    predicted_within = np.empty(n, dtype=np.int64)
    for slide in np.flatnonzero(sizes >= 2):
        members = np.flatnonzero(slide_codes == slide)
        local = index.subset(members).top_k(min(k, len(members) - 1))
        predicted_within[members] = _majority(label_codes[members[local]])
    within = float((predicted_within[queries] == label_codes[queries]).mean())
    candidates = n - int(sizes.max())
    if candidates == 0:
        return WithinCrossGap(None, within, None, same_slide_share, "a single slide: no leave-one-slide-out")
    cross_neighbours = index.top_k(min(k, candidates), exclude_groups=slides)
    predicted_cross = _majority(label_codes[cross_neighbours[queries]])
    cross = float((predicted_cross == label_codes[queries]).mean())
    return WithinCrossGap(within - cross, within, cross, same_slide_share, None)


# ------------------------------------------------------------------------------ the earlier collapse measures


def slide_identity_knn(features: NeighbourIndex | Any, slide_ids: Any, k: int = 5) -> float:
    """Leave-one-out kNN accuracy of predicting each sample's slide from its k nearest others (cosine,
    majority vote, a tie to the slide met first from the nearest; k clipped to N - 1). Chance is the share of
    agreement of a prevalence-matched guess, sum_s p_s^2."""
    index = _index(features)
    codes = group_codes(per_sample(slide_ids, "slide_ids", len(index)))
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    neighbours = index.top_k(min(k, len(index) - 1))
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
    codes = torch.as_tensor(group_codes(per_sample(groups, "groups", x.shape[0])), device=x.device)
    grand = x.mean(dim=0)
    total = ((x - grand) ** 2).sum()
    counts = torch.bincount(codes).double()
    means = torch.zeros(len(counts), x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, codes, x)
    means = means / counts[:, None]
    between = (counts[:, None] * (means - grand) ** 2).sum()
    return float(between / total) if total > 0 else 0.0
