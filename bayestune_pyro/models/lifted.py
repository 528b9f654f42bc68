"""The lifted backbone: covered parameters as one flat vector θ, pretrained values θ̄ beside it.

θ̄ is stored once, as a flat buffer; the module's own covered parameters become frozen views into it, so the
backbone costs no extra copy. ``forward(theta, batch)`` runs the network with any flat θ:

- generally through ``torch.func.functional_call`` on per-tensor views of θ (autograd sees θ; the backward of
  the split is one d-sized concatenation);
- for the θ given to :meth:`bind`, by calling the module itself: its covered parameters are then views of
  θ and their ``.grad`` views of one flat gradient buffer, so a backward pass writes ∇θ in place with no
  d-sized allocation at all (the stage-1 hot path).

The head and any uncovered parameters are the module's own (head trainable, the rest frozen).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..search_spaces import SearchSpace
from ..search_spaces.subset import Subset
from .backbones import Backbone


@dataclass(frozen=True)
class Layout:
    """Name → (shape, offset) map of the flat θ vector; d is its length."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    d: int

    @classmethod
    def of(cls, named: list[tuple[str, tuple[int, ...]]]) -> Layout:
        offsets, total = [], 0
        for _, shape in named:
            offsets.append(total)
            total += math.prod(shape)
        return cls(tuple(n for n, _ in named), tuple(tuple(s) for _, s in named), tuple(offsets), total)

    @property
    def sha256(self) -> str:
        """The layout's fingerprint, written into every artifact over θ: sha256 of its names and shapes as JSON."""
        rows = [[n, list(s)] for n, s in zip(self.names, self.shapes)]
        return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-tensor views of a flat vector, shaped like the parameters."""
        return {n: v.view(s) for n, v, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def counts(self, flat_index: torch.Tensor) -> dict[str, int]:
        """How many of the given flat indices fall into each parameter tensor."""
        edges = torch.tensor(self.offsets[1:] + (self.d,), device=flat_index.device)
        per = torch.bincount(torch.bucketize(flat_index, edges, right=True), minlength=len(self.names))
        return dict(zip(self.names, per.tolist()))

    def to_json(self) -> list:
        return [[n, list(s), o] for n, s, o in zip(self.names, self.shapes, self.offsets)]

    @classmethod
    def from_json(cls, rows: list) -> Layout:
        """The layout :meth:`to_json` wrote; a one-line ValueError (without the file: the caller names it) for
        rows that are not ``[name, shape, offset]`` with distinct names and consecutive offsets."""
        if not isinstance(rows, list):
            raise ValueError(f"is {type(rows).__name__}, not a list of [name, shape, offset] rows")
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], list)
                    and all(type(n) is int and n >= 0 for n in row[1]) and type(row[2]) is int):
                raise ValueError(f"row {i} is {str(row)[:60]}, not [name, shape, offset]")
        layout = cls.of([(n, tuple(s)) for n, s, _ in rows])
        if len(set(layout.names)) != len(rows):
            raise ValueError("names a tensor twice")
        if [o for _, _, o in rows] != list(layout.offsets):
            raise ValueError("has offsets that do not follow from its shapes")
        return layout


def covered_layout(model: nn.Module, space: SearchSpace, head_names: list[str]) -> Layout:
    """The layout of the parameters of ``model`` (its search space attached) that ``space`` covers."""
    named = dict(model.named_parameters())
    return Layout.of([(n, named[n].shape) for n in space.covered(list(named), head_names)])


class LiftedBackbone(nn.Module):
    """A backbone whose covered parameters are the flat vector θ (pretrained value θ̄ = ``theta_bar``)."""

    def __init__(self, backbone: Backbone, space: SearchSpace = Subset(), device: str | torch.device = "cpu"):
        super().__init__()
        self.backbone, self.space = backbone, space
        space.attach(backbone.model)
        self.model = backbone.model.to(device)
        named = dict(self.model.named_parameters())
        self.layout = covered_layout(self.model, space, backbone.head_names)
        covered = self.layout.names
        dtypes = {named[n].dtype for n in covered}
        if len(dtypes) != 1:
            raise ValueError(f"search_space: covered parameters mix dtypes {sorted(map(str, dtypes))}; "
                             "cast the backbone first")
        self.register_buffer("theta_bar", torch.cat([named[n].detach().reshape(-1) for n in covered]))
        for n, view in self.layout.split(self.theta_bar).items():
            named[n].data = view  # share storage with θ̄: no second copy of the backbone
        head = set(backbone.head_names)
        for n, p in named.items():
            p.requires_grad_(n in head)
        self.head_names = [n for n in named if n in head]
        self.bound: torch.Tensor | None = None

    @property
    def d(self) -> int:
        return self.layout.d

    def head_parameters(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.head_names]

    def covered_parameters(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.layout.names]

    @torch.no_grad()
    def bind(self, theta: torch.Tensor, grad: torch.Tensor) -> None:
        """Make the covered parameters views of ``theta`` whose gradients accumulate into ``grad`` (both flat)."""
        views, grads = self.layout.split(theta).values(), self.layout.split(grad).values()
        for p, view, g in zip(self.covered_parameters(), views, grads):
            p.data = view
            p.requires_grad_(True)
            p.grad = g
        self.bound = theta

    @torch.no_grad()
    def unbind(self) -> None:
        """Point the covered parameters back at θ̄, frozen."""
        for p, view in zip(self.covered_parameters(), self.layout.split(self.theta_bar).values()):
            p.data = view
            p.requires_grad_(False)
            p.grad = None
        self.bound = None

    def forward(self, theta: torch.Tensor, batch: dict) -> torch.Tensor:
        """Logits of the network with covered parameters θ (flat, length d)."""
        if theta is self.bound:
            args, kwargs = self.backbone.inputs(batch)
            return self.backbone.logits(self.model(*args, **kwargs))
        return self.forward_with(self.layout.split(theta), batch)

    def forward_with(self, params: dict[str, torch.Tensor], batch: dict) -> torch.Tensor:
        """Logits with some parameters replaced by ``params`` (name → tensor); the rest are the module's own."""
        args, kwargs = self.backbone.inputs(batch)
        return self.backbone.logits(functional_call(self.model, params, args, kwargs, strict=False))
