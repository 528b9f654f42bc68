"""BayesTune's hierarchical model as a Pyro program.

    λ_i ~ Gamma(α, β)                      (rate β; prior mean α/β)
    θ_i | λ_i ~ Laplace(θ̄_i, λ_i)          i = 1 … d, the covered coordinates
    y_n | x_n, θ ~ p(y | f_θ(x_n))         n in a plate of size N̂, subsampled by the minibatch

p(y | ·) is Categorical(logits) for classification and Normal(f, σ) for regression. N̂ is the *effective* data
size: the minibatch log-likelihood is scaled by N̂/|B| through the plate. The head is a point estimate: it is
part of the network f, not a sample site, and gets no prior.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from ..inference import fused
from .lifted import LiftedBackbone

LIKELIHOODS = ("categorical", "normal")
LAMBDA_SPACES = ("log", "linear")  # how λ is stored in the sampler's state: log λ, or λ read as max(λ, λ_min)
LAMBDA_FLOOR = 1e-8  # λ_min of the linear parameterisation (the original code's clamp)


class GammaLaplaceModel:
    """The BayesTune joint p(θ, λ, y | x) over a lifted backbone; call it with a batch to run the program."""

    def __init__(self, lifted: LiftedBackbone, *, alpha: float = 0.01, beta: float = 100.0, n_hat: float = 1e9,
                 likelihood: str = "categorical", sigma: float = 1.0):
        for field, value in (("alpha", alpha), ("beta", beta), ("n_hat", n_hat), ("sigma", sigma)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{field}: must be a positive finite number, got {value!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: unknown value {likelihood!r}; choose one of: {', '.join(LIKELIHOODS)}")
        self.lifted, self.alpha, self.beta, self.n_hat = lifted, alpha, beta, n_hat
        self.likelihood, self.sigma = likelihood, sigma

    def __call__(self, batch: dict, observe: bool = True):
        theta_bar = self.lifted.theta_bar
        d = theta_bar.shape[0]
        alpha = theta_bar.new_tensor(self.alpha)
        beta = theta_bar.new_tensor(self.beta)
        lam = pyro.sample("lambda", dist.Gamma(alpha, beta).expand([d]).to_event(1))
        theta = pyro.sample("theta", dist.Laplace(theta_bar, lam).to_event(1))
        out = self.lifted(theta, batch)
        labels = batch["labels"]
        with pyro.plate("data", int(self.n_hat), subsample=torch.arange(labels.shape[0], device=labels.device)):
            pyro.sample("y", self.observation(out), obs=labels if observe else None)
        return out

    def observation(self, out: torch.Tensor) -> dist.Distribution:
        """p(y | f_θ(x)) for a batch of network outputs."""
        if self.likelihood == "categorical":
            return dist.Categorical(logits=out)
        return dist.Normal(out.squeeze(-1), self.sigma)

    def log_prior(self, theta: torch.Tensor, log_lam: torch.Tensor) -> torch.Tensor:
        """log p(θ, λ) + log|dλ/d log λ| in closed form (the fast path; must agree with the trace)."""
        a, b = self.alpha, self.beta
        lam = log_lam.exp()
        scaled = torch.sub(theta, self.lifted.theta_bar).abs_().div_(lam)  # |θ − θ̄|/λ; two d-sized temporaries
        # Σ [log Gamma(λ; α, β) + log Laplace(θ; θ̄, λ) + log λ]: the Laplace's −log λ cancels the Jacobian's
        constant = theta.numel() * (a * math.log(b) - math.lgamma(a) - math.log(2.0))
        return (a - 1) * log_lam.sum() - b * lam.sum() - scaled.sum() + constant

    def prior_grad_(self, theta: torch.Tensor, z_lambda: torch.Tensor, grad_theta: torch.Tensor,
                    grad_lambda: torch.Tensor, scale: float, work: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    jacobian: bool = True, space: str = "log"):
        """:func:`prior_grad_` at this model's θ̄, α and β."""
        prior_grad_(theta, self.lifted.theta_bar, z_lambda, grad_theta, grad_lambda, scale, work,
                    alpha=self.alpha, beta=self.beta, jacobian=jacobian, space=space)


@torch.no_grad()
def prior_grad_(theta: torch.Tensor, theta_bar: torch.Tensor, z_lambda: torch.Tensor, grad_theta: torch.Tensor,
                grad_lambda: torch.Tensor, scale: float, work: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *,
                alpha: float, beta: float, jacobian: bool = True, space: str = "log"):
    """Add ``−scale·∂ log p/∂θ`` to ``grad_theta`` and write ``−scale·∂ log p/∂z_λ`` into ``grad_lambda``, for
    λ ~ Gamma(α, β) and θ ~ Laplace(θ̄, λ) (any shape, all tensors alike).

    z_λ is log λ (``space="log"``) or λ itself, read as max(λ, λ_min) (``"linear"``, the original code's
    parameterisation, with λ_min = :data:`LAMBDA_FLOOR`):
    ∂/∂θ_i    log p = −sign(θ_i − θ̄_i) / λ_i
    ∂/∂logλ_i log p = (α − 1) − β λ_i + |θ_i − θ̄_i| / λ_i   (the −1 of the Laplace normaliser cancels the +1
    of the Jacobian |dλ/dlogλ|; without the Jacobian — MAP in the model's own λ — the constant is α − 2)
    ∂/∂λ_i    log p = ((α − 2) + |θ_i − θ̄_i| / λ_i) / λ_i − β   (linear: no Jacobian)
    The fast path of the Pyro trace's gradient (``tests/test_model.py`` checks they agree): one compiled pass
    (``inference.fused``) on large tensors, else a dozen in-place passes over three caller-owned buffers ``work``
    shaped like θ; no allocation.
    """
    if space not in LAMBDA_SPACES:
        raise ValueError(f"lambda_space: unknown value {space!r}; choose one of: {', '.join(LAMBDA_SPACES)}")
    alpha_minus_c = alpha - (1.0 if space == "log" and jacobian else 2.0)
    if fused.prior_grad_(theta, theta_bar, z_lambda, grad_theta, grad_lambda, scale=scale,
                         alpha_minus_c=alpha_minus_c, beta=beta, floor=LAMBDA_FLOOR, log_space=space == "log"):
        return
    lam, inv_lam, diff = work
    if space == "log":
        torch.exp(z_lambda, out=lam)
    else:
        torch.clamp(z_lambda, min=LAMBDA_FLOOR, out=lam)
    torch.reciprocal(lam, out=inv_lam)
    torch.sub(theta, theta_bar, out=diff)
    torch.sign(diff, out=grad_lambda)  # borrowed as scratch before it is written
    grad_theta.addcmul_(grad_lambda, inv_lam, value=scale)
    diff.abs_().mul_(inv_lam)  # |θ − θ̄|/λ
    if space == "log":
        diff.sub_(lam, alpha=beta)
        torch.mul(diff, -scale, out=grad_lambda).sub_(scale * alpha_minus_c)
    else:
        diff.add_(alpha_minus_c).mul_(inv_lam).sub_(beta)
        torch.mul(diff, -scale, out=grad_lambda)
