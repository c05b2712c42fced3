"""Classification metrics of the pathology probing benchmarks as an `evaluate` metric module.

Load it offline from its path (the hub's metric scripts cannot be fetched without a network):

    metric = evaluate.load(str(METRIC_PATH))  # from exaonepath_hf.eval.common.metrics import METRIC_PATH
    metric.compute(predictions=[0, 1], references=[0, 0], scores=[[0.9, 0.1], [0.4, 0.6]])

Returns top-1 accuracy, balanced accuracy (mean recall over the classes present in the references),
macro-F1 (over the union of labels in references and predictions, 0 for a class never predicted nor
present correctly, as scikit-learn does), AUROC when `scores` (per-class probabilities or, for binary
tasks, one positive-class score per sample) are given, the confusion matrix and the sample count.
AUROC is one-vs-rest, macro-averaged over the classes that have both positive and negative references;
with none such it is None (undefined), never NaN.

Kept free of the project's own imports: `evaluate` copies this file into its module cache and parses its
import lines (one module per line).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class index per sample.
    references: true class index per sample.
    scores (optional, keyword of `compute`): per-class scores (e.g. softmax probabilities) per sample, or one positive-class score
        per sample for a binary task.
    num_classes (optional): number of classes, to size the confusion matrix.
Returns:
    top1, balanced_accuracy, macro_f1, auroc (None without scores), confusion_matrix, n.
"""
_CITATION = ""


def _average_ranks(values):
    """1-based ranks with ties given their average rank (the Mann-Whitney convention)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse]


def binary_auroc(is_positive, score):
    """Area under the ROC curve as the Mann-Whitney U statistic (exact, ties counted half)."""
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(predictions, references, scores=None, num_classes=None):
    predictions = np.asarray(predictions, dtype=np.int64)
    references = np.asarray(references, dtype=np.int64)
    if predictions.shape != references.shape or predictions.ndim != 1:
        raise ValueError(
            f"predictions {predictions.shape} and references {references.shape} must be equal-length 1-D"
        )
    if len(references) == 0:
        raise ValueError("no samples: predictions and references are empty")
    size = int(max(predictions.max(), references.max()) + 1)
    if num_classes is not None:
        if size > num_classes:
            raise ValueError(f"a label {size - 1} is out of range for num_classes={num_classes}")
        size = int(num_classes)
    confusion = np.zeros((size, size), dtype=np.int64)
    np.add.at(confusion, (references, predictions), 1)
    correct = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)

    present = support > 0
    balanced_accuracy = float(np.mean(correct[present] / support[present]))
    labelled = present | (predicted > 0)
    denominator = support + predicted
    f1 = np.divide(2 * correct, denominator, out=np.zeros_like(correct), where=denominator > 0)
    macro_f1 = float(np.mean(f1[labelled]))

    auroc = None
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.shape[0] != len(references):
            raise ValueError(f"scores has {scores.shape[0]} rows for {len(references)} references")
        if not np.all(np.isfinite(scores)):
            raise ValueError("scores contain NaN or infinite values")
        if scores.ndim == 1:
            auroc = binary_auroc(references == 1, scores)
        elif scores.shape[1] == 2:
            auroc = binary_auroc(references == 1, scores[:, 1])
        else:
            per_class = [binary_auroc(references == c, scores[:, c]) for c in range(scores.shape[1])]
            defined = [value for value in per_class if value is not None]
            auroc = float(np.mean(defined)) if defined else None

    return {
        "top1": float(correct.sum() / len(references)),
        "balanced_accuracy": balanced_accuracy,
        "macro_f1": macro_f1,
        "auroc": auroc,
        "confusion_matrix": confusion.tolist(),
        "n": int(len(references)),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PathologyMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # scores are a compute() keyword, not a feature: evaluate requires every feature of the
            # first format on each call, and scores are optional
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, scores=None, num_classes=None):
        return classification_metrics(predictions, references, scores=scores, num_classes=num_classes)
