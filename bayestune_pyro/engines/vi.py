"""Engine ``vi``: mean-field Gaussian variational inference over (θ, log λ) on flat buffers.

The guide is mean-field Normal, as Pyro's ``AutoNormal``: q(z) = Π_i N(z_i; μ_i, σ_i²) over z = (θ, log λ), starting
at μ = (θ̄, log λ₀) and σ = ``vi_init_scale``, with σ = exp(ρ) (``AutoNormal`` takes softplus(ρ), the same for the
small σ of a fine-tuning posterior). Each step draws ε ~ N(0, I), sets z = μ + σ ⊙ ε (the reparameterisation), gets
g = ∇z(U/N̂) from the fast :class:`Potential` (one forward and backward of the network, the prior's gradient in
closed form), and hands Adam the gradient of the one-draw ELBO loss (U(z) + log q(z))/N̂:

    ∂/∂μ = g,        ∂/∂ρ = g ⊙ ε ⊙ σ − 1/N̂.

That is Pyro's ``Trace_ELBO`` gradient for the same guide and draw (tested against it), without a Pyro trace over
d-sized sites or autograd through the guide. Per covered coordinate it keeps μ and ρ of both sites (4), Adam's two
moments of each (8), z, g and ε (2 each; ε becomes ρ's gradient in place): 18 floats, plus θ̄ and the prior's three
work buffers. Adam is torch's fused kernel where the device has one (no d-sized temporaries per step).
``vi-pyro`` is the same inference through Pyro's SVI machinery (``engines/svi.py``), the reference.

What reaches the :class:`StreamingPosterior` is what ``vi-pyro`` gives: the guide's closed-form moments of λ, and
for the traces the draw of every ``thin``-th sampling step with its minibatch loss and log joint.
"""
from __future__ import annotations

import math

import torch

from ..inference.driver import Kernel
from ..inference.noise import GaussianNoise
from ..inference.posterior import StreamingPosterior
from ..inference.potential import Potential
from . import Engine, register
from .svi import VIOptions

FUSED_ADAM = ("cpu", "cuda")  # devices with torch's fused Adam kernel


class MeanField:
    """q = N(μ, diag exp(ρ)²) over the potential's z, and one step's ELBO gradient into ``.grad`` of μ and ρ."""

    def __init__(self, potential: Potential, z: dict[str, torch.Tensor], init_scale: float,
                 generator: torch.Generator):
        self.potential, self.z, self.noise = potential, z, GaussianNoise(generator)
        self.loc = {k: torch.nn.Parameter(v.detach().clone()) for k, v in z.items()}
        self.rho = {k: torch.nn.Parameter(torch.full_like(v, math.log(init_scale))) for k, v in z.items()}
        self.eps = {k: torch.empty_like(v) for k, v in z.items()}

    def parameters(self, site: str) -> list[torch.nn.Parameter]:
        return [self.loc[site], self.rho[site]]

    @torch.no_grad()
    def draw(self, eps: dict[str, torch.Tensor] | None = None) -> None:
        """z = μ + σ ⊙ ε, with ε drawn (or given, for tests)."""
        scale = self.potential.work[0]
        for k, z in self.z.items():
            if eps is None:
                self.noise.normal_(self.eps[k])
            else:
                self.eps[k].copy_(eps[k])
            torch.addcmul(self.loc[k], torch.exp(self.rho[k], out=scale), self.eps[k], out=z)

    def gradient(self, batch: dict) -> torch.Tensor:
        """g at the drawn z, then ∂/∂μ = g and ∂/∂ρ = g ⊙ ε ⊙ σ − 1/N̂ into their ``.grad``; returns the minibatch
        mean NLL (the head's gradient is accumulated by the potential)."""
        nll, grads = self.potential.gradient(self.z, batch)
        scale = self.potential.work[0]
        with torch.no_grad():
            for k, g in grads.items():
                grad = self.eps[k].mul_(g).mul_(torch.exp(self.rho[k], out=scale))
                self.rho[k].grad = grad.sub_(1.0 / self.potential.model.n_hat)
                self.loc[k].grad = g
        return nll

    @torch.no_grad()
    def lambda_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[λ], Var[λ]) of the log-normal q(λ), in closed form."""
        mu, s2 = self.loc["lambda"], (2 * self.rho["lambda"]).exp()
        return (mu + s2 / 2).exp(), s2.expm1() * (2 * mu + s2).exp()


class MeanFieldKernel(Kernel):
    """One Adam step on the one-draw ELBO / N̂ over the guide's μ and ρ and the head (warm-up and burn-in alike)."""

    hint = "lower --lr / --lr-lambda"

    def __init__(self, s, options, init_scale: float, seed: int):
        self.lifted, self.potential = s.lifted, Potential(s.model)
        self.z = self.potential.init(options.lambda_init)
        generator = torch.Generator(device=self.z["theta"].device).manual_seed(seed)
        self.q = MeanField(self.potential, self.z, init_scale, generator)
        self.head = self.lifted.head_parameters()
        self.opt = torch.optim.Adam([{"params": self.q.parameters("theta"), "lr": options.lr},
                                     {"params": self.q.parameters("lambda"), "lr": options.lr_lambda},
                                     {"params": self.head, "lr": s.config.head_lr}],
                                    fused=self.z["theta"].device.type in FUSED_ADAM)
        torch.manual_seed(seed + 1)  # the dropout stream

    def setup(self, batch: dict) -> None:
        self.lifted.model.train()

    def step(self, batch: dict, phase: str) -> torch.Tensor:
        self.q.draw()
        nll = self.q.gradient(batch)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return nll

    @torch.no_grad()
    def collect(self, posterior: StreamingPosterior, chain: int, batch: dict, loss: torch.Tensor) -> None:
        """The step's draw z ~ q (Adam moved μ and ρ, not z), with its minibatch loss and log joint."""
        z = self.z
        posterior.record(chain, self.potential.lam(z), z["theta"] - self.lifted.theta_bar,
                         {"loss": loss, "log_joint": self.potential.log_joint(z, loss)})

    def finish(self, posterior: StreamingPosterior, chain: int) -> None:
        posterior.set_moments(chain, "lambda", *self.q.lambda_moments())

    def release(self) -> None:
        self.potential.release()

    def state_dict(self) -> dict:
        return {"loc": {k: v.detach() for k, v in self.q.loc.items()},
                "rho": {k: v.detach() for k, v in self.q.rho.items()}, "opt": self.opt.state_dict(),
                "head": [p.detach() for p in self.head], "noise": self.q.noise.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for k in self.z:
            self.q.loc[k].copy_(state["loc"][k])
            self.q.rho[k].copy_(state["rho"][k])
        self.opt.load_state_dict(state["opt"])
        for p, v in zip(self.head, state["head"]):
            p.copy_(v)
        self.q.noise.load_state_dict(state.get("noise"))


register(Engine("vi", "mean-field Normal VI over θ and log λ on flat buffers (Pyro's AutoNormal, one draw per "
                "step, the ELBO's gradient in closed form)",
                lambda s, options, e, seed: MeanFieldKernel(s, options, e.vi_init_scale, seed), VIOptions,
                kind="variational"))
