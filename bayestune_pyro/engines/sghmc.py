"""Engine ``sghmc``: stochastic-gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014) over (θ, log λ).

In the per-sample units of ``inference.sgld`` (ĝ = ∇(U/N̂), step η = lr/N̂ on U), with friction α ∈ (0, 1]
and the preconditioner G of pSGLD (rmsprop, frozen when sampling starts) as the inverse mass:

    v ← (1 − α)·v − lr·G·ĝ + γ·√(2·α·lr·G/N̂)·ξ,      z ← z + v

α = 1 is the SGLD step exactly; smaller α carries momentum across steps, so a chain travels further per
gradient. The minibatch-noise correction β̂ is taken as 0, as in the paper's practical algorithm. Validity
against NUTS on the logistic toy: ``benchmarks/sampler_validity.py --only logistic``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..config import check_noise_discount, option
from ..inference.potential import Potential
from ..inference.sgld import SGLD, SGLDConfig
from . import Engine, register
from .sgld import LangevinKernel, MAPOptions, precond_eps


class SGHMC(SGLD):
    """The SGHMC update of flat sites; one momentum buffer per site beside the preconditioner's."""

    def __init__(self, config: SGLDConfig, sites: dict[str, torch.Tensor], generator: torch.Generator,
                 workspace: tuple[torch.Tensor, torch.Tensor] | None = None, friction: float = 0.1):
        if config.preconditioner not in ("none", "rmsprop"):
            raise ValueError(f"preconditioner: sghmc takes none or rmsprop, got {config.preconditioner!r}")
        if not 0 < friction <= 1:
            raise ValueError(f"friction: must be in (0, 1], got {friction!r}")
        super().__init__(config, sites, generator, workspace)
        self.friction = friction
        for k, z in sites.items():
            self.state[k]["momentum"] = torch.zeros_like(z)

    def _update(self, z, g, s, lr: float, gamma: float, t: int, xi, work, frozen_at: int | None) -> None:
        a, v, n_hat = self.friction, s["momentum"], self.config.n_hat
        v.mul_(1.0 - a)
        if self.config.preconditioner == "none":
            v.sub_(g, alpha=lr)
            if xi is not None:
                v.add_(xi, alpha=gamma * math.sqrt(2.0 * a * lr / n_hat))
        else:
            adapt, root_c = self.correction(t, frozen_at)
            precond = self.rmsprop(g, s, root_c, adapt, work)
            v.addcmul_(precond, g, value=-lr * root_c)
            if xi is not None:
                v.addcmul_(precond.sqrt_(), xi, value=gamma * math.sqrt(2.0 * a * lr * root_c / n_hat))
        z.add_(v)


@dataclass
class SGHMCOptions(MAPOptions):
    GRID = ("gamma",)

    gamma: float | list[float] = option(1.0, "noise discount γ (temperature γ²); a list is a grid, like sgld's")
    friction: float = option(0.1, "sghmc: friction α in (0, 1] (1 − α is the momentum kept per step; 1 is SGLD)")

    def check(self):
        super().check()
        if self.preconditioner == "adam":
            raise ValueError("preconditioner: sghmc takes none or rmsprop, got 'adam'")
        if not 0 < self.friction <= 1:
            raise ValueError(f"friction: must be in (0, 1], got {self.friction!r}")
        check_noise_discount(self)


def sghmc_kernel(s, options, e: SGHMCOptions, seed: int) -> LangevinKernel:
    config = SGLDConfig(n_hat=options.n_hat, gamma=e.gamma, preconditioner=e.preconditioner,
                        eps=precond_eps(e, options), clip_norm=e.clip_norm,
                        freeze_preconditioner=e.freeze_preconditioner)
    rule = functools.partial(SGHMC, friction=e.friction)
    return LangevinKernel(s, options, seed, config, Potential(s.model), rule=rule)


register(Engine("sghmc", "stochastic-gradient HMC with friction α, preconditioned like pSGLD", sghmc_kernel,
                SGHMCOptions))
