"""The sparse delta: the only artifact stage 2 needs to ship.

``delta.safetensors`` holds, for every covered tensor with updated coordinates, ``<name>.index`` (flat indices
within the tensor) and ``<name>.delta`` (θ − θ̄ there), plus the full head as ``head.<name>``. Its header names
the backbone, the number of labels and the search space, so ``merge`` rebuilds the fine-tuned model from a fresh
load of the pretrained backbone (with the search space's added modules attached again, seeded as before):
θ_i = θ̄_i + δ_i on the mask, θ̄_i everywhere else (the same float addition stage 2 did, so predictions are
identical).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from ..io import save_tensors
from ..models.backbones import Backbone, load_backbone
from ..models.lifted import Layout
from ..registry import SEARCH_SPACES

FORMAT = "bayestune-sparse-delta/1"


@dataclass
class SparseDelta:
    """Per-tensor (indices, deltas) for covered parameters, and the head's tensors."""

    updates: dict[str, tuple[torch.Tensor, torch.Tensor]]
    head: dict[str, torch.Tensor]
    backbone: str
    num_labels: int
    seed: int = 0
    pretrained: bool = True
    search_space: dict | None = None  # {"name": ..., options}; None: the pretrained parameters only (subset)

    @classmethod
    def from_flat(cls, layout: Layout, index: torch.Tensor, delta: torch.Tensor, head: dict[str, torch.Tensor],
                  backbone: str, num_labels: int, seed: int = 0, pretrained: bool = True,
                  search_space: dict | None = None) -> SparseDelta:
        """Split flat (sorted) mask indices and their deltas into per-tensor pieces."""
        updates = {}
        bounds = torch.tensor(layout.offsets + (layout.d,), device=index.device)
        cuts = torch.searchsorted(index, bounds).tolist()
        for i, name in enumerate(layout.names):
            lo, hi = cuts[i], cuts[i + 1]
            if hi > lo:
                local = index[lo:hi] - layout.offsets[i]
                updates[name] = (local.to(torch.int32 if layout.numels[i] < 2**31 else torch.int64),
                                 delta[lo:hi].detach().clone())
        return cls(updates, {k: v.detach().clone() for k, v in head.items()}, backbone, num_labels, seed, pretrained,
                   search_space)

    @property
    def n_updated(self) -> int:
        return sum(int(i.numel()) for i, _ in self.updates.values())

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        for name, (index, delta) in self.updates.items():
            tensors[f"{name}.index"], tensors[f"{name}.delta"] = index, delta
        tensors.update({f"head.{k}": v for k, v in self.head.items()})
        meta = {"format": FORMAT, "backbone": self.backbone, "num_labels": str(self.num_labels),
                "seed": str(self.seed), "pretrained": str(self.pretrained).lower()}
        if self.search_space is not None:
            meta["search_space"] = json.dumps(self.search_space)
        save_tensors(path, tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseDelta:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"delta: {str(path)!r} is not a {FORMAT} file (format={meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        head = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
        names = {k[: -len(".index")] for k in tensors if k.endswith(".index") and not k.startswith("head.")}
        updates = {n: (tensors[f"{n}.index"], tensors[f"{n}.delta"]) for n in sorted(names)}
        space = json.loads(meta["search_space"]) if "search_space" in meta else None
        return cls(updates, head, meta["backbone"], int(meta["num_labels"]), int(meta.get("seed", 0)),
                   meta.get("pretrained", "true") == "true", space)

    @torch.no_grad()
    def merge_into(self, model: nn.Module) -> nn.Module:
        """Add the deltas to ``model``'s pretrained weights and load the head, in place."""
        named = dict(model.named_parameters())
        for name, (index, delta) in self.updates.items():
            flat = named[name].data.view(-1)
            flat.index_add_(0, index.to(flat.device, torch.int64), delta.to(flat.device, flat.dtype))
        for name, value in self.head.items():
            named[name].data.copy_(value)
        return model


def merge(path: str | os.PathLike, device: str | torch.device = "cpu") -> Backbone:
    """A fresh pretrained backbone with the delta at ``path`` merged in."""
    sparse = SparseDelta.load(path)
    backbone = load_backbone(sparse.backbone, sparse.num_labels, pretrained=sparse.pretrained, seed=sparse.seed)
    if sparse.search_space is not None:
        options = {k: v for k, v in sparse.search_space.items() if k != "name"}
        spec = SEARCH_SPACES.get(sparse.search_space["name"])
        spec.build(spec.options.from_values(options, f"search space {spec.name}")).attach(backbone.model)
    sparse.merge_into(backbone.model.to(device))
    return backbone
