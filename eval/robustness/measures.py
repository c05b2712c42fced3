"""Every robustness measure on one feature matrix, as the flat record of `robustness.json`: the field's metrics
(`metrics`) on one shared :class:`~.neighbours.NeighbourIndex`, each null with its reason where the data cannot
define it."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from .metrics import (
    between_group_variance_share,
    clustering_score,
    paired_retrieval,
    robustness_index,
    slide_identity_knn,
    within_cross_gap,
)
from .neighbours import NeighbourIndex
from .samples import SampleTable

__all__ = ["NO_CENTERS", "NO_LABELS", "NO_PAIRS", "MetricOptions", "measure", "scikit_learn_threads"]


@dataclass(frozen=True)
class MetricOptions:
    """Parameters of the measures: `k` of the robustness index (PathoROB: 11 on camelyon), its `bootstrap`
    replicates, `neighbours` of the within/cross-slide gap and slide-identity kNN, `share_neighbours` of the
    same-slide share, k-means `max_clusters` and `restarts` of the clustering score, the `seed`, and at most
    `tsne_samples` samples per t-SNE panel (a seeded subset above that). `threads` caps the OpenMP threads of
    scikit-learn's k-means and t-SNE: their spin-waiting threads slow down tenfold on shared, busy cores, and
    one thread loses little on the sizes measured here; None leaves the libraries' default. The neighbour
    searches keep torch's threads."""

    k: int = 11
    bootstrap: int = 1000
    neighbours: int = 5
    share_neighbours: int = 50
    max_clusters: int = 30
    restarts: int = 10
    seed: int = 0
    tsne_samples: int = 5000
    threads: int | None = 1


NO_LABELS = "the data has no biological class labels (`label` column)"
NO_CENTERS = "the data has no centres (`center` column)"
NO_PAIRS = (
    "the data has no pairs (`pair_id` column): paired retrieval needs the same tissue under 2+ conditions"
)


def scikit_learn_threads(threads: int | None) -> contextlib.AbstractContextManager:
    """Caps the OpenMP threads around scikit-learn's k-means and t-SNE only: the cap is process-wide while it
    lasts and would also hold torch's own OpenMP pool, which the neighbour searches use."""
    return (
        contextlib.nullcontext() if threads is None else threadpool_limits(limits=threads, user_api="openmp")
    )


@dataclass
class _Record:
    """What `measure` returns, filled measure by measure."""

    metrics: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def undefined(self, names: Sequence[str], reason: str) -> None:
        for name in names:
            self.metrics[name] = None
            self.reasons[name] = reason


