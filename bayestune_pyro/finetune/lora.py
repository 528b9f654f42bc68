"""LoRA baseline: the additive search space's LoRA module on chosen linear layers, trained densely, the backbone
frozen at θ̄.

Each target layer gains y += (x·Aᵀ)·Bᵀ (``search_spaces/additive.py``) with A (r × in) seeded Kaiming-uniform and
B (out × r) at zero, so training starts at θ̄ exactly. Trainable: r·(in + out) per adapted layer, which is what
counts against the budget; :func:`rank_for_budget` picks the r whose count is closest to a coordinate budget k.
``release()`` removes the module again.
"""
from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..models.lifted import LiftedBackbone
from ..search_spaces.additive import Additive
from .stage2 import Stage2Config, Tuner

DEFAULT_TARGETS = ("*query", "*value", "*q_proj", "*v_proj", "*qkv")


def lora_targets(lifted: LiftedBackbone, patterns: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """The linear layers (module names) matching ``patterns`` (globs) whose weight is covered."""
    covered = set(lifted.layout.names)
    names = [n for n, m in lifted.model.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" in covered
             and any(fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise ValueError(f"lora_targets: {list(patterns)} match no covered linear layer of the backbone")
    return names


def rank_for_budget(lifted: LiftedBackbone, targets: list[str], k: int) -> int:
    """The rank r ≥ 1 whose trainable count r·Σ(in + out) is closest to ``k``."""
    modules = dict(lifted.model.named_modules())
    per_rank = sum(modules[n].in_features + modules[n].out_features for n in targets)
    return max(1, round(k / per_rank))


class LoRATuner(Tuner):
    def __init__(self, lifted: LiftedBackbone, loss_fn: Callable, config: Stage2Config, rank: int,
                 targets: list[str], seed: int = 0):
        if rank < 1:
            raise ValueError(f"rank: must be >= 1, got {rank!r}")
        super().__init__(lifted, loss_fn, config)
        self.rank, self.targets = rank, targets
        self.remove = Additive(kinds=("lora",), width=rank, lora_targets=tuple(targets), seed=seed).attach(lifted.model)
        modules = dict(lifted.model.named_modules())
        self.factors = {n: (modules[n].bt_lora_A, modules[n].bt_lora_B) for n in targets}
        self.opt = torch.optim.AdamW([t for ab in self.factors.values() for t in ab], lr=config.lr,
                                     weight_decay=config.weight_decay)
        self.n_updated = sum(a.numel() + b.numel() for a, b in self.factors.values())

    def forward(self, batch: dict) -> torch.Tensor:
        args, kwargs = self.lifted.backbone.inputs(batch)
        return self.lifted.backbone.logits(self.lifted.model(*args, **kwargs))

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

    def release(self) -> None:
        """Remove the LoRA module: the network is the pretrained one again."""
        self.remove()
        super().release()
