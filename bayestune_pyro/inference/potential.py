"""The potential U(z)/N̂ of the Pyro model, over unconstrained latent values z, and its gradient.

z holds one flat tensor per latent site: ``theta`` (θ, already unconstrained) and ``lambda`` (log λ, through
Pyro's ``biject_to`` of the Gamma support, so the Jacobian enters the density). Dividing by N̂ gives the
per-sample units the SGLD step of eq. 5 uses: U/N̂ = −(1/|B|)Σ_B log p(y|x,θ) − (1/N̂) log p(θ, λ).

``jacobian=False`` drops log|dλ/dlogλ|: the density is then the model's own in λ, whose mode is the MAP that
Pyro's AutoDelta finds (used with γ = 0; sampling needs the Jacobian).

Two ways to the same gradient: ``exact`` differentiates the whole Pyro trace; ``fast`` differentiates only the
observation site of the trace and adds the model's closed-form prior gradient (agreement is tested).

The fast path also keeps ``touched``: the coordinates on which some minibatch's likelihood gradient was nonzero.
Off it the likelihood does not depend on θ_i, so (θ_i, λ_i) keep their prior exactly (see ``posterior``).

``lambda_space="linear"`` is the original code's parameterisation (fast path only): z_λ = λ itself, read as
max(λ, 10⁻⁸), with no Jacobian; ``clip_likelihood`` clips the likelihood gradient of the network (θ and head) to
that total norm before the prior is added, as the original code's ``clip_grad_norm_`` did.
"""
from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to

from ..models.gamma_laplace import LAMBDA_FLOOR, LAMBDA_SPACES, GammaLaplaceModel
from . import distributed

LATENT_SITES = ("theta", "lambda")


