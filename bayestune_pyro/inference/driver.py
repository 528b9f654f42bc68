"""The one stage-1 driver: phases, batch replay, the NaN guard, progress, checkpoints and resume, for any kernel.

A :class:`Kernel` (one module each in ``engines/``) owns the chain's state and one transition; the driver runs
the schedule over it:

- warm-up   plain optimisation (no prior, no noise: the kernel's ``step`` is told the phase);
- burn-in   the kernel's transition, nothing collected;
- sampling  the transition, every ``thin``-th state collected into the :class:`StreamingPosterior`.

Losses are checked for NaN/inf without host syncs: a device flag is read only at the logging interval, and the
run stops with the step range and the last checkpoint named. Checkpoints are atomic and hold only tensors and
plain containers (read with ``weights_only=True``), so an interrupted run resumes where it stopped.
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
from ..io import read_json, save_torch, write_json
from .posterior import StreamingPosterior

CHECKPOINT = "stage1.ckpt"
CHECKPOINT_INFO = "stage1.ckpt.json"


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
    """The chain a stage-1 checkpoint in ``run_dir`` belongs to (earlier chains are finished), or 0."""
    info = Path(run_dir) / CHECKPOINT_INFO
    return int(read_json(info)["chain"]) if (Path(run_dir) / CHECKPOINT).exists() and info.exists() else 0


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
        start = _restore(ckpt_path, kernel, posterior, engine, chain, device)
    for _ in range(start):  # replay the batch stream to where the checkpoint left it
        next(batches)
    try:
        bad = torch.zeros((), dtype=torch.bool, device=device)
        bar = tqdm(range(start, schedule.steps), initial=start, total=schedule.steps, disable=not progress,
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
            if ckpt_path is not None and ((step + 1) % checkpoint_every == 0 or last):  # last: the chain is done
                _save(ckpt_path, step + 1, kernel, posterior, engine, chain)
        bar.close()
        kernel.finish(posterior, chain)
    finally:
        kernel.release()  # the network gets θ̄ back, even after an error or interrupt
    return kernel


def _save(path: Path, step: int, kernel: Kernel, posterior: StreamingPosterior, engine: str, chain: int) -> None:
    """The checkpoint, then a small JSON naming its engine, chain and step (read without loading the tensors)."""
    save_torch(path, {"engine": engine, "step": step, "chain": chain, "kernel": kernel.state_dict(),
                      "posterior": posterior.state_dict(), "rng": torch.get_rng_state(), "time": time.time()})
    write_json(path.parent / CHECKPOINT_INFO, {"engine": engine, "chain": chain, "step": step})


@torch.no_grad()
def _restore(path: Path, kernel: Kernel, posterior: StreamingPosterior, engine: str, chain: int, device) -> int:
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt.get("engine") != engine or ckpt.get("chain") != chain or "kernel" not in ckpt:
        return 0  # another engine's or chain's state: start this chain afresh
    kernel.load_state_dict(ckpt["kernel"])
    posterior.load_state_dict(ckpt["posterior"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["step"]
