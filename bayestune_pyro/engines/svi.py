"""Engines ``vi-pyro`` and ``map-svi``: variational inference (and its MAP special case) with Pyro's SVI machinery.

The guide is Pyro's ``AutoNormal`` (mean-field Normal over θ and log λ: VI) or ``AutoDelta`` (a point: MAP).
Both start at θ = θ̄, λ = λ₀. Each step minimises the minibatch ELBO (``Trace_ELBO``, divided by N̂ to match the
per-sample units of SGLD) with Adam over the guide and the head.

What reaches the :class:`StreamingPosterior`:
- moments of λ for every coordinate in closed form from the final guide: with log λ ~ N(μ, σ²),
  E[λ] = exp(μ + σ²/2) and Var[λ] = (exp(σ²) − 1)·exp(2μ + σ²) (a delta guide: λ itself, variance 0);
- "samples" of the tracked coordinates: every ``thin``-th step of the sampling phase, one draw from the guide,
  with the minibatch loss and the log joint at that draw — so diagnostics read VI exactly like SGLD.

Memory per covered coordinate: AutoNormal keeps loc and scale for θ and for log λ, each with a gradient and two
Adam moments (16 floats, plus θ̄ and the ELBO's temporaries); AutoDelta keeps half of that.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value

from ..config import Options, check_positive, option
from ..inference.driver import Kernel
from ..inference.posterior import StreamingPosterior
from ..inference.potential import Potential
from . import Engine, register

GUIDES = {"normal": AutoNormal, "delta": AutoDelta}


def make_guide(potential: Potential, kind: str, lambda_init: float, init_scale: float):
    """An AutoNormal/AutoDelta guide over the model's latent sites, initialised at θ = θ̄, λ = λ₀."""
    theta_bar = potential.model.lifted.theta_bar
    pyro.clear_param_store()  # autoguide parameters live in Pyro's global store under fixed names
    # a copy: the guide's loc is built on the init value's storage, and θ̄ must never move
    start = init_to_value(values={"theta": theta_bar.clone(), "lambda": torch.full_like(theta_bar, lambda_init)})
    if kind == "normal":
        return AutoNormal(potential.model, init_loc_fn=start, init_scale=init_scale)
    return AutoDelta(potential.model, init_loc_fn=start)


@torch.no_grad()
def guide_lambda_moments(guide) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[λ], Var[λ]) under the guide, in closed form (log-normal for AutoNormal; a point for AutoDelta)."""
    if isinstance(guide, AutoNormal):
        mu, sigma = getattr(guide.locs, "lambda"), getattr(guide.scales, "lambda")
        s2 = sigma.square()
        return (mu + s2 / 2).exp(), s2.expm1() * (2 * mu + s2).exp()
    lam = guide.median()["lambda"]
    return lam.clone(), torch.zeros_like(lam)


def elbo_step(model, guide, opt: torch.optim.Optimizer, batch: dict) -> torch.Tensor:
    """One optimiser step on the minibatch ELBO loss / N̂ (Pyro's Trace_ELBO); returns the loss, detached."""
    with pyro.validation_enabled(False):
        loss = Trace_ELBO().differentiable_loss(model, guide, batch) / model.n_hat
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@dataclass
class VIOptions(Options):
    vi_init_scale: float = option(1e-4, "vi: initial standard deviation of the guide (unconstrained space)")

    def check(self):
        check_positive(self, "vi_init_scale")


class SVIKernel(Kernel):
    """One Adam step on the minibatch ELBO / N̂ over the guide and the head (warm-up and burn-in alike)."""

    hint = "lower --lr / --lr-lambda"

    def __init__(self, s, options, guide_kind: str, init_scale: float, seed: int):
        if guide_kind not in GUIDES:
            raise ValueError(f"guide: unknown value {guide_kind!r}; choose one of: {', '.join(GUIDES)}")
        self.s, self.options, self.guide_kind, self.init_scale = s, options, guide_kind, init_scale
        self.potential = Potential(s.model)
        self.exact = Potential(s.model, fast=False)
        pyro.set_rng_seed(seed)

    def setup(self, batch: dict) -> None:
        lifted, options = self.s.lifted, self.options
        self.guide = make_guide(self.potential, self.guide_kind, options.lambda_init, self.init_scale)
        self.guide(batch)  # creates the guide's parameters
        named = list(self.guide.named_parameters())
        self.opt = torch.optim.Adam([
            {"params": [p for n, p in named if "theta" in n], "lr": options.lr},
            {"params": [p for n, p in named if "lambda" in n], "lr": options.lr_lambda},
            {"params": lifted.head_parameters(), "lr": self.s.config.head_lr},
        ])
        lifted.model.train()

    def step(self, batch: dict, phase: str) -> torch.Tensor:
        return elbo_step(self.s.model, self.guide, self.opt, batch)

    @torch.no_grad()
    def collect(self, posterior: StreamingPosterior, chain: int, batch: dict, loss: torch.Tensor) -> None:
        """One draw from the guide for the traces, with its minibatch loss and log joint."""
        draw = self.guide()  # constrained values of every latent site
        z = {"theta": draw["theta"], "lambda": draw["lambda"].log()}
        nll = self.exact.nll(z, batch)
        posterior.record(chain, draw["lambda"], draw["theta"] - self.s.lifted.theta_bar,
                         {"loss": nll, "log_joint": self.exact.log_joint(z, nll)})

    def finish(self, posterior: StreamingPosterior, chain: int) -> None:
        mean, var = guide_lambda_moments(self.guide)
        posterior.set_moments(chain, "lambda", mean, var)

    def state_dict(self) -> dict:
        return {"guide": self.guide.state_dict(), "opt": self.opt.state_dict(),
                "head": [p.detach() for p in self.s.lifted.head_parameters()]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.guide.load_state_dict(state["guide"])
        self.opt.load_state_dict(state["opt"])
        for p, v in zip(self.s.lifted.head_parameters(), state["head"]):
            p.copy_(v)


register(Engine("vi-pyro", "SVI with Pyro's AutoNormal guide (mean-field Normal over θ and log λ): the reference "
                "of vi",
                lambda s, options, e, seed: SVIKernel(s, options, "normal", e.vi_init_scale, seed), VIOptions,
                kind="variational", data_parallel=False))
register(Engine("map-svi", "SVI with Pyro's AutoDelta guide: the MAP by Pyro's own machinery",
                lambda s, options, e, seed: SVIKernel(s, options, "delta", 0.0, seed), kind="point",
                data_parallel=False))
