"""Calibration of the test split: NLL, Brier score, ECE and its reliability table; classification only."""
import math

import numpy as np
import pytest
import torch

from bayestune_pyro.data import TaskSpec
from bayestune_pyro.data.calibration import calibration, ece, fit_temperature
from bayestune_pyro.finetune.evaluate import evaluate, predict, score

THREE = TaskSpec("three", 3, "accuracy", ("a", "b", "c"))
REGRESSION = TaskSpec("stsb", 1, "pearson_spearman", ())


def binary_logits(p_class1: list[float]) -> torch.Tensor:
    """Two-class logits whose softmax gives class 1 the probability ``p_class1``."""
    p = torch.tensor(p_class1, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


def test_confident_correct_predictions_are_perfectly_calibrated():
    labels = torch.tensor([0, 2, 1, 1, 0])
    scores, table = calibration(100.0 * torch.nn.functional.one_hot(labels, 3).float(), labels)
    assert scores["ece"] == 0.0
    assert 0 <= scores["nll"] < 1e-40 and 0 <= scores["brier"] < 1e-80
    assert table["count"] == [0] * 14 + [5] and table["accuracy"][14] == 1.0  # confidence 1 is in the last bin


def test_a_hand_computed_two_bin_example():
    # confidence 0.7 twice (one right, one wrong) and 0.9 twice (both right): bins (10/15, 11/15] and (13/15, 14/15]
    scores, table = calibration(binary_logits([0.7, 0.7, 0.9, 0.9]), torch.tensor([1, 0, 1, 1]))
    assert [i for i, k in enumerate(table["count"]) if k] == [10, 13]
    assert table["accuracy"][10] == 0.5 and table["accuracy"][13] == 1.0
    assert table["confidence"][10] == pytest.approx(0.7) and table["confidence"][13] == pytest.approx(0.9)
    assert table["accuracy"][0] is None and table["confidence"][0] is None  # empty bins: no value, not 0
    assert scores["ece"] == pytest.approx(2 / 4 * abs(0.5 - 0.7) + 2 / 4 * abs(1.0 - 0.9))  # 0.15
    assert scores["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3) + 2 * math.log(0.9)) / 4)
    # Σ_c (p_c − y_c)²: right at 0.7 → 2·0.3², wrong at 0.7 → 2·0.7², right at 0.9 → 2·0.1² (twice)
    assert scores["brier"] == pytest.approx((0.18 + 0.98 + 0.02 + 0.02) / 4)


def test_brier_nll_and_ece_agree_with_independent_computations_on_random_logits():
    torchmetrics = pytest.importorskip("torchmetrics.functional.classification")
    gen = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(500, 4, generator=gen)
    labels = torch.randint(0, 4, (500,), generator=gen)
    scores, table = calibration(logits, labels)
    x = logits.double().numpy()
    probs = np.exp(x - x.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    onehot = np.eye(4)[labels.numpy()]
    assert scores["brier"] == pytest.approx(np.mean(np.sum((probs - onehot) ** 2, axis=1)), rel=1e-12)
    assert scores["nll"] == pytest.approx(-np.mean(np.log(probs[np.arange(500), labels.numpy()])), rel=1e-12)
    reference = torchmetrics.multiclass_calibration_error(torch.from_numpy(probs), labels, num_classes=4, n_bins=15,
                                                          norm="l1")
    assert scores["ece"] == pytest.approx(reference.item(), abs=1e-6)  # torchmetrics bins in float32
    assert sum(table["count"]) == 500 and ece(table) == scores["ece"]


def test_bad_input_is_a_one_line_error_naming_the_field():
    with pytest.raises(ValueError, match=r"logits: expected shape \(n, classes ≥ 2\), got \(4, 1\)"):
        calibration(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match=r"labels: expected shape \(4,\)"):
        calibration(torch.zeros(4, 3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"labels: class ids must be in \[0, 3\), got 0..3"):
        calibration(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))


def loader_of(outputs: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    return [{"x": outputs[i:i + 2], "labels": labels[i:i + 2]} for i in range(0, len(labels), 2)]


def test_test_scoring_adds_calibration_for_classification_only_and_validation_scores_the_metric_only():
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(6, 3, generator=gen), torch.tensor([0, 1, 2, 2, 1, 0])
    loader = loader_of(logits, labels)
    scores, table = score(*predict(lambda b: b["x"], loader, "cpu"), THREE)
    assert set(scores) == {"accuracy", "f1", "mcc", "nll", "brier", "ece"}
    assert scores["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits.double(), labels).item())
    assert sum(table["count"]) == 6
    assert set(evaluate(lambda b: b["x"], loader, THREE, "cpu")) == {"accuracy", "f1", "mcc"}
    targets = torch.linspace(0, 5, 6)
    scores, table = score(*predict(lambda b: b["x"], loader_of(targets[:, None] + 0.1, targets), "cpu"), REGRESSION)
    assert set(scores) == {"pearson", "spearman", "pearson_spearman", "mse"} and table is None


def test_probabilities_score_as_their_logits():
    """An ensemble's mean probabilities score exactly as logits whose softmax they are (log p is such a logit)."""
    gen = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(40, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (40,), generator=gen)
    from_logits, table = score(logits, labels, THREE)
    from_probs, table_p = score(logits.softmax(-1), labels, THREE, probabilities=True)
    assert from_probs == pytest.approx(from_logits, rel=1e-12) and table_p == table


def test_temperature_recovers_the_temperature_that_made_the_labels():
    """Labels drawn from softmax(z / 2.5) of logits z: the NLL-optimal temperature on them is ~2.5, and at it the NLL
    is no larger than at T = 1 or at nearby temperatures."""
    gen = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(20_000, 4, generator=gen, dtype=torch.float64)
    labels = torch.multinomial((logits / 2.5).softmax(-1), 1, generator=gen).squeeze(1)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    nll = lambda temp: torch.nn.functional.cross_entropy(logits / temp, labels).item()  # noqa: E731
    assert nll(t) <= min(nll(1.0), nll(t * 1.05), nll(t / 1.05))
