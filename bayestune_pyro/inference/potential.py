"""The potential U(z)/N̂ of the Pyro model, over unconstrained latent values z, and its gradient.

z holds one flat tensor per latent site: ``theta`` (θ, already unconstrained) and ``lambda`` (log λ, through
Pyro's ``biject_to`` of the Gamma support, so the Jacobian enters the density). Dividing by N̂ gives the
per-sample units the SGLD step of eq. 5 uses: U/N̂ = −(1/|B|)Σ_B log p(y|x,θ) − (1/N̂) log p(θ, λ).

Two ways to the same gradient: ``exact`` differentiates the whole Pyro trace; ``fast`` differentiates only the
observation site of the trace and adds the model's closed-form prior gradient (agreement is tested).
"""
from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to

from ..models.gamma_laplace import GammaLaplaceModel

LATENT_SITES = ("theta", "lambda")


class Potential:
    """U/N̂ of a :class:`GammaLaplaceModel` with backward passes that fill ``z[site].grad`` and the head's grads."""

    def __init__(self, model: GammaLaplaceModel, fast: bool = True):
        self.model, self.fast = model, fast
        self.transforms = {"theta": biject_to(constraints.real), "lambda": biject_to(constraints.positive)}

    def init(self, lam0: float) -> dict[str, torch.Tensor]:
        """Unconstrained start: θ = θ̄, λ = λ₀ everywhere (leaf tensors that require grad)."""
        theta_bar = self.model.lifted.theta_bar
        theta = theta_bar.clone().requires_grad_(True)
        log_lam = torch.full_like(theta_bar, float(lam0)).log_().requires_grad_(True)
        return {"theta": theta, "lambda": log_lam}

    def constrained(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.transforms[k](v) for k, v in z.items()}

    def trace(self, z: dict[str, torch.Tensor], batch: dict):
        with pyro.validation_enabled(False):
            return poutine.trace(poutine.condition(self.model, data=self.constrained(z))).get_trace(batch)

    def _nll(self, tr) -> torch.Tensor:
        return -tr.log_prob_sum(lambda name, site: name not in LATENT_SITES) / self.model.n_hat

    def _prior(self, tr, z: dict[str, torch.Tensor]) -> torch.Tensor:
        values = self.constrained(z)
        logp = tr.log_prob_sum(lambda name, site: name in LATENT_SITES)
        for k, t in self.transforms.items():
            logp = logp + t.log_abs_det_jacobian(z[k], values[k]).sum()
        return -logp / self.model.n_hat

    def value(self, z: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """U(z)/N̂ from the Pyro trace (Jacobians of the transforms included)."""
        tr = self.trace(z, batch)
        return self._nll(tr) + self._prior(tr, z)

    def backward(self, z: dict[str, torch.Tensor], batch: dict, with_prior: bool = True) -> torch.Tensor:
        """Accumulate ∇(U/N̂) (or only its likelihood part) into the grads of z and of the head.

        Returns the minibatch mean negative log-likelihood, detached.
        """
        tr = self.trace(z, batch)
        nll = self._nll(tr)
        if with_prior and not self.fast:
            (nll + self._prior(tr, z)).backward()
            return nll.detach()
        nll.backward()
        if with_prior:
            theta, log_lam = z["theta"], z["lambda"]
            if log_lam.grad is None:
                log_lam.grad = torch.zeros_like(log_lam)
            self.model.add_log_prior_grad(theta.detach(), log_lam.detach(), theta.grad, log_lam.grad,
                                          scale=1.0 / self.model.n_hat)
        return nll.detach()

    @torch.no_grad()
    def log_joint(self, z: dict[str, torch.Tensor], nll: torch.Tensor) -> torch.Tensor:
        """log p(θ, λ, B) on the N̂ scale (log-λ Jacobian included), given the minibatch mean NLL."""
        return -self.model.n_hat * nll + self.model.log_prior(z["theta"], z["lambda"])
