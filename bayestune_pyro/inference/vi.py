"""Variational inference (and its MAP special case) with Pyro's SVI machinery, into the same posterior object.

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

import itertools
import os
from pathlib import Path
from typing import Iterator

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.infer.autoguide.initialization import init_to_value
from tqdm.auto import tqdm

from .posterior import StreamingPosterior
from .potential import Potential
from .runner import CHECKPOINT, NonFiniteError, Schedule, StepSizes, save_checkpoint

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
        mu, sigma = guide._get_loc_and_scale("lambda")
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


def run_svi(potential: Potential, batches: Iterator[dict], schedule: Schedule, sizes: StepSizes,
            posterior: StreamingPosterior, *, guide_kind: str = "normal", init_scale: float = 1e-4,
            chain: int = 0, seed: int = 0, checkpoint_dir: str | os.PathLike | None = None,
            checkpoint_every: int = 200, log_every: int = 20, progress: bool = True):
    """Fit the guide for ``schedule.steps`` steps (warm-up and burn-in are plain ELBO steps) and fill ``posterior``."""
    if guide_kind not in GUIDES:
        raise ValueError(f"guide: unknown value {guide_kind!r}; choose one of: {', '.join(GUIDES)}")
    model, lifted = potential.model, potential.model.lifted
    device = lifted.theta_bar.device
    pyro.set_rng_seed(seed)
    first = next(batches)
    batches = itertools.chain([first], batches)
    guide = make_guide(potential, guide_kind, sizes.lambda_init, init_scale)
    guide({k: v.to(device) for k, v in first.items()})  # creates the guide's parameters
    opt = torch.optim.Adam([
        {"params": [p for n, p in guide.named_parameters() if "theta" in n], "lr": sizes.theta},
        {"params": [p for n, p in guide.named_parameters() if "lambda" in n], "lr": sizes.log_lambda},
        {"params": lifted.head_parameters(), "lr": sizes.head},
    ])
    exact = Potential(model, fast=False)
    start = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        start = _restore(ckpt_path, guide, opt, lifted.head_parameters(), posterior, chain)
    for _ in range(start):  # replay the batch stream to where the checkpoint left it
        next(batches)
    lifted.model.train()
    bad = torch.zeros((), dtype=torch.bool, device=device)
    bar = tqdm(range(start, schedule.steps), initial=start, total=schedule.steps, disable=not progress,
               desc=f"stage 1 {guide_kind} guide (chain {chain})", dynamic_ncols=True)
    for step in bar:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        loss = elbo_step(model, guide, opt, batch)
        bad |= ~torch.isfinite(loss)
        if schedule.collects(step):
            _collect(posterior, chain, guide, exact, batch)
        last = step == schedule.steps - 1
        if step % log_every == 0 or last:
            if bad.item():
                raise NonFiniteError(f"stage 1: ELBO became NaN/inf at or before step {step}; lower --lr / --lr-lambda")
            bar.set_postfix(phase=schedule.phase(step), elbo=f"{loss.item():.4f}", samples=posterior.counts[chain])
        if ckpt_path is not None and (step + 1) % checkpoint_every == 0:
            _save(ckpt_path, step + 1, guide, opt, lifted.head_parameters(), posterior, chain)
    bar.close()
    mean, var = guide_lambda_moments(guide)
    posterior.set_moments(chain, "lambda", mean, var)
    return guide


@torch.no_grad()
def _collect(posterior: StreamingPosterior, chain: int, guide, exact: Potential, batch: dict):
    """One draw from the guide for the traces, with its minibatch loss and log joint."""
    draw = guide()  # constrained values of every latent site
    z = {"theta": draw["theta"], "lambda": draw["lambda"].log()}
    nll = exact._nll(exact.trace(z, batch))
    posterior.record(chain, draw["lambda"], draw["theta"] - exact.model.lifted.theta_bar,
                     {"loss": nll, "log_joint": exact.log_joint(z, nll)})


def _save(path: Path, step: int, guide, opt, head, posterior: StreamingPosterior, chain: int) -> None:
    save_checkpoint(path, {"engine": "svi", "step": step, "chain": chain, "guide": guide.state_dict(),
                      "opt": opt.state_dict(), "head": [p.detach() for p in head],
                      "posterior": posterior.state_dict(), "rng": torch.get_rng_state()})


@torch.no_grad()
def _restore(path: Path, guide, opt, head, posterior: StreamingPosterior, chain: int) -> int:
    ckpt = torch.load(path, map_location=posterior.tracked_index.device, weights_only=False)
    if ckpt.get("engine") != "svi" or ckpt["chain"] != chain:
        return 0
    guide.load_state_dict(ckpt["guide"])
    opt.load_state_dict(ckpt["opt"])
    for p, v in zip(head, ckpt["head"]):
        p.copy_(v)
    posterior.load_state_dict(ckpt["posterior"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"]

