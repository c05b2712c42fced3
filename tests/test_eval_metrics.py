"""The evaluate metric module, loaded offline by path, against scikit-learn on the same predictions."""

import evaluate
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from exaonepath_hf.eval.common.metrics import METRIC_PATH


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(METRIC_PATH))


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("num_classes", [2, 3, 9])
def test_metrics_match_sklearn(metric, num_classes):
    rng = np.random.default_rng(num_classes)
    references = rng.integers(0, num_classes, size=400)
    references[:num_classes] = np.arange(
        num_classes
    )  # every class present, as sklearn's multiclass AUROC needs
    # informative but imperfect scores, rounded so that ties occur
    probs = _softmax(np.eye(num_classes)[references] * 1.5 + rng.normal(size=(400, num_classes))).round(2)
    probs = probs / probs.sum(axis=1, keepdims=True)
    predictions = probs.argmax(axis=1)
    scores = probs[:, 1] if num_classes == 2 else probs
    result = metric.compute(
        predictions=predictions.tolist(),
        references=references.tolist(),
        scores=scores.tolist(),
        num_classes=num_classes,
    )
    assert result["top1"] == pytest.approx(accuracy_score(references, predictions))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(references, predictions))
    assert result["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro"))
    expected_auc = (
        roc_auc_score(references, scores)
        if num_classes == 2
        else roc_auc_score(references, scores, multi_class="ovr")
    )
    assert result["auroc"] == pytest.approx(expected_auc, abs=1e-12)
    assert np.asarray(result["confusion_matrix"]).sum() == 400
    assert result["n"] == 400


def test_class_never_predicted_and_absent_classes(metric):
    references = [0, 0, 1, 1, 2, 2]
    predictions = [0, 0, 0, 1, 1, 3]  # class 2 never predicted, class 3 predicted but absent
    result = metric.compute(predictions=predictions, references=references, num_classes=4)
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(references, predictions))
    assert result["macro_f1"] == pytest.approx(
        f1_score(references, predictions, average="macro", zero_division=0)
    )
    assert result["auroc"] is None  # no scores given


def test_auroc_undefined_is_none_not_nan(metric):
    result = metric.compute(predictions=[1, 1, 0], references=[1, 1, 1], scores=[0.9, 0.8, 0.1])
    assert result["auroc"] is None
    assert result["top1"] == pytest.approx(2 / 3)


def test_bad_inputs_raise_clear_errors(metric):
    with pytest.raises(ValueError, match="out of range"):
        metric.compute(predictions=[0, 5], references=[0, 1], num_classes=2)
    with pytest.raises(ValueError, match="NaN"):
        metric.compute(predictions=[0, 1], references=[0, 1], scores=[0.1, float("nan")])
