"""Toy posteriors that show the SGLD and SGHMC kernels sample what they should (``benchmarks/sampler_validity.py``).

- *Logistic*: BayesTune's model on a small logistic regression: λ_i ~ Gamma(α, β), w_i ~ Laplace(θ̄_i = 0, λ_i),
  an intercept b (the head) with a flat prior, y ~ Bernoulli(σ(x·w + b)). SGLD runs through the product path
  (``Backbone`` → ``LiftedBackbone`` → ``GammaLaplaceModel`` → ``Potential`` → ``SGLD``); NUTS samples an
  independent, plainly written Pyro model of the same posterior.
- *Gaussian*: data y_1..N ~ N(μ, s²) and a flat prior, so U(z) = (N̂/N)·Σ_i (z − y_i)²/(2s²) and the tempered
  posterior is N(ȳ, γ²·s²/N̂) in closed form.

Draws are numpy arrays shaped (chain, draw, *coordinates), ready for ArviZ.
"""
from __future__ import annotations

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value
from torch import nn

from ..engines.sghmc import SGHMC
from ..inference.potential import Potential
from ..inference.sgld import SGLD, SGLDConfig
from ..models.backbones import Backbone
from ..models.gamma_laplace import GammaLaplaceModel
from ..models.lifted import LiftedBackbone


