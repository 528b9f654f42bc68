"""Posterior ensembles of sparse deltas: S members over one mask, each a k-vector δ_s and a head, predicting with the
mean of their predictive distributions (softmax probabilities; a regression's outputs).

- ``sgld``, the Bayesian stage 2: from the point estimate, the SGLD kernel (``optim.GaussianSGLD``, rmsprop frozen
  after burn-in) samples (δ, head) at N̂ = |D| and temperature γ² under δ_i ~ N(0, σ_δ²) and head ~ N(0, σ_h²);
  σ defaults to the root mean square of the point estimate's δ and head (empirical Bayes), times ``prior_scale``.
  After ``burnin`` steps, every ``thin``-th state of the next S·thin is a member. The network runs without dropout,
  so the likelihood is the one the ensemble predicts with.
- ``deep``: S point estimates of the same mask, the run's own and S − 1 refits from fresh heads and data orders
  (seeds seed + 1, …), each with the run's stage 2 and validation selection; the storage of ``sgld``, S× its cost.

Members cost S·k numbers and S heads: ``ensemble-<kind>.safetensors`` is a sparse delta with ``members`` = S.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import TaskSpec
from ..models.backbones import init_head
from ..optim import GaussianSGLD
from .evaluate import predict
from .stage2 import SparseFineTuner, Stage2Config, fit


@dataclass(frozen=True)
class EnsembleConfig:
    kind: str
    size: int = 8  # S
    burnin: int = 100
    thin: int = 25
    lr: float = 1e-4
    gamma: float = 1.0
    n_hat: float | None = None  # None: |D|
    prior_sd: float | None = None  # σ_δ / scale; None: the RMS of the point estimate's δ
    head_prior_sd: float | None = None  # σ_h / scale; None: the RMS of the point estimate's head
    prior_scale: float = 1.0  # multiplies σ_δ and σ_h


def rms(tensors: list[torch.Tensor]) -> float:
    """Root mean square over all entries of ``tensors``."""
    total = sum(t.detach().double().square().sum() for t in tensors)
    return float((total / sum(t.numel() for t in tensors)).sqrt())


def sgld_members(tuner: SparseFineTuner, batches: Iterator[dict], config: EnsembleConfig, n_train: int, seed: int,
                 progress: bool = True) -> tuple[list[dict], dict]:
    """S states of (δ, head) sampled from the point estimate the tuner holds, and the prior and N̂ they used; the
    tuner is left at its point estimate, with fresh optimizers."""
    point = tuner.state()
    head = tuner.lifted.head_parameters()
    info = {"n_hat": config.n_hat or float(n_train),
            "prior_sd": config.prior_scale * (config.prior_sd or rms([tuner.delta])),
            "head_prior_sd": config.prior_scale * (config.head_prior_sd or rms(head))}
    if not (info["prior_sd"] > 0 and info["head_prior_sd"] > 0):
        raise ValueError("ensemble_prior_sd: the point estimate's δ or head is all zeros, so it sets no prior scale; "
                         "give --ensemble-prior-sd and --ensemble-head-prior-sd")
    common = {"lr": config.lr, "n_hat": info["n_hat"], "gamma": config.gamma}
    tuner.opt = GaussianSGLD([tuner.delta], prior_sd=info["prior_sd"], seed=seed, **common)
    tuner.head_opt = GaussianSGLD(head, prior_sd=info["head_prior_sd"], seed=seed + 1, **common)
    states, bad = [], torch.zeros((), dtype=torch.bool, device=tuner.device)
    steps = config.burnin + config.size * config.thin
    tuner.lifted.model.eval()
    for step in tqdm(range(steps), desc="ensemble", disable=not progress, dynamic_ncols=True, leave=False):
        batch = {k: v.to(tuner.device, non_blocking=True) for k, v in next(batches).items()}
        bad |= ~torch.isfinite(tuner.step(batch))
        if step + 1 == config.burnin:
            tuner.opt.freeze()
            tuner.head_opt.freeze()
        if step >= config.burnin and (step + 1 - config.burnin) % config.thin == 0:
            if bad.item():
                raise FloatingPointError(f"ensemble: loss became NaN/inf at or before step {step}; lower "
                                         "--ensemble-lr")
            states.append(tuner.state())
    tuner.load_state(point)
    tuner.new_optimizers()
    return states, info


def deep_members(tuner: SparseFineTuner, fresh: Callable[[int], Iterator[dict]], config: Stage2Config,
                 validate: Callable | None, size: int, seed: int, target_mean: float | None = None,
                 progress: bool = True) -> list[dict]:
    """The point estimate the tuner holds and S − 1 refits of the same mask: member m starts from δ = 0 and a head
    initialised with seed + m, and trains on ``fresh(seed + m)``'s batches with dropout seeded by seed + m; the tuner
    is left at its point estimate."""
    point = tuner.state()
    states = [point]
    for m in range(1, size):
        init_head(tuner.lifted.backbone, seed + m, target_mean)
        torch.manual_seed(seed + m)  # its dropout stream: whatever drew from the global generator before, it repeats
        start = tuner.state()
        start["delta"].zero_()
        tuner.load_state(start)
        tuner.new_optimizers()
        fit(tuner, fresh(seed + m), config, validate, progress)
        states.append(tuner.state())
    tuner.load_state(point)
    tuner.new_optimizers()
    return states


def predictive(tuner: SparseFineTuner, states: list[dict], loader, spec: TaskSpec,
               device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean predictive, labels) over ``loader``: the members' mean softmax (classification, float64) or mean
    output (regression); the tuner is left at its last member."""
    total = labels = None
    for state in states:
        tuner.load_state(state)
        outputs, labels = predict(tuner.forward, loader, device)
        part = outputs.double() if spec.is_regression else outputs.double().softmax(-1)
        total = part if total is None else total + part
    return total / len(states), labels
