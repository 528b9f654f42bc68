"""Stage 1: the warm-up → burn-in → sampling loop that feeds the streaming posterior.

- warm-up   plain optimisation of θ and the head on the likelihood (no prior, no noise, λ fixed at λ₀);
- burn-in   SGLD on (θ, log λ) with the prior, nothing collected;
- sampling  SGLD, every ``thin``-th state collected into the :class:`StreamingPosterior`.

With ``gibbs``, burn-in and sampling alternate an SGLD step on θ with an exact draw of λ from its full conditional
λ | θ ~ GIG (:class:`LambdaConditional`), instead of a Langevin step on log λ. The kernel's preconditioner is
frozen at the first sampling step if its config says so. With the ``rao-blackwell`` estimator each collected
state also adds E[λ | θ] to the posterior.

The head is a point estimate trained by Adam throughout. Losses are checked for NaN/inf without host syncs:
a device flag is read only at the logging interval, and the run stops with the step range and the last
checkpoint named. Checkpoints are atomic, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..io import read_json, save_torch, write_json
from ..models.lambda_conditional import LambdaConditional
from .posterior import StreamingPosterior
from .potential import Potential
from .sgld import SGLD, SGLDConfig

CHECKPOINT = "stage1.ckpt"


CHECKPOINT_INFO = "stage1.ckpt.json"


def save_checkpoint(path: Path, state: dict) -> None:
    """The checkpoint, then a small JSON naming its engine, chain and step (read without loading the tensors)."""
    save_torch(path, state)
    write_json(path.parent / CHECKPOINT_INFO, {k: state[k] for k in ("engine", "chain", "step")})


def checkpoint_chain(run_dir: str | os.PathLike) -> int:
    """The chain a stage-1 checkpoint in ``run_dir`` belongs to (earlier chains are finished), or 0."""
    info = Path(run_dir) / CHECKPOINT_INFO
    return int(read_json(info)["chain"]) if (Path(run_dir) / CHECKPOINT).exists() and info.exists() else 0


class NonFiniteError(FloatingPointError):
    """A loss became NaN or infinite."""


@dataclass(frozen=True)
class Schedule:
    """Step counts of the three phases; ``steps`` is the whole run, sampling is what warm-up and burn-in leave."""

    steps: int
    warmup: int
    burnin: int
    thin: int

    def __post_init__(self):
        for field in ("steps", "thin"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}: must be >= 1, got {getattr(self, field)}")
        for field in ("warmup", "burnin"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field}: must be >= 0, got {getattr(self, field)}")
        if self.sampling < self.thin:
            raise ValueError(
                f"burnin: warmup={self.warmup} + burnin={self.burnin} leaves {max(self.sampling, 0)} sampling steps "
                f"of steps={self.steps}, fewer than thin={self.thin}; need warmup + burnin + thin <= steps"
            )

    @property
    def sampling(self) -> int:
        return self.steps - self.warmup - self.burnin

    def phase(self, step: int) -> str:
        if step < self.warmup:
            return "warmup"
        return "burnin" if step < self.warmup + self.burnin else "sampling"

    def collects(self, step: int) -> bool:
        s = step - self.warmup - self.burnin + 1
        return s > 0 and s % self.thin == 0


@dataclass(frozen=True)
class StepSizes:
    theta: float = 1e-4
    log_lambda: float = 1e-2
    head: float = 1e-3
    lambda_init: float = 1e-4


def run_stage1(potential: Potential, batches: Iterator[dict], schedule: Schedule, kernel: SGLDConfig,
               sizes: StepSizes, posterior: StreamingPosterior, *, chain: int = 0, seed: int = 0,
               checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 200,
               log_every: int = 20, progress: bool = True, gibbs: bool = False) -> dict[str, torch.Tensor]:
    """Run one chain; returns the final state ``{"theta", "lambda"}`` (z_λ: log λ, or λ in linear space)."""
    if gibbs and potential.lambda_space != "log":
        raise ValueError("gibbs: the Gibbs step for λ needs lambda_space='log'")
    model = potential.model
    lifted = model.lifted
    device = lifted.theta_bar.device
    z = potential.init(sizes.lambda_init)
    generator = torch.Generator(device=device).manual_seed(seed)
    sgld = SGLD(kernel, z, generator)
    conditional = (LambdaConditional(model.alpha, model.beta, device=device, dtype=z["theta"].dtype)
                   if gibbs or posterior.estimator == "rao-blackwell" else None)
    head = lifted.head_parameters()
    head_opt = torch.optim.Adam(head, lr=sizes.head)
    lrs = {"theta": sizes.theta, "lambda": sizes.log_lambda}
    start = 0
    torch.manual_seed(seed + 1)  # the dropout stream
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        start = _restore(ckpt_path, z, sgld, head, head_opt, posterior, chain)
    for _ in range(start):  # replay the batch stream to where the checkpoint left it
        next(batches)

    try:
        lifted.model.train()
        bad = torch.zeros((), dtype=torch.bool, device=device)
        bar = tqdm(range(start, schedule.steps), initial=start, total=schedule.steps, disable=not progress,
                   desc=f"stage 1 (chain {chain})", dynamic_ncols=True)
        for step in bar:
            phase = schedule.phase(step)
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            if kernel.freeze_preconditioner and step == schedule.warmup + schedule.burnin:
                sgld.freeze()
            nll, grads = potential.gradient(z, batch, with_prior=phase != "warmup")
            if gibbs and phase != "warmup":
                sgld.step(z, {"theta": grads["theta"]}, lrs, noise=True)
                with torch.no_grad():
                    abs_delta = torch.sub(z["theta"], lifted.theta_bar, out=grads["lambda"]).abs_()
                    conditional.sample(abs_delta, generator, out=z["lambda"]).log_()
            else:
                sgld.step(z, grads, lrs, noise=phase != "warmup")
            head_opt.step()
            head_opt.zero_grad(set_to_none=True)
            bad |= ~torch.isfinite(nll)
            if schedule.collects(step):
                with torch.no_grad():
                    delta = z["theta"] - lifted.theta_bar
                    lam_rb = conditional.mean(delta.abs()) if posterior.estimator == "rao-blackwell" else None
                    posterior.update(chain, potential.lam(z), delta,
                                     {"loss": nll, "log_joint": potential.log_joint(z, nll)}, lam_rb)
            last = step == schedule.steps - 1
            if step % log_every == 0 or last:
                if bad.item():
                    where = f"; last checkpoint: {ckpt_path}" if ckpt_path is not None and ckpt_path.exists() else ""
                    raise NonFiniteError(f"stage 1: loss became NaN/inf at or before step {step} ({phase}){where}; "
                                         "lower --lr / --lr-lambda or set --clip-norm")
                bar.set_postfix(phase=phase, nll=f"{nll.item():.4f}", samples=posterior.counts[chain])
            if ckpt_path is not None and ((step + 1) % checkpoint_every == 0 or last):  # last: the chain is done
                _save(ckpt_path, step + 1, z, sgld, head, head_opt, posterior, chain)
        bar.close()
    finally:
        potential.release()  # the network gets θ̄ back, even after an error or interrupt
    return {k: v.detach() for k, v in z.items()}


def _save(path: Path, step: int, z, sgld: SGLD, head, head_opt, posterior: StreamingPosterior, chain: int) -> None:
    save_checkpoint(path, {
        "engine": "sgld", "step": step, "chain": chain, "z": {k: v.detach() for k, v in z.items()},
        "head": [p.detach() for p in head], "head_opt": head_opt.state_dict(), "sgld": sgld.state_dict(),
        "posterior": posterior.state_dict(),
        "rng": torch.get_rng_state(), "time": time.time(),
    })


@torch.no_grad()
def _restore(path: Path, z, sgld: SGLD, head, head_opt, posterior: StreamingPosterior, chain: int) -> int:
    ckpt = torch.load(path, map_location=z["theta"].device, weights_only=False)
    if ckpt.get("engine", "sgld") != "sgld" or ckpt["chain"] != chain:
        return 0
    for k, v in ckpt["z"].items():
        z[k].copy_(v)
    for p, v in zip(head, ckpt["head"]):
        p.copy_(v)
    head_opt.load_state_dict(ckpt["head_opt"])
    sgld.load_state_dict(ckpt["sgld"])
    posterior.load_state_dict(ckpt["posterior"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"]
