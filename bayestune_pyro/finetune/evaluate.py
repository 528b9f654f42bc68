"""Evaluation: the task's metrics of a network over a loader."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..data import TaskSpec, compute_metrics


@torch.no_grad()
def predict(forward: Callable[[dict], torch.Tensor], loader,
            device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels) over a loader, concatenated on the CPU; ``forward`` maps a batch to logits."""
    outputs, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        outputs.append(forward(batch).float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(outputs), torch.cat(labels)


def evaluate(forward: Callable[[dict], torch.Tensor], loader, spec: TaskSpec,
             device: str | torch.device) -> dict[str, float]:
    outputs, labels = predict(forward, loader, device)
    if not torch.isfinite(outputs).all():
        raise FloatingPointError("evaluate: the network produced NaN/inf outputs")
    return compute_metrics(spec, outputs.numpy(), labels.numpy())
