"""Langevin engines over (θ, λ) with the SGLD update of ``inference.sgld``, and their kernel.

- ``sgld``        preconditioned SGLD (pSGLD) at temperature γ², log λ; optionally an exact Gibbs draw of λ | θ;
- ``map``         the same kernel with γ = 0: optimisation to the mode of the model's own density in λ;
- ``noisy-adam``  the original code: Adam on noisy gradients, λ in linear space read as max(λ, 1e-8), the
                  likelihood gradient clipped at norm 1 (not a sampler).

With ``gibbs``, burn-in and sampling alternate an SGLD step on θ with a draw of λ from its full conditional
λ | θ ~ GIG (:class:`LambdaConditional`). The rmsprop preconditioner is frozen at the first sampling step if
``freeze_preconditioner``. With the ``rao-blackwell`` estimator each collected state also adds E[λ | θ].
The head is a point estimate trained by Adam throughout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Options, check_noise_discount, check_positive, option
from ..inference.driver import Kernel
from ..inference.posterior import StreamingPosterior
from ..inference.potential import Potential
from ..inference.sgld import PRECONDITIONERS, SGLD, SGLDConfig
from ..models.lambda_conditional import LambdaConditional
from . import Engine, register


@dataclass
class MAPOptions(Options):
    preconditioner: str = option("rmsprop", "none (SGLD), rmsprop (pSGLD), adam (the original code; not a "
                                 "sampler)", choices=PRECONDITIONERS)
    clip_norm: float | None = option(None, "clip the stage-1 gradient of (θ, log λ) to this total norm")
    precond_eps: float | None = option(None, "rmsprop: ε of G = 1/(√v + ε), the bound G ≤ 1/ε; default 1/(λ₀·N̂), "
                                       "the prior's gradient scale, so a coordinate without data moves on the "
                                       "prior's scale")
    freeze_preconditioner: bool = option(True, "rmsprop: stop adapting the preconditioner G when sampling starts, "
                                         "so sampling is exact SGLD with a constant G")

    def check(self):
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner: unknown value {self.preconditioner!r}; "
                             f"choose one of: {', '.join(PRECONDITIONERS)}")
        if self.clip_norm is not None:
            check_positive(self, "clip_norm")
        if self.precond_eps is not None:
            check_positive(self, "precond_eps")


@dataclass
class SGLDOptions(MAPOptions):
    GRID = ("gamma",)

    gamma: float | list[float] = option(1.0, "noise discount γ (temperature γ²); 0 is MAP. A list (1e-4,1e-2,1) "
                                        "is a grid: every point runs stage 1 and 2, and the best validation score "
                                        "wins (needs --validation-fraction)")
    gibbs: bool = option(False, "in burn-in and sampling, draw λ from its exact conditional λ | θ (GIG) after "
                         "each SGLD step on θ, instead of a Langevin step on log λ")

    def check(self):
        super().check()
        check_noise_discount(self)


@dataclass
class NoisyAdamOptions(Options):
    GRID = ("gamma",)

    gamma: float | list[float] = option(1.0, "noise discount γ of the gradient noise; a list is a grid")

    def check(self):
        check_noise_discount(self)


class LangevinKernel(Kernel):
    """(θ, z_λ) updated by an SGLD-family rule from ∇(U/N̂) of the :class:`Potential`; the head by Adam."""

    hint = "lower --lr / --lr-lambda or set --clip-norm"

    def __init__(self, s, options, seed: int, config: SGLDConfig, potential: Potential, rule: type[SGLD] = SGLD,
                 gibbs: bool = False):
        self.potential, self.gibbs, self.lifted = potential, gibbs, s.lifted
        self.z = potential.init(options.lambda_init)
        self.generator = torch.Generator(device=s.lifted.theta_bar.device).manual_seed(seed)
        # the update's noise and scratch buffers are the potential's workspace, free between gradients
        self.update = rule(config, self.z, self.generator, workspace=potential.work)
        self.lrs = {"theta": options.lr, "lambda": options.lr_lambda}
        self.conditional = None  # E[λ | θ] and its sampler, built on first use
        self.head = self.lifted.head_parameters()
        self.head_opt = torch.optim.Adam(self.head, lr=s.config.head_lr)
        torch.manual_seed(seed + 1)  # the dropout stream

    def setup(self, batch: dict) -> None:
        self.lifted.model.train()

    def start_sampling(self) -> None:
        if self.update.config.freeze_preconditioner:
            self.update.freeze()

    def _conditional(self) -> LambdaConditional:
        if self.conditional is None:
            model = self.potential.model
            self.conditional = LambdaConditional(model.alpha, model.beta, device=self.z["theta"].device,
                                                 dtype=self.z["theta"].dtype)
        return self.conditional

    def step(self, batch: dict, phase: str) -> torch.Tensor:
        z = self.z
        nll, grads = self.potential.gradient(z, batch, with_prior=phase != "warmup")
        if self.gibbs and phase != "warmup":
            self.update.step(z, {"theta": grads["theta"]}, self.lrs, noise=True)
            with torch.no_grad():
                abs_delta = torch.sub(z["theta"], self.lifted.theta_bar, out=grads["lambda"]).abs_()
                self._conditional().sample(abs_delta, self.generator, out=z["lambda"]).log_()
        else:
            self.update.step(z, grads, self.lrs, noise=phase != "warmup")
        self.head_opt.step()
        self.head_opt.zero_grad(set_to_none=True)
        return nll

    @torch.no_grad()
    def collect(self, posterior: StreamingPosterior, chain: int, batch: dict, loss: torch.Tensor) -> None:
        z, potential = self.z, self.potential
        delta, lam, lam_rb = potential.work  # free between gradients
        torch.sub(z["theta"], self.lifted.theta_bar, out=delta)
        if posterior.estimator == "rao-blackwell":
            self._conditional().mean(torch.abs(delta, out=lam_rb), out=lam_rb)
        posterior.update(chain, potential.lam(z, out=lam), delta,
                         {"loss": loss, "log_joint": potential.log_joint(z, loss)},
                         lam_rb if posterior.estimator == "rao-blackwell" else None)

    def finish(self, posterior: StreamingPosterior, chain: int) -> None:
        posterior.add_touched(self.potential.touched)

    def release(self) -> None:
        self.potential.release()

    def state_dict(self) -> dict:
        return {"z": {k: v.detach() for k, v in self.z.items()}, "head": [p.detach() for p in self.head],
                "head_opt": self.head_opt.state_dict(), "update": self.update.state_dict(),
                "touched": self.potential.touched}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for k, v in state["z"].items():
            self.z[k].copy_(v)
        for p, v in zip(self.head, state["head"]):
            p.copy_(v)
        self.head_opt.load_state_dict(state["head_opt"])
        self.update.load_state_dict(state["update"])
        if "touched" in state:  # checkpoints written before it was kept
            self.potential.touched.copy_(state["touched"])


def precond_eps(engine_options, options) -> float:
    """ε of G: as set, else 1/(λ₀·N̂), the prior's gradient scale."""
    return engine_options.precond_eps or 1.0 / (options.lambda_init * options.n_hat)


