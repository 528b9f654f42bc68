"""LoRA baseline: W = W̄ + (s/r)·B·A on chosen weight matrices, the backbone itself frozen at θ̄.

A (r × in) starts Kaiming-uniform and B (out × r) at zero, so training starts at θ̄; s = 2r, so the
update's scale s/r is 2 at every rank.
Trainable: r·(in + out) per adapted matrix, which is what counts against the budget.
:func:`rank_for_budget` picks the r whose count is closest to a coordinate budget k.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from fnmatch import fnmatchcase

import torch

from ..models.lifted import LiftedBackbone
from .stage2 import Stage2Config, Tuner

DEFAULT_TARGETS = ("*query.weight", "*value.weight", "*q_proj.weight", "*v_proj.weight", "*qkv.weight")
SCALE = 2.0


def lora_targets(lifted: LiftedBackbone, patterns: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Covered 2-D weights whose names match ``patterns`` (globs)."""
    names = [n for n, s in zip(lifted.layout.names, lifted.layout.shapes)
             if len(s) == 2 and any(fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"lora_targets: {list(patterns)} match no covered 2-D weight of the backbone")
    return names


def rank_for_budget(lifted: LiftedBackbone, targets: list[str], k: int) -> int:
    """The rank r ≥ 1 whose trainable count r·Σ(in + out) is closest to ``k``."""
    shapes = dict(zip(lifted.layout.names, lifted.layout.shapes))
    per_rank = sum(sum(shapes[n]) for n in targets)
    return max(1, round(k / per_rank))


class LoRATuner(Tuner):
    def __init__(self, lifted: LiftedBackbone, loss_fn: Callable, config: Stage2Config, rank: int,
                 targets: list[str], seed: int = 0):
        if rank < 1:
            raise ValueError(f"rank: must be >= 1, got {rank!r}")
        super().__init__(lifted, loss_fn, config)
        self.rank, self.targets = rank, targets
        params = dict(lifted.model.named_parameters())
        g = torch.Generator().manual_seed(seed)
        self.base = {name: params[name] for name in targets}  # frozen views of θ̄
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in targets:
            out_f, in_f = params[name].shape
            bound = 1 / math.sqrt(in_f)  # Kaiming-uniform with a = √5, as nn.Linear
            a = ((torch.rand(rank, in_f, generator=g) * 2 - 1) * bound).to(self.device).requires_grad_()
            b = torch.zeros(out_f, rank, device=self.device, requires_grad=True)
            self.factors[name] = (a, b)
        self.opt = torch.optim.AdamW([t for ab in self.factors.values() for t in ab], lr=config.lr,
                                     weight_decay=config.weight_decay)
        self.n_updated = sum(a.numel() + b.numel() for a, b in self.factors.values())

    def forward(self, batch: dict) -> torch.Tensor:
        merged = {n: self.base[n] + SCALE * (b @ a) for n, (a, b) in self.factors.items()}
        return self.lifted.forward_with(merged, batch)

    def update(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def trained(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{ab}": t for n, pair in self.factors.items() for ab, t in zip("AB", pair)}

    @torch.no_grad()
    def load_trained(self, state: dict[str, torch.Tensor]) -> None:
        for n, (a, b) in self.factors.items():
            a.copy_(state[f"{n}.A"])
            b.copy_(state[f"{n}.B"])