def logistic_data(n: int = 200, d: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """N = n seeded points x ~ N(0, I_d); the first three true weights are nonzero, the rest zero; b = 0.5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.zeros(d)
    w[:3] = torch.tensor([1.5, -1.0, 0.75])
    labels = torch.bernoulli(torch.sigmoid(x @ w + 0.5), generator=g).long()
    return {"x": x, "labels": labels}


def for_subprocess(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``data`` to hand to a process pool while this process goes on using ``data``.

    A pool pickles its arguments in a feeder thread, and pickling a CPU tensor moves its storage into shared
    memory: done on tensors the main thread is reading, that swap raced with the reads (garbage labels under load).
    """
    return {k: v.clone() for k, v in data.items()}


class Logistic(nn.Module):
    """C independent logistic regressions, one per SGLD chain: logits stack([0, x·w_c + b_c]) of shape (C, n, 2)."""

    def __init__(self, chains: int, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(chains, d))  # becomes θ̄ = 0, the centre of the Laplace prior
        self.b = nn.Parameter(torch.zeros(chains))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eta = self.w @ x.T + self.b[:, None]
        return torch.stack([torch.zeros_like(eta), eta], -1)


def sgld_logistic(data: dict, *, alpha: float, beta: float, lrs: dict[str, float], steps: int, burnin: int,
                  thin: int, chains: int, batch_size: int | None = None, seed: int = 0,
                  friction: float | None = None, **kernel) -> dict[str, np.ndarray]:
    """SGLD draws {"w", "lambda", "b"} of the logistic toy with N̂ = N, through the product path.

    ``kernel`` holds :class:`SGLDConfig` fields (preconditioner, gamma, rho, ...); with ``friction`` the update
    is SGHMC's (``engines.sghmc``) instead of SGLD's. ``lrs`` one lr per site:
    "theta" (w), "lambda" (log λ) and "b". b is sampled too, under its flat prior: its ``.grad``, the gradient
    of the mean NLL, is its ∇(U/N̂). The chains are vectorised: chain c owns row c of w, b and λ, the likelihood
    factorises over chains, and the kernel's noise is independent per coordinate. With ``batch_size`` every
    step draws a fresh minibatch, shared by the chains (the plate takes one label vector). Chains start
    dispersed around w = 0, λ = α/β, b = 0; the first ``burnin`` steps are discarded, then every ``thin``-th kept.
    An rmsprop preconditioner is frozen after burn-in unless ``freeze_preconditioner=False``, as in the engines.
    """
    n, d = data["x"].shape
    g = torch.Generator().manual_seed(seed)
    lifted = LiftedBackbone(Backbone(Logistic(chains, d), head_names=["b"], kind="tensor", source="toy"))
    potential = Potential(GammaLaplaceModel(lifted, alpha=alpha, beta=beta, n_hat=n))
    z = potential.init(alpha / beta)
    head = lifted.head_parameters()[0]
    with torch.no_grad():
        z["theta"].add_(torch.randn(z["theta"].shape, generator=g), alpha=0.5)
        z["lambda"].add_(torch.randn(z["lambda"].shape, generator=g))
        head.add_(torch.randn(head.shape, generator=g), alpha=0.5)
    sites = {**z, "b": head.data}
    config = SGLDConfig(n_hat=n, **kernel)
    sampler = SGLD(config, sites, g) if friction is None else SGHMC(config, sites, g, friction=friction)
    batch, draws = data, []
    for t in range(steps):
        if t == burnin and config.freeze_preconditioner:
            sampler.freeze()  # as the engines do when sampling starts: exact SGLD with a constant G from here
        if batch_size is not None:
            idx = torch.randperm(n, generator=g)[:batch_size]
            batch = {k: v[idx] for k, v in data.items()}
        _, grads = potential.gradient(z, batch)
        sampler.step(sites, {**grads, "b": head.grad}, lrs)
        head.grad.zero_()
        if t >= burnin and (t - burnin) % thin == 0:
            draws.append((z["theta"].view(chains, d).clone(), z["lambda"].view(chains, d).exp(), head.data.clone()))
    potential.release()
    return {k: torch.stack(v, 1).numpy() for k, v in zip(("w", "lambda", "b"), zip(*draws))}


def reference_model(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, centred: bool = False) -> None:
    """The same posterior written plainly: λ ~ Gamma(α, β) (rate β), w ~ Laplace(0, λ), b flat (ImproperUniform).

    ``centred=False`` writes w = λ·u with u ~ Laplace(0, 1): the same distribution without the funnel between
    w and λ. At α = 2, β = 20 the centred form cost NUTS ~4× more gradients per draw and still mixed worse
    (R-hat up to 1.2 after 2 × 300 draws).
    """
    d = x.shape[1]
    lam = pyro.sample("lambda", dist.Gamma(torch.tensor(alpha), torch.tensor(beta)).expand([d]).to_event(1))
    if centred:
        w = pyro.sample("w", dist.Laplace(torch.zeros(d), lam).to_event(1))
    else:
        w = lam * pyro.sample("u", dist.Laplace(torch.zeros(d), 1.0).to_event(1))
    b = pyro.sample("b", dist.ImproperUniform(constraints.real, (), ()))
    pyro.sample("y", dist.Bernoulli(logits=x @ w + b).to_event(1), obs=y)


def nuts_logistic(data: dict, *, alpha: float, beta: float, chains: int, warmup: int, samples: int,
                  centred: bool = False, max_tree_depth: int = 10, seed: int = 0) -> tuple[dict[str, np.ndarray], int]:
    """NUTS draws {"w", "lambda", "b"} of :func:`reference_model` and the number of divergent transitions.

    b starts at 0 (a flat prior has no draws to start from); the other sites start uniformly in (−2, 2),
    unconstrained. With fewer than num_chains + 1 cores Pyro runs the chains one after the other.
    """
    pyro.set_rng_seed(seed)
    kernel = NUTS(reference_model, max_tree_depth=max_tree_depth, max_plate_nesting=0, jit_compile=True,
                  ignore_jit_warnings=True, init_strategy=init_to_value(values={"b": torch.tensor(0.0)}))
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, num_chains=chains, disable_progbar=True)
    mcmc.run(data["x"], data["labels"].float(), alpha, beta, centred)
    draws = {k: v.numpy() for k, v in mcmc.get_samples(group_by_chain=True).items()}
    if not centred:
        draws["w"] = draws.pop("u") * draws["lambda"]
    divergences = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    return draws, divergences


