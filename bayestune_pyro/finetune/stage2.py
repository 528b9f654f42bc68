"""Stage 2: fine-tune only the masked coordinates of θ, and the head.

The trainable state is a k-vector δ (k = mask size) and the head; the network runs with
θ = θ̄ + scatter(δ at the mask), built out of place each step. Every unmasked covered coordinate is therefore
a copy of θ̄ — bitwise, whatever the optimiser does — and the optimiser state is k-sized, not d-sized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..models.lifted import LiftedBackbone
from .delta import SparseDelta


@dataclass(frozen=True)
class Stage2Config:
    steps: int = 300
    lr: float = 1e-3
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    log_every: int = 20


class SparseFineTuner:
    """θ(δ) = θ̄ + δ on ``index`` (sorted flat indices), trained with AdamW together with the head."""

    def __init__(self, lifted: LiftedBackbone, index: torch.Tensor, loss_fn):
        self.lifted, self.loss_fn = lifted, loss_fn
        self.index = index.to(lifted.theta_bar.device)
        self.delta = torch.zeros(self.index.numel(), device=self.index.device, requires_grad=True)

    def theta(self) -> torch.Tensor:
        return self.lifted.theta_bar.index_add(0, self.index, self.delta)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.lifted(self.theta(), batch)

    def train(self, batches: Iterator[dict], config: Stage2Config, progress: bool = True) -> list[float]:
        """Run ``config.steps`` AdamW steps; returns the loss logged every ``log_every`` steps."""
        device = self.lifted.theta_bar.device
        opt = torch.optim.AdamW([
            {"params": [self.delta], "lr": config.lr, "weight_decay": config.weight_decay},
            {"params": self.lifted.head_parameters(), "lr": config.head_lr, "weight_decay": config.weight_decay},
        ])
        self.lifted.model.train()
        losses, bad = [], torch.zeros((), dtype=torch.bool, device=device)
        bar = tqdm(range(config.steps), desc="stage 2", disable=not progress, dynamic_ncols=True)
        for step in bar:
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            loss = self.loss_fn(self.forward(batch), batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bad |= ~torch.isfinite(loss.detach())
            if step % config.log_every == 0 or step == config.steps - 1:
                if bad.item():
                    raise FloatingPointError(f"stage 2: loss became NaN/inf at or before step {step}; lower --stage2-lr")
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        self.lifted.model.eval()
        return losses

    def sparse_delta(self, backbone: str, num_labels: int, seed: int, pretrained: bool) -> SparseDelta:
        named = dict(self.lifted.model.named_parameters())
        head = {n: named[n] for n in self.lifted.head_names}
        return SparseDelta.from_flat(self.lifted.layout, self.index, self.delta, head, backbone, num_labels,
                                     seed, pretrained)
