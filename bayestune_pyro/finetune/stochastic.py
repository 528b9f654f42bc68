"""Stochastic Tuning: every step updates a fresh mask of k coordinates (``selection.stochastic``).

θ is a flat working copy bound to the module, so a backward pass writes the full ∇θ into one buffer (the mask
is drawn from it). The update is Adam restricted to the step's k coordinates: only their moments advance and
only they move (decoupled weight decay included); every other coordinate keeps its value — bitwise θ̄ for any
coordinate never drawn. Bias correction uses the global step count. Memory: θ, ∇θ and two moments (4 floats
per covered coordinate). ``n_updated`` is k per step; :meth:`n_changed` counts coordinates that left θ̄.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.lifted import LiftedBackbone
from ..selection.stochastic import StochasticMasks
from .stage2 import Stage2Config, Tuner


class StochasticTuner(Tuner):
    def __init__(self, lifted: LiftedBackbone, loss_fn: Callable, config: Stage2Config, k: int, seed: int = 0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(lifted, loss_fn, config)
        self.masks = StochasticMasks(lifted, k, seed)
        self.theta = lifted.theta_bar.clone()
        self.grad = torch.zeros_like(self.theta)
        lifted.bind(self.theta, self.grad)
        self.m, self.v = torch.zeros_like(self.theta), torch.zeros_like(self.theta)
        self.betas, self.eps, self.t = betas, eps, 0
        self.n_updated = k

    def forward(self, batch: dict) -> torch.Tensor:
        return self.lifted(self.theta, batch)

    @torch.no_grad()
    def update(self) -> None:
        index = self.masks.draw(self.theta, self.grad)
        self.t += 1
        (b1, b2), cfg = self.betas, self.config
        g = self.grad[index]
        m = self.m[index].mul_(b1).add_(g, alpha=1 - b1)
        v = self.v[index].mul_(b2).addcmul_(g, g, value=1 - b2)
        self.m[index], self.v[index] = m, v
        step = m.div_(v.div_(1 - b2**self.t).sqrt_().add_(self.eps)).mul_(cfg.lr / (1 - b1**self.t))
        theta = self.theta[index]
        theta.mul_(1 - cfg.lr * cfg.weight_decay).sub_(step)
        self.theta[index] = theta
        self.grad.zero_()

    def n_changed(self) -> int:
        return int((self.theta != self.lifted.theta_bar).sum())

    def trained(self) -> dict[str, torch.Tensor]:
        return {"theta": self.theta}

    @torch.no_grad()
    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        self.theta.copy_(state["theta"])
