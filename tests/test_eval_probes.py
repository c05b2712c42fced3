"""Linear probes: the paper's SGD protocol (hand-derived first step, selection on validation), eva's early
stopping, L-BFGS against scikit-learn's LogisticRegression."""

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from exaonepath_hf.eval.common.records import summarize_seeds
from exaonepath_hf.eval.patch.probes import PRESETS, FeatureSplit, fit_linear_probe, predict


def _blobs(n: int, dim: int = 16, classes: int = 3, spread: float = 1.0, seed: int = 0) -> FeatureSplit:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.randint(0, classes, (n,), generator=generator)
    return FeatureSplit(centers[labels] + spread * torch.randn(n, dim, generator=generator), labels)


def test_paper_preset_is_the_papers_protocol():
    paper = PRESETS["paper"]
    assert (paper.optimizer, paper.lr, paper.momentum, paper.weight_decay) == ("sgd", 0.1, 0.9, 0.0)
    assert (paper.batch_size, paper.iterations, paper.seeds) == (128, 12_500, (0,))
    eva = PRESETS["eva"]
    assert (eva.optimizer, eva.lr, eva.batch_size, eva.iterations) == ("adamw", 3e-4, 256, 12_500)
    assert eva.selection_metric == "balanced_accuracy" and len(eva.seeds) == 5 and eva.patience


def test_first_sgd_step_matches_the_hand_derived_update():
    train, val = _blobs(64), _blobs(32, seed=1)
    config = dataclasses.replace(
        PRESETS["paper"], iterations=1, eval_every=1, batch_size=64, lr_schedule="constant"
    )
    fit = fit_linear_probe(train, val, config, num_classes=3, seed=7)
    # DINO's init (normal std 0.01, zero bias) from the seed, then one full-batch momentum-SGD step:
    # the momentum buffer starts at the gradient, so W1 = W0 - lr * dL/dW with L the mean cross-entropy.
    w0 = torch.randn(3, 16, generator=torch.Generator().manual_seed(7)) * 0.01
    probs = torch.softmax(train.features @ w0.T, dim=1)
    residual = (probs - torch.nn.functional.one_hot(train.labels, 3)) / 64
    expected_w = w0 - 0.1 * residual.T @ train.features
    expected_b = -0.1 * residual.sum(dim=0)
    torch.testing.assert_close(fit.linear.weight.detach(), expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fit.linear.bias.detach(), expected_b, rtol=1e-5, atol=1e-6)


def test_sgd_learns_and_selects_the_best_validation_step():
    train, val, test = (
        _blobs(600, spread=2.5),
        _blobs(200, spread=2.5, seed=1),
        _blobs(200, spread=2.5, seed=2),
    )
    config = dataclasses.replace(PRESETS["paper"], iterations=300, eval_every=30)
    fit = fit_linear_probe(train, val, config, num_classes=3)
    scores = [h["val_top1"] for h in fit.history]
    assert len(fit.history) == 10
    assert fit.selected_val_score == max(scores)
    assert fit.selected_step == fit.history[scores.index(max(scores))]["step"]
    # the restored classifier is the selected one
    val_accuracy = (predict(fit.linear, val.features).argmax(1) == val.labels).float().mean().item()
    assert val_accuracy == pytest.approx(fit.selected_val_score)
    test_accuracy = (predict(fit.linear, test.features).argmax(1) == test.labels).float().mean().item()
    assert test_accuracy > 0.8


def test_seeds_are_reproducible_and_distinct():
    train, val = _blobs(300), _blobs(100, seed=1)
    config = dataclasses.replace(PRESETS["eva"], iterations=40, eval_every=20)
    a = fit_linear_probe(train, val, config, 3, seed=1)
    b = fit_linear_probe(train, val, config, 3, seed=1)
    c = fit_linear_probe(train, val, config, 3, seed=2)
    assert torch.equal(a.linear.weight, b.linear.weight)
    assert not torch.equal(a.linear.weight, c.linear.weight)


def test_eva_early_stopping():
    train, val = (
        _blobs(400, spread=0.1),
        _blobs(100, spread=0.1, seed=1),
    )  # perfectly separable: no later gain
    config = dataclasses.replace(PRESETS["eva"], lr=0.05, iterations=5_000, eval_every=10, patience=3)
    fit = fit_linear_probe(train, val, config, 3)
    assert fit.selected_val_score == 1.0
    assert len(fit.history) == fit.selected_step // 10 + 3  # stopped after 3 evaluations without improvement
    assert fit.history[-1]["step"] < 5_000


def test_lbfgs_matches_sklearn_logistic_regression():
    train, val = _blobs(300, dim=8, spread=2.0), _blobs(100, dim=8, spread=2.0, seed=1)
    l2 = 1e-2
    config = dataclasses.replace(PRESETS["lbfgs"], l2_grid=(l2,), lbfgs_max_iter=1000)
    fit = fit_linear_probe(train, val, config, 3)
    # ours: mean CE + l2/2 |W|^2; sklearn: C * sum CE + 1/2 |W|^2  =>  C = 1 / (l2 * N)
    reference = LogisticRegression(C=1 / (l2 * 300), max_iter=5000, tol=1e-10).fit(
        train.features.numpy(), train.labels.numpy()
    )
    ours = predict(fit.linear, val.features).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(val.features.numpy()), atol=2e-3)
    assert fit.l2 == l2


def test_lbfgs_picks_the_strength_best_on_validation():
    train, val = _blobs(200, dim=8, spread=3.0), _blobs(100, dim=8, spread=3.0, seed=1)
    fit = fit_linear_probe(train, val, PRESETS["lbfgs"], 3)
    scores = {h["l2"]: h["val_balanced_accuracy"] for h in fit.history}
    assert len(scores) == len(PRESETS["lbfgs"].l2_grid)
    assert scores[fit.l2] == max(scores.values())


def test_bad_features_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        FeatureSplit(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        FeatureSplit(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        fit_linear_probe(_blobs(10), _blobs(10, seed=1), PRESETS["paper"], num_classes=2)


def test_summarize_seeds():
    per_seed = [{"top1": 0.8, "auroc": None}, {"top1": 0.9, "auroc": None}, {"top1": 0.7, "auroc": None}]
    summary = summarize_seeds(per_seed, ("top1", "auroc"))
    assert summary["top1"]["mean"] == pytest.approx(0.8)
    assert summary["top1"]["sd"] == pytest.approx(np.std([0.8, 0.9, 0.7], ddof=1))
    assert summary["auroc"] == {"mean": None, "sd": None, "n": 0}
