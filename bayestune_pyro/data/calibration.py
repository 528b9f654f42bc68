"""Calibration of a classifier's softmax on a labelled split: NLL, multi-class Brier score, top-1 ECE, and the
reliability table behind the ECE.

The ECE uses ``BINS`` equal-width bins of the top-1 confidence c, bin b holding (b − 1)/B < c ≤ b/B (Guo et al.,
2017): ECE = Σ_b n_b/n · |accuracy_b − confidence_b|. torchmetrics' ``multiclass_calibration_error`` agrees except
that it puts a confidence of exactly 1 (a saturated float32 softmax) in a bin of its own, which the table here would
have to leave out; so the ECE is computed from the table it is drawn from. :func:`fit_temperature` is the
post-hoc baseline a posterior predictive is measured against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

BINS = 15


def calibration(logits: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> tuple[dict[str, float], dict]:
    """({``nll``, ``brier``, ``ece``}, reliability table) of logits (n, C) for class labels (n,), in float64.

    ``nll`` is the mean −log softmax of the true class, ``brier`` the mean over examples of Σ_c (p_c − y_c)², and the
    table is {``bins``, per bin ``count``, ``accuracy`` and mean ``confidence`` (None for an empty bin)}.
    """
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits: expected shape (n, classes ≥ 2), got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1] or labels.numel() == 0:
        raise ValueError(f"labels: expected shape ({logits.shape[0]},) with n > 0, got {tuple(labels.shape)}")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels: class ids must be in [0, {logits.shape[1]}), got {labels.min()}..{labels.max()}")
    logits = logits.double()
    probs = logits.softmax(dim=1)
    brier = (probs - F.one_hot(labels, logits.shape[1])).square().sum(dim=1).mean()
    table = reliability(*probs.max(dim=1), labels, bins)
    scores = {"nll": F.cross_entropy(logits, labels).item(), "brier": brier.item(), "ece": ece(table)}
    return scores, table


def reliability(confidence: torch.Tensor, prediction: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> dict:
    """Per equal-width bin of the top-1 ``confidence``: the count, the accuracy of ``prediction`` and the mean
    confidence (None where the bin is empty)."""
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    index = (torch.bucketize(confidence, edges) - 1).clamp(0, bins - 1)  # (b/B, (b+1)/B] → b; 0 joins the first
    count = torch.bincount(index, minlength=bins)
    correct = torch.bincount(index, weights=(prediction == labels).double(), minlength=bins)
    total = torch.bincount(index, weights=confidence.double(), minlength=bins)
    return {"bins": bins, "count": count.tolist(),
            "accuracy": [(c / n).item() if n else None for c, n in zip(correct, count)],
            "confidence": [(s / n).item() if n else None for s, n in zip(total, count)]}


def ece(table: dict) -> float:
    """The expected calibration error of a reliability table: Σ_b n_b/n · |accuracy_b − confidence_b|."""
    n = sum(table["count"])
    return sum(k / n * abs(a - c) for k, a, c in zip(table["count"], table["accuracy"], table["confidence"]) if k)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al., 2017): the T in [1/20, 20] that minimises the NLL of softmax(logits / T) on a
    held-out split. The NLL is convex in 1/T, so a bounded scalar search over log T finds its minimum."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    bound = math.log(20.0)
    return math.exp(minimize_scalar(nll, bounds=(-bound, bound), method="bounded", options={"xatol": 1e-4}).x)