def summary(draws: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per site, flat over coordinates: mean, sd, ArviZ's MCSE of the mean, bulk ESS and rank R-hat."""
    data = az.convert_to_dataset(draws)
    stats = {"mean": data.mean(("chain", "draw")), "sd": data.std(("chain", "draw")),
             "mcse": az.mcse(data, method="mean"), "ess": az.ess(data), "rhat": az.rhat(data)}
    return {k: {s: np.ravel(v[k]) for s, v in stats.items()} for k in draws}


def diagnostics(stats: dict[str, dict[str, np.ndarray]]) -> dict:
    """From a :func:`summary`: the worst R-hat, the smallest bulk ESS, and the three coordinates with the largest
    posterior-mean λ (the toy's stage-2 mask; the true support is 0, 1, 2)."""
    return {"rhat_max": float(max(s["rhat"].max() for s in stats.values())),
            "ess_min": float(min(s["ess"].min() for s in stats.values())),
            "top3": sorted(np.argsort(-stats["lambda"]["mean"])[:3].tolist())}


def agreement(sampler: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """How far ``sampler``'s posterior is from ``reference``'s over every coordinate of w, λ and b, plus the
    sampler's :func:`diagnostics`.

    z_max      max |Δmean| / √(mcse² + mcse_reference²)
    bias_max   max |Δmean| / sd_reference
    sd_err     max |sd / sd_reference − 1|
    sd_ratio   [min, max] of sd / sd_reference
    """
    a, b = summary(sampler), summary(reference)
    delta = {k: np.abs(a[k]["mean"] - b[k]["mean"]) for k in a}
    z = np.concatenate([delta[k] / np.hypot(a[k]["mcse"], b[k]["mcse"]) for k in a])
    bias = np.concatenate([delta[k] / b[k]["sd"] for k in a])
    ratio = np.concatenate([a[k]["sd"] / b[k]["sd"] for k in a])
    return {"z_max": float(z.max()), "bias_max": float(bias.max()), "sd_err": float(np.abs(ratio - 1).max()),
            "sd_ratio": [float(ratio.min()), float(ratio.max())], **diagnostics(a)}


def gaussian_moments(*, n_hat: float, gamma: float, preconditioner: str, h: float = 0.02, d: int = 2000,
                     n: int = 100, s: float = 0.5, steps: int = 8000, burnin: int = 3000, thin: int = 5,
                     seed: int = 0) -> tuple[float, float]:
    """Mean of z − ȳ and of (z − ȳ)² over SGLD draws of d independent Gaussian toys, in posterior units.

    The units are the closed form's γs/√N̂ and γ²s²/N̂, so (0, 1) is exact. ĝ = ∇(U/N̂) = (z − ȳ)/s². The lr
    sets the relaxation per step ε·∂²U = h: lr = h·s²/2 for plain SGLD, and lr = h·γ·s/(2√N̂) for pSGLD, whose
    stationary G = 1/rms(ĝ) = s·√N̂/γ.
    """
    g = torch.Generator().manual_seed(seed)
    y_bar = (torch.randn(n, d, generator=g) * s).mean(0)
    sd = gamma * s / math.sqrt(n_hat)
    z = y_bar + sd * torch.randn(d, generator=g)
    kernel = SGLD(SGLDConfig(n_hat=n_hat, gamma=gamma, preconditioner=preconditioner), {"z": z}, g)
    lr = h * s**2 / 2 if preconditioner == "none" else h * gamma * s / (2 * math.sqrt(n_hat))
    err = []
    for t in range(steps):
        kernel.step({"z": z}, {"z": (z - y_bar) / s**2}, {"z": lr})
        if t >= burnin and (t - burnin) % thin == 0:
            err.append((z - y_bar) / sd)
    err = torch.stack(err)
    return float(err.mean()), float(err.square().mean())
