"""Dense fine-tuning of every covered coordinate: the ``full`` baseline and the first stage of L1-SP.

θ is one flat trainable copy of θ̄ bound to the module (gradients land in one flat buffer, no per-step d-sized
allocation), updated by AdamW. With ``l1 > 0`` the loss gains l1·‖θ − θ̄‖₁ (its subgradient l1·sign(θ − θ̄) is
added to ∇θ), which keeps most coordinates at θ̄ and lets the useful ones move: L1-SP.
Memory: θ, ∇θ and AdamW's two moments, 4 floats per covered coordinate.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.lifted import LiftedBackbone
from .stage2 import Stage2Config, Tuner


class DenseFineTuner(Tuner):
    def __init__(self, lifted: LiftedBackbone, loss_fn: Callable, config: Stage2Config = Stage2Config(),
                 l1: float = 0.0):
        if l1 < 0:
            raise ValueError(f"l1: must be >= 0, got {l1!r}")
        super().__init__(lifted, loss_fn, config)
        self.l1 = l1
        self.theta = lifted.theta_bar.clone()
        self.theta.grad = torch.zeros_like(self.theta)
        lifted.bind(self.theta, self.theta.grad)
        self.opt = torch.optim.AdamW([self.theta], lr=config.lr, weight_decay=config.weight_decay)
        self.n_updated = lifted.d

    def forward(self, batch: dict) -> torch.Tensor:
        return self.lifted(self.theta, batch)

    def update(self) -> None:
        if self.l1:
            self.theta.grad.add_(torch.sign(self.theta - self.lifted.theta_bar), alpha=self.l1)
        self.opt.step()
        self.theta.grad.zero_()

    def trained(self) -> dict[str, torch.Tensor]:
        return {"theta": self.theta}

    @torch.no_grad()
    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        self.theta.copy_(state["theta"])