def sgld_kernel(s, options, engine_options: SGLDOptions, seed: int) -> LangevinKernel:
    e = engine_options
    config = SGLDConfig(n_hat=options.n_hat, gamma=e.gamma, preconditioner=e.preconditioner,
                        eps=precond_eps(e, options), clip_norm=e.clip_norm,
                        freeze_preconditioner=e.freeze_preconditioner)
    return LangevinKernel(s, options, seed, config, Potential(s.model), gibbs=e.gibbs)


def map_kernel(s, options, engine_options: MAPOptions, seed: int) -> LangevinKernel:
    e = engine_options
    config = SGLDConfig(n_hat=options.n_hat, gamma=0.0, preconditioner=e.preconditioner,
                        eps=precond_eps(e, options), clip_norm=e.clip_norm,
                        freeze_preconditioner=e.freeze_preconditioner)
    # MAP is the mode of the model's own density in λ (as AutoDelta's), so no Jacobian when γ = 0
    return LangevinKernel(s, options, seed, config, Potential(s.model, jacobian=False))


def noisy_adam_kernel(s, options, engine_options: NoisyAdamOptions, seed: int) -> LangevinKernel:
    config = SGLDConfig(n_hat=options.n_hat, gamma=engine_options.gamma, preconditioner="adam")
    potential = Potential(s.model, lambda_space="linear", clip_likelihood=1.0)
    return LangevinKernel(s, options, seed, config, potential)


register(Engine("sgld", "preconditioned SGLD at temperature γ² (optionally Gibbs for λ)", sgld_kernel,
                SGLDOptions))
register(Engine("map", "the SGLD kernel with γ = 0: the posterior mode", map_kernel, MAPOptions, kind="point"))
register(Engine("noisy-adam", "the original code: Adam on noisy gradients, λ linear, clipped likelihood",
                noisy_adam_kernel, NoisyAdamOptions, kind="heuristic", lambda_space="linear"))
