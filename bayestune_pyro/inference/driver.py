"""The one stage-1 driver: phases, batch replay, the NaN guard, progress, checkpoints and resume, for any kernel.

A :class:`Kernel` (one module each in ``engines/``) owns the chain's state and one transition; the driver runs
the schedule over it:

- warm-up   plain optimisation (no prior, no noise: the kernel's ``step`` is told the phase);
- burn-in   the kernel's transition, nothing collected;
- sampling  the transition, every ``thin``-th state collected into the :class:`StreamingPosterior`.

Losses are checked for NaN/inf without host syncs: a device flag is read only at the logging interval, and the
run stops with the step range and the last checkpoint named. A checkpoint is the chain's whole state (kernel,
posterior, RNG states) in one atomic safetensors file, ``stage1.ckpt``, with its structure and every non-tensor
value (engine, chain, step, optimizer hyper-parameters) as JSON in its header; it never holds a pickle, and an
interrupted run resumes where it stopped, bitwise as if it had not been interrupted.
"""
from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Schedule
from ..io import load_state, save_state, state_header
from . import distributed
from .posterior import StreamingPosterior

CHECKPOINT = "stage1.ckpt"


class NonFiniteError(FloatingPointError):
    """A loss became NaN or infinite."""


class Kernel:
    """One chain's state and transition (what its states are is the registered ``Engine``'s ``kind``)."""

    hint = "lower --lr / --lr-lambda"  # what to try when the loss becomes NaN

    def setup(self, batch: dict) -> None:
        """Build what needs a first batch (called once, before any step or restore)."""

    def start_sampling(self) -> None:
        """Called before the first sampling step."""

    def step(self, batch: dict, phase: str) -> torch.Tensor:
        """One transition; returns the minibatch loss (a device scalar, not synced)."""
        raise NotImplementedError

    def collect(self, posterior: StreamingPosterior, chain: int, batch: dict, loss: torch.Tensor) -> None:
        """Add the current state to ``posterior``."""
        raise NotImplementedError

    def finish(self, posterior: StreamingPosterior, chain: int) -> None:
        """After the last step (e.g. closed-form moments of a variational guide)."""

    def release(self) -> None:
        """Give the network back its pretrained θ̄."""

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def checkpoint_chain(run_dir: str | os.PathLike) -> int:
    """The chain a stage-1 checkpoint in ``run_dir`` belongs to (earlier chains are finished), or 0; also 0 for an
    unreadable checkpoint, whose chain then says what is wrong when it resumes."""
    path = Path(run_dir) / CHECKPOINT
    try:
        return int(state_header(path)["chain"]) if path.exists() else 0
    except (ValueError, KeyError, TypeError):
        return 0


def run_chain(kernel: Kernel, batches: Iterator[dict], schedule: Schedule, posterior: StreamingPosterior, *,
              engine: str, chain: int = 0, device: str | torch.device = "cpu",
              checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 200, log_every: int = 20,
              progress: bool = True) -> Kernel:
    """Run ``schedule.steps`` transitions of ``kernel`` (engine ``engine``) as chain ``chain``, filling
    ``posterior``; a checkpoint of the same engine and chain in ``checkpoint_dir`` is resumed."""
    first = next(batches)
    batches = itertools.chain([first], batches)
    kernel.setup({k: v.to(device) for k, v in first.items()})
    start = 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        start = _restore(ckpt_path, kernel, posterior, engine, chain)
    for _ in range(start):  # replay the batch stream to where the checkpoint left it
        next(batches)
    try:
        bad = torch.zeros((), dtype=torch.bool, device=device)
        bar = tqdm(range(start, schedule.steps), initial=start, total=schedule.steps,
                   disable=not (progress and distributed.is_writer()),
                   desc=f"stage 1 {engine} (chain {chain})", dynamic_ncols=True)
        for step in bar:
            phase = schedule.phase(step)
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            if step == schedule.warmup + schedule.burnin:
                kernel.start_sampling()
            loss = kernel.step(batch, phase)
            bad |= ~torch.isfinite(loss)
            if schedule.collects(step):
                kernel.collect(posterior, chain, batch, loss)
            last = step == schedule.steps - 1
            if step % log_every == 0 or last:
                if bad.item():
                    where = f"; last checkpoint: {ckpt_path}" if ckpt_path is not None and ckpt_path.exists() else ""
                    raise NonFiniteError(f"stage 1: loss became NaN/inf at or before step {step} ({phase}){where}; "
                                         f"{kernel.hint}")
                bar.set_postfix(phase=phase, loss=f"{loss.item():.4f}", samples=posterior.counts[chain])
            if ckpt_path is not None and distributed.is_writer() and ((step + 1) % checkpoint_every == 0 or last):
                # last: the chain is done; under torchrun the ranks hold the same state and rank 0 writes it
                _save(ckpt_path, step + 1, kernel, posterior, engine, chain)
        bar.close()
        kernel.finish(posterior, chain)
    finally:
        kernel.release()  # the network gets θ̄ back, even after an error or interrupt
    return kernel


def _save(path: Path, step: int, kernel: Kernel, posterior: StreamingPosterior, engine: str, chain: int) -> None:
    """The checkpoint: the chain's state, with its engine, chain and step in the header."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    save_state(path, {"engine": engine, "chain": chain, "step": step, "time": time.time(),
                      "kernel": kernel.state_dict(), "posterior": posterior.state_dict(), "rng": rng})


@torch.no_grad()
def _restore(path: Path, kernel: Kernel, posterior: StreamingPosterior, engine: str, chain: int) -> int:
    """The step to go on from: the checkpoint's, or 0 if it is another engine's or chain's state."""
    try:
        ckpt = load_state(path)
    except ValueError as err:
        raise ValueError(f"{err}; delete {CHECKPOINT} to start stage 1 over, or rerun stage 1 in a new "
                         "directory") from None
    if ckpt.get("engine") != engine or ckpt.get("chain") != chain:
        return 0  # another engine's or chain's state: start this chain afresh (the next save replaces it)
    kernel.load_state_dict(ckpt["kernel"])
    posterior.load_state_dict(ckpt["posterior"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]
