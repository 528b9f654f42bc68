"""Stochastic Tuning's mask schedule: a fresh mask of k coordinates at every step.

Each step draws k coordinates without replacement with probability ∝ w_i = (μ_i · θ_i · g_i)², where g is the
step's gradient and μ_i the mean absolute input activation of the connection (for a linear layer's weight W[o, j],
μ of input j over the batch's tokens; 1 for biases, norms and embeddings). Drawing uses the exponential race
(Gumbel top-k): keys w_i / E_i with E_i ~ Exp(1), keep the k largest — the same law as k successive draws without
replacement, on the device in a few d-sized kernels, with no d-sized allocation per step.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.lifted import LiftedBackbone


def exponential_race(weights: torch.Tensor, k: int, generator: torch.Generator,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of k draws without replacement, P ∝ ``weights`` (≥ 0): the k largest w_i / E_i, E_i ~ Exp(1).

    ``out`` (like ``weights``) holds the keys, so a caller stepping in a loop allocates nothing d-sized.
    """
    keys = (torch.empty_like(weights) if out is None else out).exponential_(generator=generator)
    torch.div(weights, keys, out=keys)
    return keys.topk(k, sorted=False).indices.sort().values


class StochasticMasks:
    def __init__(self, lifted: LiftedBackbone, k: int, seed: int = 0):
        if not 0 < k <= lifted.d:
            raise ValueError(f"k: must be in [1, {lifted.d}], got {k!r}")
        self.lifted, self.k = lifted, k
        device = lifted.theta_bar.device
        self.generator = torch.Generator(device).manual_seed(seed)
        self.weight = torch.empty_like(lifted.theta_bar)
        self.keys = torch.empty_like(lifted.theta_bar)
        self.mu: dict[str, torch.Tensor] = {}
        for name, shape in zip(lifted.layout.names, lifted.layout.shapes):
            owner = name.rpartition(".")[0]
            module = lifted.model.get_submodule(owner) if name.endswith(".weight") else None
            if isinstance(module, nn.Linear) and len(shape) == 2:
                module.register_forward_pre_hook(self._recorder(name))

    def _recorder(self, name: str):
        def hook(module, inputs):
            x = inputs[0].detach()
            self.mu[name] = x.abs().reshape(-1, x.shape[-1]).mean(0)
        return hook

    @torch.no_grad()
    def draw(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Sorted flat indices of this step's k coordinates, from the current θ and ∇θ (flat)."""
        w = torch.mul(theta, grad, out=self.weight).square_()
        for name, view in self.lifted.layout.split(w).items():
            if name in self.mu:
                view.mul_(self.mu[name].square())
        return exponential_race(w, self.k, self.generator, out=self.keys)
