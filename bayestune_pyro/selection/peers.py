"""Scores of the peer methods: one number per covered coordinate, cut to a mask by ``masks.top_k``.

- ``random``: i.i.d. uniform scores (seeded);
- ``magnitude``: |θ̄| (magnitude pruning kept the other way round);
- ``gradient`` (Fu et al.'s SAM): Σ_b |∇_θ L_b| at θ̄ over n batches;
- ``sift``: the same over the first batch(es), optionally only inside chosen tensors (e.g. attention q/k/v/o);
- ``bitfit``: bias terms only; all of them when the budget allows, else the top-k biases by ``gradient``;
- ``l1sp``: |θ − θ̄| / (|θ̄| + ε) after L1-penalised full fine-tuning (``finetune.dense``).
BayesTune's own score is the posterior mean λ̂ (``uncertainty.select``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase

import torch

from ..models.lifted import Layout, LiftedBackbone
from .masks import Mask, top_k

RELATIVE_EPS = 1e-3  # ε of L1-SP's relative change: below the scale of any trained weight, above exact zeros


def random_scores(d: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.rand(d, generator=torch.Generator(device).manual_seed(seed), device=device)


def magnitude_scores(lifted: LiftedBackbone) -> torch.Tensor:
    return lifted.theta_bar.abs()


def gradient_scores(lifted: LiftedBackbone, batches: Iterator[dict], loss_fn: Callable, n_batches: int) -> torch.Tensor:
    """Σ |∇_θ L| over ``n_batches`` minibatches at θ̄, with the head as it is (dropout off)."""
    if n_batches < 1:
        raise ValueError(f"n_batches: must be >= 1, got {n_batches!r}")
    device = lifted.theta_bar.device
    theta = lifted.theta_bar.clone()
    grad, total = torch.zeros_like(theta), torch.zeros_like(theta)
    lifted.bind(theta, grad)
    lifted.model.eval()
    try:
        for _ in range(n_batches):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss_fn(lifted(theta, batch), batch["labels"]).backward()
            total.add_(grad.abs_())
            grad.zero_()
    finally:
        lifted.unbind()
        for p in lifted.head_parameters():
            p.grad = None
    return total


def restrict(scores: torch.Tensor, layout: Layout, patterns: tuple[str, ...], k: int, field: str) -> torch.Tensor:
    """``scores`` with every tensor whose name matches none of ``patterns`` set to −∞ (never chosen)."""
    allowed = torch.zeros(layout.d, dtype=torch.bool, device=scores.device)
    for name, view in layout.split(allowed).items():
        if any(fnmatchcase(name, p) for p in patterns):
            view.fill_(True)
    if int(allowed.sum()) < k:
        raise ValueError(f"{field}: {list(patterns)} cover {int(allowed.sum())} coordinates, fewer than the budget "
                         f"k = {k}; widen the patterns or lower p")
    return scores.masked_fill(~allowed, float("-inf"))


def bias_names(layout: Layout) -> list[str]:
    return [n for n in layout.names if n.rpartition(".")[2] == "bias"]


def bitfit_mask(layout: Layout, k: int, gradient: Callable[[], torch.Tensor]) -> Mask:
    """Every bias when there are at most k of them (BitFit's natural p), else the k biases of largest gradient."""
    names = bias_names(layout)
    if not names:
        raise ValueError("method: bitfit needs bias terms, and the covered backbone has none")
    natural = sum(n for name, n in zip(layout.names, layout.numels) if name in names)
    if natural <= k:
        ones = torch.zeros(layout.d)
        for name, view in layout.split(ones).items():
            if name in names:
                view.fill_(1.0)
        return top_k(ones, natural, layout, "bitfit", natural_p=natural / layout.d, budget=k)
    scores = restrict(gradient(), layout, tuple(names), k, "bitfit")
    return top_k(scores, k, layout, "bitfit", natural_p=natural / layout.d, budget=k)


def relative_change_scores(theta: torch.Tensor, theta_bar: torch.Tensor) -> torch.Tensor:
    """L1-SP's score |θ − θ̄| / (|θ̄| + ε)."""
    return (theta - theta_bar).abs_().div_(theta_bar.abs().add_(RELATIVE_EPS))
