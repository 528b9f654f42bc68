"""Uncertainty-aware selection (the paper's Appendix C): scores that use Var[λ_i], P(λ_i > λ_th), a knee for p.

- Rank ``mean`` scores λ̂_i; rank ``lcb`` scores the lower credible bound λ̂_i − z·sd_i, sd_i² the pooled
  streaming variance (z = 1.645: a one-sided 95% normal bound), so between similar means the smaller variance wins.
- P(λ_i > λ_th): for the tracked coordinates, the share of draws above λ_th (all chains); for all d coordinates, a
  log-normal matched to the moments (λ > 0 and right-skewed, where a normal would put mass below 0):
  log λ_i ~ N(m, s²) with s² = log(1 + Var/λ̂²) and m = log λ̂ − s²/2.
- The knee (``--auto``): on the λ̂ curve sorted in descending order, x = log p (p = rank/d) and y = log λ̂, both
  rescaled to [0, 1]; the knee is the point farthest from the chord joining the curve's ends (the Kneedle rule),
  searched over ``POINTS`` log-spaced ranks. It gives p, and λ_th = λ̂ at that rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..inference.posterior import StreamingPosterior
from .masks import Mask, above_threshold, top_p

Z = 1.645
POINTS = 2000
RANKS = ("mean", "lcb")


def score(mean: torch.Tensor, var: torch.Tensor, rank: str = "mean", z: float | None = None) -> torch.Tensor:
    """The ranking score per coordinate: λ̂ (``mean``) or λ̂ − z·sd (``lcb``, z defaults to :data:`Z`)."""
    if rank not in RANKS:
        raise ValueError(f"rank: unknown value {rank!r}; choose one of: {', '.join(RANKS)}")
    if z is not None and rank != "lcb":
        raise ValueError(f"z: only used with rank lcb, got z={z!r} with rank {rank!r}")
    if z is not None and not (z > 0 and math.isfinite(z)):
        raise ValueError(f"z: must be a positive number, got {z!r}")
    return mean if rank == "mean" else mean - (Z if z is None else z) * var.sqrt()


def inclusion_probability(mean: torch.Tensor, var: torch.Tensor, threshold: float) -> torch.Tensor:
    """P(λ_i > λ_th) under the moment-matched log-normal; a step at λ_th where the variance is 0."""
    s2 = torch.log1p(var / mean.square())
    z = (math.log(threshold) - mean.log() + s2 / 2) / s2.sqrt()
    return torch.where(s2 > 0, torch.special.ndtr(-z), (mean > threshold).to(mean.dtype))


def inclusion_from_draws(draws: torch.Tensor, threshold: float) -> torch.Tensor:
    """P(λ_i > λ_th) of tracked coordinates: the share of their (chain, draw, K) draws above λ_th."""
    return (draws > threshold).to(torch.float64).mean((0, 1))


@dataclass(frozen=True)
class Knee:
    """The knee of the sorted λ̂ curve: its rank k, p = k/d, and λ_th = λ̂ at rank k."""

    k: int
    p: float
    threshold: float


@dataclass(frozen=True)
class Curve:
    """Scores sorted in descending order, at log-spaced ranks k (1-based) out of d."""

    k: np.ndarray
    values: np.ndarray
    d: int

    @classmethod
    def of(cls, scores: torch.Tensor, points: int = POINTS) -> Curve:
        """Exact order statistics at the ranks only: one multi-pivot partition (numpy), not a sort of d."""
        flat = scores.detach().flatten()
        flat = (flat if flat.dtype in (torch.float32, torch.float64) else flat.float()).cpu().numpy()
        d = flat.size
        k = np.unique(np.round(np.logspace(0, math.log10(d), points)).astype(np.int64))
        position = d - k  # the k-th largest sits at ascending position d − k
        return cls(k, np.partition(flat, position)[position].astype(np.float64), d)

    @property
    def p(self) -> np.ndarray:
        return self.k / self.d

    def knee(self) -> Knee:
        """The point of the log-log curve farthest from its chord (see the module docstring)."""
        keep = self.values > 0
        x, y = np.log(self.p[keep]), np.log(self.values[keep])
        if x.size < 3 or y[0] <= y[-1]:
            raise ValueError("auto: the sorted λ̂ curve is flat, so it has no knee; give --p or --threshold")
        u, v = (x - x[0]) / (x[-1] - x[0]), (y - y[-1]) / (y[0] - y[-1])
        i = int(np.argmax(np.abs(u + v - 1)))  # the chord runs from (0, 1) to (1, 0): u + v = 1
        k = int(self.k[keep][i])
        return Knee(k, k / self.d, float(self.values[keep][i]))


def select(posterior: StreamingPosterior, p: float | None = None, threshold: float | None = None, *,
           auto: bool = False, rank: str = "mean", z: float | None = None) -> Mask:
    """The stage-2 mask: the top p, every score > threshold, or (``auto``) the top p at the knee of λ̂.

    ``mask.info`` records how it was chosen: selection (p / threshold / knee), rank, z, the knee, and
    ``lambda_cut``, the smallest λ̂ kept.
    """
    if auto and (p is not None or threshold is not None):
        raise ValueError(f"auto: the knee chooses p itself; give auto or one of p and threshold, not both "
                         f"(p={p!r}, threshold={threshold!r})")
    if not auto and (p is None) == (threshold is None):
        raise ValueError(f"p: give exactly one of p and threshold (p={p!r}, threshold={threshold!r})")
    mean, var = posterior.pooled(posterior.estimate)
    scores = score(mean, var, rank, z)
    info = {"selection": "knee" if auto else "p" if p is not None else "threshold", "rank": rank}
    if rank == "lcb":
        info["z"] = Z if z is None else z
    if auto:
        knee = Curve.of(mean).knee()
        p = knee.p
        info["knee"] = {"k": knee.k, "p": knee.p, "lambda": knee.threshold,
                        "rule": "max distance to the chord of log λ̂ against log p"}
    layout = posterior.layout
    mask = top_p(scores, p, layout) if p is not None else above_threshold(scores, threshold, layout)
    mask.info.update(info, lambda_cut=float(mean[mask.index].min()) if mask.k else None)
    mask.backbone = posterior.meta.get("backbone")
    return mask