def measure(
    features: torch.Tensor, samples: SampleTable, options: MetricOptions = MetricOptions()
) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Every measure on one feature matrix: (flat metrics, reason per null metric, full metric results).

    The flat names are those of `robustness.json`; the full results are the metric functions' `to_dict()`. One
    neighbour index serves every neighbour-based metric.
    """
    if features.shape[0] != len(samples):
        raise ValueError(f"{features.shape[0]} feature rows for {len(samples)} samples")
    index = NeighbourIndex(features)
    record = _Record()
    _robustness_index(record, index, samples, options)
    _clustering_score(record, features, samples, options)
    _paired_retrieval(record, index, samples)
    _slide_gap(record, index, samples, options)
    _slide_collapse(record, index, features, samples, options)
    _centre_variance(record, features, samples)
    return record.metrics, record.reasons, record.results


def _robustness_index(
    record: _Record, index: NeighbourIndex, samples: SampleTable, options: MetricOptions
) -> None:
    names = ("robustness_index", "robustness_index_k", "robustness_index_ci")
    if samples.label is None or samples.center is None:
        record.undefined(names, NO_LABELS if samples.label is None else NO_CENTERS)
        return
    ri = robustness_index(
        index,
        samples.label,
        samples.center,
        samples.case_id,
        k=options.k,
        bootstrap=options.bootstrap,
        seed=options.seed,
    )
    record.results["robustness_index"] = ri.to_dict()
    record.metrics["robustness_index"] = ri.value
    record.metrics["robustness_index_k"] = ri.k
    record.metrics["robustness_index_ci"] = [ri.ci_low, ri.ci_high] if ri.ci_low is not None else None
    if ri.value is None:
        record.reasons["robustness_index"] = ri.reason
    if record.metrics["robustness_index_ci"] is None:
        record.reasons["robustness_index_ci"] = ri.reason or "no bootstrap (--bootstrap 0)"


def _clustering_score(
    record: _Record, features: torch.Tensor, samples: SampleTable, options: MetricOptions
) -> None:
    names = ("clustering_score", "clustering_num_clusters")
    if samples.label is None or samples.center is None:
        record.undefined(names, NO_LABELS if samples.label is None else NO_CENTERS)
        return
    with scikit_learn_threads(options.threads):
        cs = clustering_score(
            features,
            samples.label,
            samples.center,
            max_clusters=options.max_clusters,
            restarts=options.restarts,
            seed=options.seed,
        )
    record.results["clustering_score"] = cs.to_dict()
    record.metrics["clustering_score"], record.metrics["clustering_num_clusters"] = cs.value, cs.num_clusters
    if cs.value is None:
        record.undefined(names, cs.reason)


def _paired_retrieval(record: _Record, index: NeighbourIndex, samples: SampleTable) -> None:
    names = ("paired_cosine", "paired_unpaired_cosine", "paired_top1", "paired_top10", "paired_num_pairs")
    if samples.pair_id is None or samples.center is None:
        record.undefined(names, NO_PAIRS if samples.pair_id is None else NO_CENTERS)
        return
    # the same index and centres as the robustness index: its search serves the pairs too
    paired = paired_retrieval(index, samples.pair_id, samples.center)
    record.results["paired_retrieval"] = paired.to_dict()
    record.metrics.update(
        paired_cosine=paired.cosine,
        paired_unpaired_cosine=paired.unpaired_cosine,
        paired_top1=paired.top1,
        paired_top10=paired.top10,
        paired_num_pairs=paired.num_pairs,
    )
    if paired.reason is not None:
        record.undefined(names[:4], paired.reason)
    elif paired.unpaired_cosine is None:
        record.undefined(
            ("paired_unpaired_cosine",), "no condition pair shares 2 tiles: no two different tiles to compare"
        )


def _slide_gap(record: _Record, index: NeighbourIndex, samples: SampleTable, options: MetricOptions) -> None:
    names = ("within_cross_gap", "within_slide_accuracy", "cross_slide_accuracy")
    labels = samples.label
    # the same-slide share does not depend on the class: without labels it comes from constant ones
    gap = within_cross_gap(
        index,
        labels if labels is not None else np.zeros(len(samples), dtype=np.int64),
        np.asarray(samples.slide_id),
        k=options.neighbours,
        neighbours_for_share=options.share_neighbours,
    )
    record.metrics["same_slide_share"] = gap.same_slide_share
    slides_of_case: dict[str, set[str]] = {}
    for case, slide in zip(samples.case_id, samples.slide_id, strict=True):
        slides_of_case.setdefault(case, set()).add(slide)
    if labels is None:
        record.undefined(names, NO_LABELS)
    elif any(len(found) > 1 for found in slides_of_case.values()):
        # leave-one-slide-out would then find the query's own case (e.g. its re-stainings) on the other slides
        record.undefined(
            names, "a case spans several slides (e.g. virtual labs: one image re-stained per lab)"
        )
    else:
        record.results["within_cross_gap"] = gap.to_dict()
        record.metrics.update(
            within_cross_gap=gap.gap,
            within_slide_accuracy=gap.within_slide_accuracy,
            cross_slide_accuracy=gap.cross_slide_accuracy,
        )
        for name in names:
            if record.metrics[name] is None:
                record.reasons[name] = gap.reason


def _slide_collapse(
    record: _Record,
    index: NeighbourIndex,
    features: torch.Tensor,
    samples: SampleTable,
    options: MetricOptions,
) -> None:
    """The earlier collapse measures by slide: kNN slide identity, the share of variance, the silhouette."""
    from sklearn.metrics import silhouette_score

    names = ("slide_identity_knn", "slide_identity_chance", "silhouette_by_slide", "variance_between_slides")
    slides = np.asarray(samples.slide_id)
    num_slides = len(set(samples.slide_id))
    if num_slides < 2:
        record.undefined(names, "a single slide")
        return
    prevalence = np.unique(slides, return_counts=True)[1] / len(slides)
    record.metrics["slide_identity_knn"] = slide_identity_knn(index, slides, k=options.neighbours)
    record.metrics["slide_identity_chance"] = float((prevalence**2).sum())
    record.metrics["variance_between_slides"] = between_group_variance_share(features, slides)
    if num_slides == len(slides):
        record.undefined(["silhouette_by_slide"], "every slide has a single sample")
        return
    record.metrics["silhouette_by_slide"] = float(
        silhouette_score(
            index.unit.float().cpu().numpy(),
            slides,
            metric="cosine",
            sample_size=min(len(slides), 10_000),
            random_state=options.seed,
        )
    )


def _centre_variance(record: _Record, features: torch.Tensor, samples: SampleTable) -> None:
    centers = samples.center
    if centers is None or len(set(centers)) < 2:
        record.undefined(["variance_between_centers"], NO_CENTERS if centers is None else "a single centre")
    else:
        record.metrics["variance_between_centers"] = between_group_variance_share(
            features, np.asarray(centers)
        )