class Potential:
    """U/N̂ of a :class:`GammaLaplaceModel` and its gradient with respect to z (and the head's, into ``.grad``).

    In fast mode θ is bound to the network (:meth:`LiftedBackbone.bind`) and every gradient lands in persistent
    flat buffers, so a step allocates nothing of size d. Exact mode keeps z as autograd leaves (for tests).
    """

    def __init__(self, model: GammaLaplaceModel, fast: bool = True, jacobian: bool = True,
                 lambda_space: str = "log", clip_likelihood: float | None = None):
        if lambda_space not in LAMBDA_SPACES:
            raise ValueError(f"lambda_space: unknown value {lambda_space!r}; choose one of: {', '.join(LAMBDA_SPACES)}")
        if not fast and (lambda_space != "log" or clip_likelihood is not None):
            raise ValueError("potential: the exact path supports lambda_space='log' without clip_likelihood only")
        self.model, self.fast, self.jacobian = model, fast, jacobian and lambda_space == "log"
        self.lambda_space, self.clip_likelihood = lambda_space, clip_likelihood
        self.transforms = {"theta": biject_to(constraints.real), "lambda": biject_to(constraints.positive)}

    def init(self, lam0: float) -> dict[str, torch.Tensor]:
        """Start z: θ = θ̄ and z_λ = log λ₀ (or λ₀ in linear space) everywhere."""
        theta_bar = self.model.lifted.theta_bar
        z_lambda = math.log(lam0) if self.lambda_space == "log" else lam0
        z = {"theta": theta_bar.clone(), "lambda": torch.full_like(theta_bar, z_lambda)}
        if not self.fast:
            return {k: v.requires_grad_(True) for k, v in z.items()}
        self.grads = {k: torch.zeros_like(v) for k, v in z.items()}
        self.work = tuple(torch.empty_like(theta_bar) for _ in range(3))
        self.placeholder = theta_bar.new_ones(()).expand_as(theta_bar)
        self.touched = torch.zeros_like(theta_bar, dtype=torch.bool)
        self._nonzero = torch.empty_like(self.touched)
        self.model.lifted.bind(z["theta"], self.grads["theta"])
        return z

    @torch.no_grad()
    def lam(self, z: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """λ of the state z (into ``out``, else a new tensor)."""
        if self.lambda_space == "log":
            return torch.exp(z["lambda"], out=out)
        return torch.clamp(z["lambda"], min=LAMBDA_FLOOR, out=out)

    def release(self) -> None:
        """Give the network back its pretrained θ̄ (undo the binding of fast mode)."""
        if self.fast:
            self.model.lifted.unbind()

    def constrained(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.transforms[k](v) for k, v in z.items()}

    def trace(self, z: dict[str, torch.Tensor], batch: dict):
        return self._trace(self.constrained(z), batch)

    def _trace(self, values: dict[str, torch.Tensor], batch: dict):
        with pyro.validation_enabled(False):
            return poutine.trace(poutine.condition(self.model, data=values)).get_trace(batch)

    def nll(self, z: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """The minibatch mean NLL at z, from the Pyro trace."""
        return self._nll(self.trace(z, batch))

    def _nll(self, tr) -> torch.Tensor:
        return -tr.log_prob_sum(lambda name, site: name not in LATENT_SITES) / self.model.n_hat

    def _prior(self, tr, z: dict[str, torch.Tensor]) -> torch.Tensor:
        values = self.constrained(z)
        logp = tr.log_prob_sum(lambda name, site: name in LATENT_SITES)
        for k, t in self.transforms.items() if self.jacobian else ():
            logp = logp + t.log_abs_det_jacobian(z[k], values[k]).sum()
        return -logp / self.model.n_hat

    def value(self, z: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """U(z)/N̂ from the Pyro trace (Jacobians of the transforms included)."""
        tr = self.trace(z, batch)
        return self._nll(tr) + self._prior(tr, z)

    def gradient(self, z: dict[str, torch.Tensor], batch: dict,
                 with_prior: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(minibatch mean NLL, ∇z(U/N̂)); with ``with_prior=False`` only the likelihood part, for θ only.

        The head's gradient is accumulated into its parameters' ``.grad``.
        """
        if not self.fast:
            for t in z.values():
                t.grad = None
            tr = self.trace(z, batch)
            nll = self._nll(tr)
            (nll + self._prior(tr, z) if with_prior else nll).backward()
            grads = {k: t.grad for k, t in z.items()}
            return nll.detach(), grads if with_prior else {"theta": grads["theta"]}
        grads = self.grads
        grads["theta"].zero_()
        # only the observation site's density is evaluated here, so λ's value is irrelevant: a free placeholder
        nll = self._nll(self._trace({"theta": z["theta"], "lambda": self.placeholder}, batch))
        nll.backward()
        nll = nll.detach()
        if distributed.size() > 1:  # data parallelism: the global minibatch's mean over the ranks' slices
            head = [p.grad for p in self.model.lifted.head_parameters() if p.grad is not None]
            distributed.average_([grads["theta"], nll, *head], len(batch["labels"]))
        if self.clip_likelihood is not None:
            torch.nn.utils.clip_grad_norm_(self.model.lifted.model.parameters(), self.clip_likelihood)
        self.touched.logical_or_(torch.ne(grads["theta"], 0, out=self._nonzero))
        if not with_prior:
            return nll, {"theta": grads["theta"]}
        self.model.prior_grad_(z["theta"], z["lambda"], grads["theta"], grads["lambda"], 1.0 / self.model.n_hat,
                               self.work, self.jacobian, self.lambda_space)
        return nll, grads

    @torch.no_grad()
    def log_joint(self, z: dict[str, torch.Tensor], nll: torch.Tensor) -> torch.Tensor:
        """log p(θ, λ, B) on the N̂ scale (log-λ Jacobian included), given the minibatch mean NLL."""
        log_lam = z["lambda"] if self.lambda_space == "log" else self.lam(z).log_()
        return -self.model.n_hat * nll + self.model.log_prior(z["theta"], log_lam)
