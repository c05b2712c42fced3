"""The field's robustness metrics against hand-worked examples, brute-force loops and scikit-learn."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.neighbors import NearestNeighbors

from exaonepath_hf.eval.robustness import fast_search as fast_search_module
from exaonepath_hf.eval.robustness import neighbours as neighbours_module
from exaonepath_hf.eval.robustness.metrics import (
    between_group_variance_share,
    clustering_score,
    paired_retrieval,
    robustness_index,
    slide_identity_knn,
    within_cross_gap,
)
from exaonepath_hf.eval.robustness.neighbours import NeighbourIndex


def _angles(degrees):
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def nearest_neighbours(features, k, exclude_groups=None, block=4096):
    """The top k of a fresh index: every call searches anew."""
    return NeighbourIndex(features, block=block).top_k(k, exclude_groups=exclude_groups)


def _brute_neighbours(features, k, groups=None):
    """Double loop: every other sample (outside the query's group), sorted by (cosine desc, index asc)."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    result = []
    for i in range(len(unit)):
        candidates = [
            (-float(unit[i] @ unit[j]), j)
            for j in range(len(unit))
            if j != i and (groups is None or groups[j] != groups[i])
        ]
        result.append([j for _, j in sorted(candidates)[:k]])
    return np.array(result)


def _brute_robustness_index(features, labels, centers, cases, k):
    neighbours = _brute_neighbours(features, k, cases)
    so = os_ = 0
    for i, row in enumerate(neighbours):
        for j in row:
            so += labels[j] == labels[i] and centers[j] != centers[i]
            os_ += labels[j] != labels[i] and centers[j] == centers[i]
    return so / (so + os_), so, os_


# ------------------------------------------------------------------------------------------ neighbours


@pytest.mark.parametrize("block", [1, 7, 4096])
def test_nearest_neighbours_match_brute_force(block):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 5))
    groups = rng.integers(0, 6, size=40)
    assert np.array_equal(nearest_neighbours(features, 4, block=block), _brute_neighbours(features, 4))
    assert np.array_equal(
        nearest_neighbours(features, 4, exclude_groups=groups, block=block),
        _brute_neighbours(features, 4, groups),
    )


def test_nearest_neighbours_break_ties_by_index():
    # basis vectors: every similarity is exactly 0 or 1
    e = np.eye(3)
    features = np.stack([e[0], e[1], e[0], e[0], e[1], e[2], e[0]])
    # sample 0 (e0): similarity 1 to samples 2, 3, 6 and 0 to samples 1, 4, 5
    assert nearest_neighbours(features, 2)[0].tolist() == [2, 3]
    assert nearest_neighbours(features, 4)[0].tolist() == [2, 3, 6, 1]
    # sample 5 (e2) is orthogonal to everything: the lowest indices first
    assert nearest_neighbours(features, 3, block=2)[5].tolist() == [0, 1, 2]
    # leaving out group "a" = samples 0, 2: sample 0 keeps 3 and 6, then the lowest orthogonal one, 1
    groups = np.array(["a", "b", "a", "c", "b", "d", "c"])
    assert nearest_neighbours(features, 3, exclude_groups=groups)[0].tolist() == [3, 6, 1]
    assert np.array_equal(
        nearest_neighbours(features, 3, exclude_groups=groups, block=3),
        _brute_neighbours(features, 3, groups),
    )
    # all equal: every query's neighbours are the lowest other indices, whatever the block
    same = np.ones((9, 4))
    expected = np.array([[j for j in range(9) if j != i][:3] for i in range(9)])
    for block in (1, 4, 9):
        assert np.array_equal(nearest_neighbours(same, 3, block=block), expected)


