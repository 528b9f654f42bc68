"""Search space ``additive``: zero-initialised modules attached to the network, λ only on them (θ̄ = their init).

The paper's additive search space (Sec. 5.3): the backbone stays frozen at its pretrained values, and every
chosen layer gains small modules whose output is exactly 0 at initialisation, so the network's function at θ̄ is
the pretrained one, bitwise. The posterior then decides which module coordinates leave their start. Kinds:

- ``lora``     on every ``nn.Linear`` matching ``additive_lora_targets``: y += (x·Aᵀ)·Bᵀ with A (w × in, seeded
               Kaiming-uniform) and B (out × w, zeros). Exactly one factor is 0, so ∇B ≠ 0 at the start.
- ``adapter``  after every ``nn.Linear`` matching ``additive_adapter_targets`` (Houlsby's placement: the
               attention and feed-forward output projections, before the residual): y += GELU(y·Dᵀ)·Uᵀ with
               D (w × out, seeded) and U (out × w, zeros).

w is ``additive_width``. Added tensors are named ``<module>.bt_<kind>_<factor>``. With ``additive_backbone`` the
backbone's own parameters are covered too (the paper's "both"). The random factors are drawn from a generator
seeded by ``additive_seed``, so ``merge`` rebuilds the same θ̄ from the delta file's record of the space.
Visual prompts (VPT) are not written yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..config import Options, check_at_least_one, option
from . import SearchSpace, Space, register

KINDS = ("lora", "adapter")
PREFIX = "bt_"


def _lora_hook(module: nn.Linear, inputs, out):
    return out + (inputs[0] @ module.bt_lora_A.T) @ module.bt_lora_B.T


def _adapter_hook(module: nn.Linear, inputs, out):
    return out + nn.functional.gelu(out @ module.bt_adapter_down.T) @ module.bt_adapter_up.T


@dataclass(frozen=True)
class Additive(SearchSpace):
    kinds: tuple[str, ...] = KINDS
    width: int = 10
    lora_targets: tuple[str, ...] = ("*query", "*value", "*q_proj", "*v_proj", "*qkv")
    adapter_targets: tuple[str, ...] = ("*output.dense", "*attn.proj", "*mlp.fc2", "*o_proj", "*down_proj")
    backbone: bool = False
    seed: int = 0

    def attach(self, model: nn.Module) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        targets = {"lora": self.lora_targets, "adapter": self.adapter_targets}
        attached = 0
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            like = {"dtype": module.weight.dtype, "device": module.weight.device}
            for kind in (k for k in KINDS if k in self.kinds):
                if not any(fnmatchcase(name, p) for p in targets[kind]):
                    continue
                random, zero, columns, hook = FACTORS[kind]
                setattr(module, f"{PREFIX}{kind}_{random}",
                        nn.Parameter(_kaiming(self.width, getattr(module, columns), generator, **like)))
                setattr(module, f"{PREFIX}{kind}_{zero}", nn.Parameter(torch.zeros(module.out_features, self.width,
                                                                                   **like)))
                module.register_forward_hook(hook)
                attached += 1
        if not attached:
            raise ValueError(f"search_space: additive kinds={list(self.kinds)} found no nn.Linear matching "
                             f"lora targets {list(self.lora_targets)} or adapter targets {list(self.adapter_targets)}")

    def covered(self, names: list[str], head_names: list[str]) -> list[str]:
        head = set(head_names)
        return [n for n in names if n not in head and (self.backbone or n.rsplit(".", 1)[-1].startswith(PREFIX))]


# kind: (the random factor, the zero factor, the nn.Linear size that is the random factor's width in, its hook)
FACTORS = {"lora": ("A", "B", "in_features", _lora_hook), "adapter": ("down", "up", "out_features", _adapter_hook)}


def _kaiming(rows: int, cols: int, generator: torch.Generator, dtype, device) -> torch.Tensor:
    """Kaiming-uniform with a = √5, as ``nn.Linear`` initialises its weight (bound 1/√cols)."""
    bound = 1.0 / math.sqrt(cols)
    return ((torch.rand(rows, cols, generator=generator) * 2 - 1) * bound).to(dtype=dtype, device=device)


@dataclass
class AdditiveOptions(Options):
    additive_kinds: list[str] = option(list(KINDS), "additive: the kinds of zero-initialised module to attach",
                                       nargs="+", choices=KINDS)
    additive_width: int = option(10, "additive: width w of every module (LoRA rank, adapter bottleneck)")
    additive_lora_targets: list[str] = option(list(Additive.lora_targets), "additive: globs of the nn.Linear "
                                              "modules that get LoRA factors", nargs="+")
    additive_adapter_targets: list[str] = option(list(Additive.adapter_targets), "additive: globs of the nn.Linear "
                                                 "modules followed by an adapter", nargs="+")
    additive_backbone: bool = option(False, "additive: cover the backbone's own parameters too (the paper's both)")
    additive_seed: int = option(0, "additive: seed of the random factors (LoRA A, adapter down)")

    def check(self):
        check_at_least_one(self, "additive_width")
        for kind in self.additive_kinds:
            if kind not in KINDS:
                raise ValueError(f"additive_kinds: unknown value {kind!r}; choose from: {', '.join(KINDS)}")
        if not self.additive_kinds:
            raise ValueError("additive_kinds: empty; choose from: " + ", ".join(KINDS))


def build(o: AdditiveOptions) -> Additive:
    return Additive(tuple(o.additive_kinds), o.additive_width, tuple(o.additive_lora_targets),
                    tuple(o.additive_adapter_targets), o.additive_backbone, o.additive_seed)


register(Space("additive", "zero-initialised LoRA factors and adapters attached to the network, λ only on them",
               AdditiveOptions, build))
