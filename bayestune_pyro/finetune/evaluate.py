"""Evaluation: the task's metrics of a network over a loader, and on the test split its calibration too."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..data import TaskSpec, compute_metrics
from ..data.calibration import calibration


@torch.no_grad()
def predict(forward: Callable[[dict], torch.Tensor], loader,
            device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels) over a loader, concatenated on the CPU; ``forward`` maps a batch to logits."""
    outputs, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs.append(forward(batch).float().cpu())
        labels.append(batch["labels"].cpu())
    outputs = torch.cat(outputs)
    if not torch.isfinite(outputs).all():
        raise FloatingPointError("evaluate: the network produced NaN/inf outputs")
    return outputs, torch.cat(labels)


def evaluate(forward: Callable[[dict], torch.Tensor], loader, spec: TaskSpec,
             device: str | torch.device) -> dict[str, float]:
    """The task's metrics (``compute_metrics``); what validation scores."""
    outputs, labels = predict(forward, loader, device)
    return compute_metrics(spec, outputs.numpy(), labels.numpy())


def score(outputs: torch.Tensor, labels: torch.Tensor, spec: TaskSpec,
          probabilities: bool = False) -> tuple[dict[str, float], dict | None]:
    """The task's metrics of ``outputs`` (logits, or with ``probabilities`` class probabilities, e.g. an
    ensemble's mean) plus, for a classification task, ``nll``, ``brier`` and ``ece`` of its predictive distribution,
    and the reliability table behind the ECE (``data.calibration``). A regression task gets no calibration keys and
    no table (None): its Gaussian likelihood's σ is a fixed setting, not a prediction."""
    scores = compute_metrics(spec, outputs.numpy(), labels.numpy())
    if spec.is_regression:
        return scores, None
    if probabilities:  # log p is a logit vector whose softmax is p
        outputs = outputs.double().clamp_min(torch.finfo(torch.float64).tiny).log()
    calibrated, table = calibration(outputs, labels)
    return {**scores, **calibrated}, table
