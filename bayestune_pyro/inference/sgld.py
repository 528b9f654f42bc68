"""The SGLD kernel (eq. 5 of BayesTune) over flat latent sites, with tempering and preconditioning.

Everything is in per-sample units: ĝ = ∇(U/N̂), the gradient of the mean minibatch NLL plus (1/N̂) times the
negative log prior. With the paper's step η = 2·lr/N̂, eq. 5  z ← z + (η/2)∇log p + γ√η·ξ  becomes

    none     z ← z − lr·ĝ + γ·√(2·lr/N̂)·ξ
    rmsprop  v ← ρ·v + (1−ρ)·ĝ²,  G = 1/(√(v/(1−ρᵗ)) + ε),  z ← z − lr·G·ĝ + γ·√(2·lr·G/N̂)·ξ     (pSGLD, no Γ term)
    adam     g̃ = ĝ + γ·√(2/(lr·N̂))·ξ, then an Adam step on g̃   (the original code; *not* a valid sampler)

After :meth:`SGLD.freeze` (the sgld engine calls it when sampling starts, if ``freeze_preconditioner``) G stops
adapting: the kernel is then exact SGLD with a constant preconditioner, and no Γ term is dropped.

ξ ~ N(0, I) (:class:`GaussianNoise`: parallel streams on CPU); γ is the noise discount (temperature T = γ²; γ = 0
is MAP/optimisation). Each site has its own lr (θ: 1e-4, log λ: 1e-2 by default). Work per step is a fixed number
of whole-tensor kernels per site (one for rmsprop on large sites: ``inference.fused``): no Python loops over
coordinates and no host syncs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import fused
from .noise import GaussianNoise

PRECONDITIONERS = ("none", "rmsprop", "adam")


@dataclass(frozen=True)
class SGLDConfig:
    """Hyper-parameters of the kernel (per-site learning rates are given to :meth:`SGLD.step`)."""

    n_hat: float = 1e9
    gamma: float = 1.0
    preconditioner: str = "rmsprop"
    rho: float = 0.9999  # slow preconditioner: G ~ constant over ~10⁴ steps, so dropping Γ costs < 3 MCSE on the toy
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8  # G ≤ 1/ε; the pipeline sets 1/(λ₀·N̂), the prior's gradient scale (see RunConfig.precond_eps)
    clip_norm: float | None = None
    freeze_preconditioner: bool = True  # rmsprop: G fixed from the first sampling step (exact SGLD with constant G)

    def __post_init__(self):
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner: unknown value {self.preconditioner!r}; "
                             f"choose one of: {', '.join(PRECONDITIONERS)}")
        if not self.gamma >= 0:
            raise ValueError(f"gamma: must be >= 0 (0 is MAP), got {self.gamma!r}")
        if not 0 <= self.rho < 1:
            raise ValueError(f"rho: must be in [0, 1), got {self.rho!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm: must be > 0 or unset, got {self.clip_norm!r}")


class SGLD:
    """Stateful Langevin updates of a fixed set of flat sites (e.g. θ and log λ).

    Memory per covered coordinate and site: ``v`` (rmsprop) or ``m, v`` (adam); one noise and one scratch
    buffer serve all sites, so a step allocates nothing of size d. They are the caller's ``workspace`` (two
    buffers at least as large as the largest site, free between steps: the potential's) or else allocated here.
    """

    def __init__(self, config: SGLDConfig, sites: dict[str, torch.Tensor], generator: torch.Generator,
                 workspace: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.config, self.generator = config, generator
        self.noise = GaussianNoise(generator)
        moments = {"none": (), "rmsprop": ("v",), "adam": ("m", "v")}[config.preconditioner]
        self.state = {k: {m: torch.zeros_like(z, requires_grad=False) for m in moments} for k, z in sites.items()}
        self.steps = {k: 0 for k in sites}  # per site: log λ is frozen during warm-up
        self.frozen_at: dict[str, int] = {}  # per site: the step whose G is kept (see :meth:`freeze`)
        largest = max(sites.values(), key=torch.Tensor.numel)
        if workspace is None:
            workspace = tuple(largest.new_empty(largest.numel()) for _ in range(2))
        elif any(w.numel() < largest.numel() or w.dtype != largest.dtype for w in workspace[:2]):
            raise ValueError(f"workspace: needs two {largest.dtype} buffers of at least {largest.numel()} elements")
        self._noise, self._scratch = (w.view(-1) for w in workspace[:2])

    def freeze(self) -> None:
        """Stop adapting the rmsprop preconditioner: later steps use the G of the steps taken so far.

        A site that has not stepped yet has no G to keep, so it goes on adapting.
        """
        self.frozen_at = {k: t for k, t in self.steps.items() if t > 0}

    @torch.no_grad()
    def step(self, sites: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lrs: dict[str, float],
             noise: bool = True) -> None:
        """Update each site in ``grads`` in place from its gradient ĝ = ∇(U/N̂); ``noise=False`` optimises.

        The gradients may be overwritten (clipping, the adam mode's noise).
        """
        cfg = self.config
        if cfg.clip_norm is not None:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
            torch._foreach_mul_(list(grads.values()), (cfg.clip_norm / (total + 1e-6)).clamp(max=1.0))
        gamma = cfg.gamma if noise else 0.0
        for k, g in grads.items():
            self.steps[k] += 1
            z = sites[k]
            xi = self.noise.normal_(self._noise[: z.numel()]).view_as(z) if gamma > 0 else None
            work = self._scratch[: z.numel()].view_as(z)
            self._update(z, g, self.state[k], lrs[k], gamma, self.steps[k], xi, work, self.frozen_at.get(k))

    def _update(self, z, g, s, lr: float, gamma: float, t: int, xi, work, frozen_at: int | None) -> None:
        cfg = self.config
        if cfg.preconditioner == "none":
            z.sub_(g, alpha=lr)
            if xi is not None:
                z.add_(xi, alpha=gamma * math.sqrt(2.0 * lr / cfg.n_hat))
        elif cfg.preconditioner == "rmsprop":
            adapt, root_c = self.correction(t, frozen_at)
            diffusion = gamma * math.sqrt(2.0 * lr * root_c / cfg.n_hat)
            if fused.rmsprop_langevin_(z, g, s["v"], xi, rho=cfg.rho, drift=lr * root_c, diffusion=diffusion,
                                       eps_c=cfg.eps * root_c, adapt=adapt):
                return
            precond = self.rmsprop(g, s, root_c, adapt, work)
            z.addcmul_(precond, g, value=-lr * root_c)
            if xi is not None:
                z.addcmul_(precond.sqrt_(), xi, value=diffusion)
        else:  # adam on the noisy gradient, as the original implementation did
            if xi is not None:
                g.add_(xi, alpha=gamma * math.sqrt(2.0 / (lr * cfg.n_hat)))
            b1, b2 = cfg.betas
            s["m"].lerp_(g, 1.0 - b1)
            s["v"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
            root_c2 = math.sqrt(1.0 - b2**t)
            denom = torch.sqrt(s["v"], out=work).add_(cfg.eps * root_c2)  # (√(v/c₂) + ε)·√c₂
            z.addcdiv_(s["m"], denom, value=-lr * root_c2 / (1.0 - b1**t))

    def correction(self, t: int, frozen_at: int | None) -> tuple[bool, float]:
        """(whether G adapts at step t, √c) with c = 1 − ρᵗ the bias correction of the step whose G is used."""
        adapt = frozen_at is None
        return adapt, math.sqrt(1.0 - self.config.rho ** (t if adapt else frozen_at))

    def rmsprop(self, g, s, root_c: float, adapt: bool, work) -> torch.Tensor:
        """G/√c in ``work`` for the rmsprop preconditioner, its second moment v advanced first if ``adapt``.

        G = 1/(√(v/c) + ε) = √c / (√v + ε√c): the bias correction c = 1 − ρᵗ folds into the scalars.
        """
        if adapt:
            s["v"].mul_(self.config.rho).addcmul_(g, g, value=1.0 - self.config.rho)
        return torch.sqrt(s["v"], out=work).add_(self.config.eps * root_c).reciprocal_()

    def state_dict(self) -> dict:
        return {"steps": dict(self.steps), "frozen_at": dict(self.frozen_at), "state": self.state,
                "generator": self.generator.get_state(), "noise": self.noise.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.steps = dict(sd["steps"])
        self.frozen_at = dict(sd.get("frozen_at", {}))
        for k, buffers in sd["state"].items():
            for name, t in buffers.items():
                self.state[k][name].copy_(t)
        self.generator.set_state(sd["generator"])
        self.noise.load_state_dict(sd.get("noise"))
