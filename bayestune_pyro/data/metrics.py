"""Task metrics in numpy: accuracy, F1 and MCC for classification; Pearson, Spearman and MSE for regression."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from .tasks import TaskSpec


def compute_metrics(spec: TaskSpec, predictions: np.ndarray | torch.Tensor,
                    labels: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Metrics for ``spec`` from logits (n, C) or class ids (n,), or regression outputs (n,) / (n, 1).

    Classification gives ``accuracy``, ``f1`` (of class 1 for two classes, else macro) and ``mcc``;
    regression gives ``pearson``, ``spearman``, their mean ``pearson_spearman`` and ``mse``.
    """
    predictions, labels = _numpy(predictions), _numpy(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("labels: empty")
    if spec.is_regression:
        predictions = predictions.reshape(-1)
    elif predictions.ndim == 2:
        predictions = predictions.argmax(axis=1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions: shape {predictions.shape} does not match labels {labels.shape}")
    if spec.is_regression:
        pearson, spearman = _pearson(predictions, labels), _pearson(rankdata(predictions), rankdata(labels))
        metrics = {"pearson": pearson, "spearman": spearman, "pearson_spearman": (pearson + spearman) / 2,
                   "mse": float(np.mean((predictions - labels) ** 2))}
    else:
        predictions, labels = predictions.astype(np.int64), labels.astype(np.int64)
        metrics = {"accuracy": float(np.mean(predictions == labels)),
                   "f1": _f1(predictions, labels, binary=spec.num_labels == 2),
                   "mcc": _mcc(predictions, labels)}
    if spec.metric not in metrics:
        raise ValueError(f"spec.metric: unknown value {spec.metric!r}; choose one of: {', '.join(metrics)}")
    return metrics


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _f1(predictions: np.ndarray, labels: np.ndarray, *, binary: bool) -> float:
    """F1 of class 1, or the mean F1 over classes seen in either array (as sklearn does)."""
    classes = [1] if binary else np.union1d(predictions, labels)
    scores = []
    for c in classes:
        predicted, actual = predictions == c, labels == c
        total = predicted.sum() + actual.sum()  # = 2 TP + FP + FN
        scores.append(2 * np.sum(predicted & actual) / total if total else 0.0)
    return float(np.mean(scores))


def _mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (multiclass form); 0 when either array is constant."""
    k = int(max(predictions.max(), labels.max())) + 1
    confusion = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k).astype(np.float64)
    actual, predicted, n = confusion.sum(axis=1), confusion.sum(axis=0), confusion.sum()
    covariance = np.trace(confusion) * n - actual @ predicted
    scale = (n * n - actual @ actual) * (n * n - predicted @ predicted)
    return float(covariance / np.sqrt(scale)) if scale > 0 else 0.0


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either input has no variance."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    return float(np.clip(x @ y / np.sqrt((x @ x) * (y @ y)), -1.0, 1.0))