def test_nearest_neighbours_accept_torch_and_reject_bad_input():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(12, 3)).astype(np.float32)
    assert np.array_equal(nearest_neighbours(torch.from_numpy(features), 3), nearest_neighbours(features, 3))
    with pytest.raises(ValueError, match="only 1"):
        nearest_neighbours(features, 2, exclude_groups=np.array([0] * 11 + [1]))
    with pytest.raises(ValueError, match="one value per sample"):
        nearest_neighbours(features, 2, exclude_groups=np.zeros(5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        nearest_neighbours(features[:1], 1)
    features[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nearest_neighbours(features, 2)


# ------------------------------------------------------------------------------------- robustness index


def test_robustness_index_by_hand():
    # sample: label, centre, case, angle       (centre A near 0 degrees, centre B near 90: features follow the site)
    # 0: x A c0 0 | 1: y A c1 5 | 2: x B c2 90 | 3: y B c3 95 | 4: x A c0 2 (same case as 0) | 5: x B c4 60
    # k = 2 nearest outside the query's case:
    #   q0 -> 1 (y A: OS), 5 (x B: SO)           q4 -> 1 (OS), 5 (SO)
    #   q1 -> 4 (x A: OS), 0 (x A: OS)           q2 -> 3 (y B: OS), 5 (x B: neither)
    #   q3 -> 2 (x B: OS), 5 (x B: OS)           q5 -> 2 (x B: neither), 3 (y B: OS)
    # SO = 2, OS = 8: RI = 0.2
    features = _angles([0, 5, 90, 95, 2, 60])
    labels = np.array(list("xyxyxx"))
    centers = np.array(list("AABBAB"))
    cases = np.array(["c0", "c1", "c2", "c3", "c0", "c4"])
    result = robustness_index(features, labels, centers, cases, k=2, bootstrap=0)
    assert (result.value, result.so, result.os, result.k) == (pytest.approx(0.2), 2, 8, 2)
    assert result.ci_low is None and result.reason is None
    # the near-duplicate 4 in the query's own case must not count: as its own case it is 0's nearest
    # (x A: neither) and 0 is 4's, which removes both SO: RI = 0 / 8
    cases[4] = "c5"
    assert robustness_index(features, labels, centers, cases, k=2, bootstrap=0).value == 0.0


def test_robustness_index_matches_explicit_loops():
    rng = np.random.default_rng(2)
    for n, k in ((10, 3), (60, 7)):
        features = rng.normal(size=(n, 6))
        labels, centers = rng.integers(0, 3, n), rng.choice(["A", "B", "C"], n)
        cases = rng.integers(0, n // 3, n)
        expected, so, os_ = _brute_robustness_index(features, labels, centers, cases, k)
        result = robustness_index(features, labels, centers, cases, k=k, bootstrap=0)
        assert (result.value, result.so, result.os) == (pytest.approx(expected), so, os_)


def test_robustness_index_boundaries():
    labels = np.repeat([0, 1, 2], 8)
    centers = np.tile(["A", "A", "B", "B"], 6)
    cases = np.arange(24) // 2  # pairs of samples share a case (and a centre)
    # features = the class one-hot: every neighbour is of the query's class, so no OS at all
    by_class = np.eye(3)[labels]
    assert robustness_index(by_class, labels, centers, cases, k=5, bootstrap=0).value == 1.0
    # features = the centre one-hot: every neighbour is of the query's centre, so no SO at all
    by_center = np.eye(2)[(centers == "B").astype(int)]
    assert robustness_index(by_center, labels, centers, cases, k=5, bootstrap=0).value == 0.0


def test_robustness_index_bootstrap_interval():
    rng = np.random.default_rng(3)
    n = 200
    labels, centers, cases = rng.integers(0, 2, n), rng.integers(0, 3, n), rng.integers(0, 40, n)
    features = np.eye(2)[labels] + 1.2 * rng.normal(size=(n, 2))
    first = robustness_index(features, labels, centers, cases, bootstrap=300, seed=5)
    assert first.ci_low < first.value < first.ci_high
    assert first.ci_high - first.ci_low < 0.2
    assert first == robustness_index(features, labels, centers, cases, bootstrap=300, seed=5)
    assert first.ci_low != robustness_index(features, labels, centers, cases, bootstrap=300, seed=6).ci_low
    assert json.loads(json.dumps(first.to_dict(), allow_nan=False)) == first.to_dict()


def test_robustness_index_undefined_and_clipped():
    features = _angles(np.arange(8) * 10)
    labels, centers = np.array([0, 1] * 4), np.array(list("AABBAABB"))
    cases = np.arange(8)
    single_centre = robustness_index(features, labels, np.zeros(8), cases)
    assert single_centre.value is None and "single centre" in single_centre.reason
    assert "single class" in robustness_index(features, np.zeros(8), centers, cases).reason
    assert "single case" in robustness_index(features, labels, centers, np.zeros(8)).reason
    # each class lives in one centre: no neighbour can be SO or OS
    confounded = robustness_index(features, labels, labels, cases)
    assert confounded.value is None and "no neighbour" in confounded.reason
    # 6 of 8 samples in one case: its queries have only 2 candidates, so k = 11 becomes 2
    clipped = robustness_index(features, labels, centers, np.array([0] * 6 + [1, 2]), bootstrap=0)
    assert clipped.k == 2 and clipped.value is not None
    with pytest.raises(ValueError, match="centers"):
        robustness_index(features, labels, centers[:5], cases)


# ------------------------------------------------------------------------------------- clustering score


def _planted(by, seed=0, n_per=12):
    """3 classes x 2 centres; features = the centroid of the class (or centre) plus small noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], 2 * n_per)
    centers = np.tile(np.repeat(["A", "B"], n_per), 3)
    groups = labels if by == "label" else (centers == "B").astype(int)
    centroids = rng.normal(size=(3, 8)) * 4
    return centroids[groups] + 0.3 * rng.normal(size=(len(labels), 8)), labels, centers


def test_clustering_score_follows_what_the_features_carry():
    features, labels, centers = _planted("label")
    result = clustering_score(features, labels, centers, max_clusters=6, restarts=3)
    assert result.num_clusters == 3 and result.value > 0.95
    features, labels, centers = _planted("center")
    result = clustering_score(features, labels, centers, max_clusters=6, restarts=3)
    assert result.num_clusters == 2 and result.value < -0.95


def test_clustering_score_matches_sklearn():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(40, 4))
    labels, centers = rng.integers(0, 3, 40), rng.integers(0, 2, 40)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    assignments = {c: KMeans(n_clusters=c, n_init=2, random_state=1).fit_predict(unit) for c in range(2, 6)}
    best = max(assignments, key=lambda c: silhouette_score(unit, assignments[c], metric="cosine"))
    result = clustering_score(features, labels, centers, max_clusters=5, restarts=2, seed=1)
    assert result.num_clusters == best
    assert result.ari_label == pytest.approx(adjusted_rand_score(labels, assignments[best]))
    assert result.ari_center == pytest.approx(adjusted_rand_score(centers, assignments[best]))
    assert result.value == pytest.approx(result.ari_label - result.ari_center)


def test_clustering_score_undefined():
    features = np.random.default_rng(5).normal(size=(10, 3))
    assert "single centre" in clustering_score(features, np.arange(10) % 2, np.zeros(10)).reason
    equal = clustering_score(np.ones((10, 3)), np.arange(10) % 2, np.arange(10) % 3, max_clusters=4)
    assert equal.value is None and "fewer than 2" in equal.reason


# ------------------------------------------------------------------------------------- paired retrieval


def test_paired_retrieval_perfect_and_swapped():
    e = np.eye(4)
    # A and B hold the same four tiles; C swaps the features of tiles 0 and 1
    features = np.concatenate([e, e, e[[1, 0, 2, 3]]])
    conditions = np.repeat(["A", "B", "C"], 4)
    pairs = np.tile(["t0", "t1", "t2", "t3"], 3)
    result = paired_retrieval(features, pairs, conditions)
    by_pair = {(p["condition_a"], p["condition_b"]): p for p in result.per_condition_pair}
    assert by_pair["A", "B"]["cosine"] == 1.0 and by_pair["A", "B"]["top1"] == 1.0
    # A vs C: tiles 0 and 1 have cosine 0 with their counterparts, 2 and 3 cosine 1: mean 0.5; in the pool
    # A0's nearest is C1 (identical features), not C0, and so on: 4 of the 8 tiles find their counterpart
    assert by_pair["A", "C"]["cosine"] == 0.5 and by_pair["A", "C"]["top1"] == 0.5
    # top-10 is clipped to the 7 other tiles of the pool: everyone succeeds
    assert by_pair["A", "C"]["top10"] == 1.0 and by_pair["A", "C"]["n"] == 4
    assert (result.cosine, result.top1, result.top10) == (0.5, 0.5, 1.0)  # medians over AB, AC, BC
    # two different tiles: A's and B's never match (0); of A's and C's 12, the swapped t0 / t1 match twice
    assert by_pair["A", "B"]["unpaired_cosine"] == 0.0
    assert by_pair["A", "C"]["unpaired_cosine"] == pytest.approx(1 / 6)
    assert result.unpaired_cosine == pytest.approx(1 / 6)  # median of AB 0, AC 1/6, BC 1/6
    assert (result.num_pairs, result.num_condition_pairs, result.reason) == (4, 3, None)


def test_paired_retrieval_identical_features_give_top1_one_and_skip_unpaired():
    rng = np.random.default_rng(6)
    tiles = rng.normal(size=(5, 8))
    features = np.concatenate([tiles, tiles, rng.normal(size=(2, 8))])
    conditions = ["lab1"] * 5 + ["lab2"] * 5 + ["lab1", "lab2"]
    pairs = [f"p{i}" for i in range(5)] * 2 + ["", None]
    result = paired_retrieval(torch.tensor(features), pairs, conditions, ks=(1,))
    assert result.top1 == 1.0 and result.cosine == pytest.approx(1.0) and result.top10 is None
    assert result.per_condition_pair[0]["n"] == 5


def test_paired_unpaired_cosine_equals_the_mean_over_every_two_different_tiles():
    rng = np.random.default_rng(9)
    tiles_a, tiles_b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    result = paired_retrieval(
        np.concatenate([tiles_a, tiles_b]), [f"t{i}" for i in range(7)] * 2, [0] * 7 + [1] * 7
    )
    unit_a = tiles_a / np.linalg.norm(tiles_a, axis=1, keepdims=True)
    unit_b = tiles_b / np.linalg.norm(tiles_b, axis=1, keepdims=True)
    expected = np.mean([unit_a[i] @ unit_b[j] for i in range(7) for j in range(7) if i != j])
    assert result.unpaired_cosine == pytest.approx(expected, abs=1e-6)
    single = paired_retrieval(np.concatenate([tiles_a[:1], tiles_b[:1]]), ["t0", "t0"], [0, 1])
    assert single.cosine is not None and single.unpaired_cosine is None  # one shared tile: no two different


def test_paired_retrieval_undefined_and_invalid():
    features = np.random.default_rng(7).normal(size=(4, 3))
    assert "no pair ids" in paired_retrieval(features, None, list("ABAB")).reason
    assert "empty" in paired_retrieval(features, [""] * 4, list("ABAB")).reason
    lonely = paired_retrieval(features, ["a", "b", "c", "d"], list("ABAB"))
    assert lonely.top1 is None and "two conditions" in lonely.reason
    with pytest.raises(ValueError, match="occurs twice"):
        paired_retrieval(features, ["a", "a", "a", "b"], list("AABB"))
    assert json.dumps(lonely.to_dict(), allow_nan=False)


# ------------------------------------------------------------------------------------ within / cross gap


def test_within_cross_gap_by_hand():
    # slide s1: a (label 0, 0 deg), b (0, 11), c (1, 50); slide s2: d (1, 5), e (1, 15), f (0, 55)
    # within (k=1): a->b ok, b->a ok, c->b wrong; d->e ok, e->d ok, f->e wrong: 4/6
    # cross (k=1): a->d, b->e, c->f, d->a, e->b, f->c: all wrong: 0
    # 2 nearest overall: a->d,b (1 own); b->e,d (0); c->f,e (0); d->a,b (0); e->b,d (1); f->c,e (1): share 3/12
    features = _angles([0, 11, 50, 5, 15, 55])
    labels, slides = [0, 0, 1, 1, 1, 0], ["s1"] * 3 + ["s2"] * 3
    result = within_cross_gap(features, labels, slides, k=1, neighbours_for_share=2)
    assert result.within_slide_accuracy == pytest.approx(4 / 6) and result.cross_slide_accuracy == 0.0
    assert result.gap == pytest.approx(4 / 6) and result.same_slide_share == pytest.approx(0.25)


def _slides_and_classes(carry_slide, num_slides=6, per_class=10, seed=8):
    rng = np.random.default_rng(seed)
    slides = np.repeat(np.arange(num_slides), 2 * per_class)
    labels = np.tile(np.repeat([0, 1], per_class), num_slides)
    # each slide draws its own class directions (features carry the slide) or all share them (the class)
    directions = rng.normal(size=(num_slides if carry_slide else 1, 2, 32))
    base = directions[slides if carry_slide else np.zeros_like(slides), labels]
    return base + 0.2 * rng.normal(size=base.shape), labels, slides


def test_within_cross_gap_large_when_features_carry_the_slide():
    features, labels, slides = _slides_and_classes(carry_slide=True)
    result = within_cross_gap(features, labels, slides)
    assert result.within_slide_accuracy == 1.0 and result.gap > 0.3
    # of the 50 nearest, the 9 own-slide twins, then about 41 * 10 / 110 own-slide tiles of the other class
    assert result.same_slide_share == pytest.approx((9 + 41 * 10 / 110) / 50, abs=0.03)
    features, labels, slides = _slides_and_classes(carry_slide=False)
    result = within_cross_gap(features, labels, slides)
    assert result.within_slide_accuracy == 1.0 and result.cross_slide_accuracy == 1.0 and result.gap == 0.0
    # the 50 nearest are 50 of the 59 same-class tiles in random order, 9 of them from the query's slide
    assert result.same_slide_share == pytest.approx(9 / 59, abs=0.03)


def test_within_cross_gap_undefined():
    features = _angles([0, 10, 20, 30])
    single = within_cross_gap(features, [0, 1, 0, 1], ["s"] * 4)
    assert single.gap is None and single.within_slide_accuracy is not None and "single slide" in single.reason
    singletons = within_cross_gap(features, [0, 1, 0, 1], ["a", "b", "c", "d"])
    assert singletons.within_slide_accuracy is None and "single tile" in singletons.reason
    assert singletons.same_slide_share == 0.0


# ---------------------------------------------------------------------------- the earlier collapse measures


def test_slide_identity_knn_matches_sklearn_and_breaks_vote_ties_to_the_nearest():
    rng = np.random.default_rng(9)
    groups = np.repeat(np.arange(5), 30)
    features = rng.normal(size=(5, 16))[groups] + 1.5 * rng.normal(size=(150, 16))
    nearest = NearestNeighbors(n_neighbors=2, metric="cosine").fit(features).kneighbors(features)[1][:, 1]
    assert slide_identity_knn(features, groups, k=1) == pytest.approx(np.mean(groups[nearest] == groups))
    # k = 2 with one neighbour of each slide: the vote ties, the nearest decides
    features = _angles([0, 10, 25])
    assert slide_identity_knn(features, ["a", "a", "b"], k=2) == pytest.approx(2 / 3)  # 0->a, 1->a, 2->a


def test_between_group_variance_share_matches_numpy():
    rng = np.random.default_rng(10)
    groups = rng.integers(0, 4, 50)
    features = rng.normal(size=(50, 6)) + groups[:, None]
    total = ((features - features.mean(0)) ** 2).sum()
    within = sum(((features[groups == g] - features[groups == g].mean(0)) ** 2).sum() for g in range(4))
    assert between_group_variance_share(torch.tensor(features), groups) == pytest.approx(1 - within / total)
    assert between_group_variance_share(np.ones((4, 2)), [0, 0, 1, 1]) == 0.0


# ------------------------------------------------------------------------------ the fast exact search
# On the CPU from _FAST_SEARCH_MIN_SAMPLES samples the search runs on approximate (bfloat16 where the CPU has
# native bfloat16 products, float32 elsewhere) products with a proven candidate set; these tests lower the
# threshold so that small sets take that path, with blocks of 64 so that every block-pair case occurs.


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def fast_search(request, monkeypatch):
    """The fast path on any size, with the approximate dtype of the parameter. Counts the calls of its parts
    (searches, recomputed candidates, plain searches) and fails on the warning of a broken error bound."""
    monkeypatch.setattr(neighbours_module, "_FAST_SEARCH_MIN_SAMPLES", 0)
    monkeypatch.setattr(fast_search_module, "approximate_dtype", lambda device: request.param)
    calls = {"search": 0, "recomputed": 0, "plain": 0}

    def count(name, module, function, amount=lambda result: 1):
        def counted(*args, **kwargs):
            result = function(*args, **kwargs)
            calls[name] += amount(result)
            return result

        monkeypatch.setattr(module, function.__name__, counted)

    count("search", fast_search_module, fast_search_module.approximate_search)
    count(
        "recomputed",
        fast_search_module,
        fast_search_module._recompute,
        lambda found: 0 if found is None else len(found[0]),
    )
    count("plain", neighbours_module, neighbours_module._plain_top_k)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield calls


def _with_ties(seed, n=300, dim=12):
    """Features full of exact ties: a few vectors repeated many times, basis vectors, and random ones."""
    rng = np.random.default_rng(seed)
    distinct = rng.normal(size=(8, dim))
    features = np.concatenate(
        [
            distinct[rng.integers(0, 8, n // 2)],
            np.eye(dim)[rng.integers(0, dim, n // 4)],
            rng.normal(size=(n - n // 2 - n // 4, dim)),
        ]
    )
    return features[rng.permutation(n)]


@pytest.mark.parametrize("margin", [16, 0])
def test_fast_search_matches_brute_force_with_ties(fast_search, monkeypatch, margin):
    # margin 0: lists of k + 1 values, too short for most proofs, so that many rows are recomputed
    monkeypatch.setattr(fast_search_module, "_MARGIN", margin)
    for seed, features in enumerate([_with_ties(11), np.random.default_rng(12).normal(size=(333, 20))]):
        groups = np.random.default_rng(seed).integers(0, 25, len(features))
        for k in (1, 7):
            assert np.array_equal(nearest_neighbours(features, k, block=64), _brute_neighbours(features, k))
            assert np.array_equal(
                nearest_neighbours(features, k, exclude_groups=groups, block=64),
                _brute_neighbours(features, k, groups),
            )
    assert fast_search["search"] == 8 and fast_search["plain"] == 0
    # ties at the k-th place defeat the proof of a list: those rows were recomputed against their group
    assert fast_search["recomputed"] > 0


def test_fast_search_takes_the_same_neighbours_as_the_plain_one(fast_search):
    rng = np.random.default_rng(13)
    features = torch.from_numpy(rng.normal(size=(700, 32)).astype(np.float32))
    cases = rng.integers(0, 60, 700)
    fast = nearest_neighbours(features, 11, exclude_groups=cases, block=128)
    assert fast_search["search"] == 1
    neighbours_module._FAST_SEARCH_MIN_SAMPLES = 10**9
    # float32 products can only misorder similarities closer than float32 rounding; none are here
    assert np.array_equal(fast, nearest_neighbours(features, 11, exclude_groups=cases))


def test_fast_search_falls_back_where_its_bound_fails_or_ties_overflow(fast_search, monkeypatch):
    features = _with_ties(14)
    expected = _brute_neighbours(features, 5)
    real_bound = fast_search_module._error_bound
    # a bound that ignores rounding: the exact similarities fall outside it, the plain search answers
    monkeypatch.setattr(
        fast_search_module,
        "_error_bound",
        lambda unit, dtype, shift: dataclasses.replace(
            real_bound(unit, dtype, shift), base=0.0, relative=0.0
        ),
    )
    with pytest.warns(RuntimeWarning, match="outside their error bound"):
        assert np.array_equal(nearest_neighbours(features, 5, block=64), expected)
    assert fast_search["plain"] == 1
    monkeypatch.setattr(fast_search_module, "_error_bound", real_bound)
    # identical features: every sample ties with every other; past the candidate limit the plain search runs
    monkeypatch.setattr(fast_search_module, "_RECOMPUTED_CANDIDATES", 1000)
    same = np.ones((200, 4))
    assert np.array_equal(
        nearest_neighbours(same, 3, block=64),
        np.array([[j for j in range(200) if j != i][:3] for i in range(200)]),
    )
    assert fast_search["plain"] == 2


def _labs(seed, tiles=150, labs=4, dim=24, share_cases=True):
    """Paired tiles under several labs (virtual-labs style): a tile's features plus a lab shift and noise; cases
    of 10 tiles, the same case under every lab (``share_cases``) or one case per lab."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(tiles, dim))
    labels = rng.integers(0, 3, tiles)
    features = np.concatenate(
        [base + 0.8 * rng.normal(size=dim) + 0.6 * rng.normal(size=(tiles, dim)) for _ in range(labs)]
    )
    case = np.arange(tiles) // 10
    cases = np.tile(case, labs) if share_cases else np.concatenate([case + lab * 1000 for lab in range(labs)])
    return (
        torch.from_numpy(features.astype(np.float32)),
        np.tile(labels, labs),
        np.repeat([f"lab{i}" for i in range(labs)], tiles),
        cases,
        np.tile([f"t{i:03d}" for i in range(tiles)], labs),
    )


@pytest.mark.parametrize("share_cases", [True, False])
def test_fast_robustness_index_and_paired_retrieval_match_the_plain_path(fast_search, share_cases):
    features, labels, centers, cases, pairs = _labs(15, share_cases=share_cases)
    features[:40] = features[40:80]  # exact duplicates inside a lab: ties decided by pool position
    index = NeighbourIndex(features)
    ri = robustness_index(index, labels, centers, cases, bootstrap=0)
    shared = paired_retrieval(index, pairs, centers)  # reads the lists the robustness index left on the index
    assert fast_search["search"] == 1
    alone = paired_retrieval(features, pairs, centers, ks=(1, 5, 10))  # a new index: a search of its own
    assert fast_search["search"] == 2 and fast_search["plain"] == 0
    neighbours_module._FAST_SEARCH_MIN_SAMPLES = 10**9
    expected, so, os_ = _brute_robustness_index(
        features.numpy().astype(np.float64), labels, centers, cases, 11
    )
    assert (ri.value, ri.so, ri.os) == (pytest.approx(expected), so, os_)
    assert shared == paired_retrieval(features, pairs, centers)
    assert alone == paired_retrieval(features, pairs, centers, ks=(1, 5, 10))
    # the example decides something: neither all nor none of the tiles find their counterpart first
    top5 = [entry["top5"] for entry in alone.per_condition_pair]
    assert 0 < shared.top1 < 1 and 0 < min(top5) and max(top5) < 1


def test_one_index_serves_the_robustness_index_and_paired_retrieval_with_one_search(fast_search):
    features, labels, centers, cases, pairs = _labs(16)
    index = NeighbourIndex(features)
    ri = robustness_index(index, labels, centers, cases, bootstrap=0)
    shared = paired_retrieval(index, pairs, centers)
    assert fast_search["search"] == 1
    # a smaller k and other centre names of the same partition read the same lists
    renamed = np.char.add("site-", centers)
    assert robustness_index(index, labels, renamed, cases, k=5, bootstrap=0).value is not None
    assert paired_retrieval(index, pairs, renamed).top1 == shared.top1
    assert fast_search["search"] == 1
    # the index holds the vectors it was built on: changed in place afterwards, the features need a new index
    original = features.clone()
    features[:150] = features[150:300]  # lab0 = lab1
    assert paired_retrieval(index, pairs, centers) == shared
    changed = paired_retrieval(NeighbourIndex(features), pairs, centers)
    assert fast_search["search"] == 2
    by_pair = {(p["condition_a"], p["condition_b"]): p for p in changed.per_condition_pair}
    assert by_pair["lab0", "lab1"]["top1"] == 1.0
    neighbours_module._FAST_SEARCH_MIN_SAMPLES = 10**9
    assert changed == paired_retrieval(features, pairs, centers)
    assert shared == paired_retrieval(original, pairs, centers)
    assert ri == robustness_index(original, labels, centers, cases, bootstrap=0)


def test_an_index_keeps_its_search_for_a_smaller_k(fast_search):
    features = _with_ties(17)
    groups = np.random.default_rng(17).integers(0, 25, len(features))
    index = NeighbourIndex(features, block=64)
    for k in (7, 3, 1):
        assert np.array_equal(index.top_k(k), _brute_neighbours(features, k))
    assert fast_search["search"] == 1
    # leaving out other groups is another search, kept as well
    for k in (7, 2):
        assert np.array_equal(index.top_k(k, exclude_groups=groups), _brute_neighbours(features, k, groups))
    assert fast_search["search"] == 2
    # a larger k needs longer lists: a new search
    assert np.array_equal(index.top_k(9), _brute_neighbours(features, 9))
    assert fast_search["search"] == 3 and fast_search["plain"] == 0
