"""Stage-2 masks: which covered coordinates are fine-tuned, chosen from a score per coordinate (λ̂ for BayesTune).

A mask is the sorted flat indices of the chosen coordinates in θ's layout. Top-p keeps exactly ⌊p·d⌋ coordinates,
ties broken towards the lower flat index (a stable sort), so the same scores always give the same mask; a
threshold keeps every coordinate with score > λ_th. Files: ``mask.safetensors`` (indices) and ``mask.json``
(p, λ_th, d, count per parameter tensor).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import load_tensors, read_json, save_tensors, write_json
from ..models.lifted import Layout


@dataclass
class Mask:
    """Sorted flat indices of the fine-tuned coordinates of θ, with how they were chosen."""

    index: torch.Tensor
    layout: Layout
    p: float | None = None
    threshold: float | None = None
    method: str = "bayestune"
    info: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.index.numel())

    def counts(self) -> dict[str, int]:
        return self.layout.counts(self.index)

    def dense(self) -> torch.Tensor:
        """The mask as a boolean vector of length d."""
        out = torch.zeros(self.layout.d, dtype=torch.bool, device=self.index.device)
        out[self.index] = True
        return out

    def save(self, run_dir: str | os.PathLike) -> None:
        save_tensors(Path(run_dir) / "mask.safetensors", {"index": self.index})
        write_json(Path(run_dir) / "mask.json", {
            "method": self.method, "p": self.p, "threshold": self.threshold, "d": self.layout.d, "k": self.k,
            "counts": self.counts(), "layout": self.layout.to_json(), **self.info,
        })

    @classmethod
    def load(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Mask:
        meta = read_json(Path(run_dir) / "mask.json")
        index = load_tensors(Path(run_dir) / "mask.safetensors", device)["index"]
        info = {k: v for k, v in meta.items() if k not in ("method", "p", "threshold", "d", "k", "counts", "layout")}
        return cls(index, Layout.from_json(meta["layout"]), meta["p"], meta["threshold"], meta["method"], info)


def budget(p: float, d: int) -> int:
    """⌊p·d⌋, the number of coordinates a top-p mask holds."""
    check_fraction(p)
    return math.floor(p * d)


def check_fraction(p: float) -> None:
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise ValueError(f"p: must be a fraction in (0, 1], got {p!r}")


def top_p(scores: torch.Tensor, p: float, layout: Layout, method: str = "bayestune") -> Mask:
    """The ⌊p·d⌋ highest-scoring coordinates; equal scores are taken in flat-index order."""
    return top_k(scores, budget(p, scores.numel()), layout, method, p=p)


def top_k(scores: torch.Tensor, k: int, layout: Layout, method: str, p: float | None = None, **info) -> Mask:
    """The k highest-scoring coordinates (ties in flat-index order) as a mask; p defaults to k / d."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k: must be in [0, {scores.numel()}], got {k!r}")
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return Mask(order.sort().values, layout, p=k / layout.d if p is None else p, method=method, info=info)


def above_threshold(scores: torch.Tensor, threshold: float, layout: Layout, method: str = "bayestune") -> Mask:
    """Every coordinate whose score exceeds λ_th."""
    if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold: must be a positive number, got {threshold!r}")
    index = torch.nonzero(scores > threshold).flatten()
    return Mask(index, layout, p=index.numel() / scores.numel(), threshold=threshold, method=method)
