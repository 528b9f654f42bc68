"""The streaming posterior: moments of every covered coordinate, traces of a tracked subset, per chain.

Storing every sample of d coordinates is impossible at foundation-model scale, so each collected sample
updates running moments (Welford) of λ — and of θ − θ̄ if asked — for all d coordinates, and appends the
values of K seeded, tracked coordinates plus per-sample statistics (minibatch loss, log joint) to traces.
Moments are kept per chain and pooled on demand (Chan et al.'s parallel combination).

λ̂ comes from one of two estimators (``estimator``):
- ``draws``: the mean of the λ draws;
- ``rao-blackwell``: the mean over draws of E[λ_i | θ_i⁽ˢ⁾], the closed-form conditional mean of
  :class:`LambdaConditional` (λ_i | θ_i ~ GIG, since the data never touch λ). It never has a larger variance than
  ``draws`` and needs no mixing in λ. Its variance moment is the spread of E[λ|θ] over draws.

A coordinate the data never touched (its likelihood gradient was 0 on every minibatch of stage 1, e.g. the
embedding row of a token absent from the training split) has its prior as posterior: λ_i ~ Gamma(α, β). A sampler's
λ̂ for it is then known exactly, α/β (variance α/β²), so :meth:`StreamingPosterior.pooled` returns these instead of
the chain's Monte-Carlo estimate (``flat_prior`` = (α, β); set for samplers). Under the paper's prior that estimate
is noise with a heavy tail: one exact draw exceeds 0.0038 with probability 0.7%, so among the ~10⁷ untouched
coordinates of a language model enough can pass a top-0.5% cut to take a share of the mask that stage 2 cannot move.

File: ``posterior.safetensors``, the tensors and in its header their record (layout and its hash, backbone, counts,
settings), with ``posterior.json`` a readable copy of the record (see ``artifacts``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..artifacts import LAYOUT_HASH, Reader, save_paired
from ..models.lifted import Layout
from . import fused

FORMAT = "bayestune-posterior/2"
STATS = ("loss", "log_joint")
ESTIMATORS = ("draws", "rao-blackwell")
MOMENT = {"draws": "lambda", "rao-blackwell": "lambda_rb"}  # the moment that holds each estimator's λ̂


class StreamingPosterior:
    """Running moments of λ (and optionally θ − θ̄) for all coordinates; traces of ``n_tracked`` of them."""

    def __init__(self, layout: Layout, *, chains: int = 1, n_tracked: int = 256, track_delta_moments: bool = False,
                 estimator: str = "draws", flat_prior: tuple[float, float] | None = None, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if estimator not in ESTIMATORS:
            raise ValueError(f"lambda_estimator: unknown value {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
        self.layout, self.chains, self.estimator = layout, chains, estimator
        self.flat_prior = tuple(flat_prior) if flat_prior is not None else None
        self.touched: torch.Tensor | None = None  # bool (d,): coordinates the likelihood touched, once a chain says
        gen = torch.Generator().manual_seed(seed)
        k = min(n_tracked, layout.d)
        self.tracked_index = torch.randperm(layout.d, generator=gen)[:k].sort().values.to(device)
        self.counts = [0] * chains
        moments = ("lambda",) + (("lambda_rb",) if estimator == "rao-blackwell" else ()) \
            + (("delta",) if track_delta_moments else ())
        self.mean = {m: torch.zeros(chains, layout.d, device=device) for m in moments}
        self.m2 = {m: torch.zeros(chains, layout.d, device=device) for m in moments}
        self.traces: list[dict[str, list[torch.Tensor]]] = [
            {name: [] for name in ("lambda", "delta") + STATS} for _ in range(chains)
        ]
        self.meta: dict = {}

    @property
    def d(self) -> int:
        return self.layout.d

    @property
    def estimate(self) -> str:
        """The name of the moment that holds λ̂ (see ``estimator``)."""
        return MOMENT[self.estimator]

    @torch.no_grad()
    def update(self, chain: int, lam: torch.Tensor, delta: torch.Tensor, stats: dict[str, torch.Tensor],
               lam_rb: torch.Tensor | None = None) -> None:
        """Add one sample of chain ``chain`` to the moments and traces: λ and θ − θ̄ (flat, length d), statistics,
        and (``rao-blackwell``) E[λ | θ] of this sample."""
        if "lambda_rb" in self.mean and lam_rb is None:
            raise ValueError("posterior: the rao-blackwell estimator needs E[λ | θ] of every sample (lam_rb)")
        n = self.counts[chain] + 1
        for m, x in (("lambda", lam), ("lambda_rb", lam_rb), ("delta", delta)):
            if m in self.mean:
                mean, m2 = self.mean[m][chain], self.m2[m][chain]
                if fused.welford_(mean, m2, x, n=n):
                    continue
                step = x - mean
                mean.add_(step, alpha=1.0 / n)
                m2.addcmul_(step, x - mean)
        self.record(chain, lam, delta, stats)

    @torch.no_grad()
    def record(self, chain: int, lam: torch.Tensor, delta: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        """Append a sample of the tracked coordinates and its statistics (moments untouched)."""
        self.counts[chain] += 1
        trace = self.traces[chain]
        trace["lambda"].append(lam[self.tracked_index].clone())
        trace["delta"].append(delta[self.tracked_index].clone())
        for name in STATS:
            trace[name].append(stats[name].detach().reshape(()).clone())

    @torch.no_grad()
    def add_touched(self, touched: torch.Tensor) -> None:
        """Mark the coordinates a chain's likelihood gradient touched (bool, length d); chains are or-ed."""
        self.touched = touched.clone() if self.touched is None else self.touched | touched

    @torch.no_grad()
    def set_moments(self, chain: int, moment: str, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Moments known in closed form (e.g. from a variational guide), weighted as ``counts[chain]`` samples."""
        self.mean[moment][chain].copy_(mean)
        self.m2[moment][chain].copy_(var).mul_(max(self.counts[chain] - 1, 1))

    def state_dict(self) -> dict:
        state = {"counts": list(self.counts), "mean": self.mean, "m2": self.m2, "traces": self.traces}
        return state if self.touched is None else {**state, "touched": self.touched}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.counts = list(state["counts"])
        self.touched = state["touched"].clone() if "touched" in state else None
        for m in self.mean:
            self.mean[m].copy_(state["mean"][m])
            self.m2[m].copy_(state["m2"][m])
        device = self.tracked_index.device
        self.traces = [{name: [t.to(device) for t in values] for name, values in trace.items()}
                       for trace in state["traces"]]

    def pooled(self, moment: str = "lambda") -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) over all chains' samples for every coordinate; for λ's moments, the exact prior moments
        (α/β, α/β²) on coordinates the data never touched, where ``flat_prior`` and ``touched`` are known."""
        counts = torch.tensor(self.counts, dtype=self.mean[moment].dtype, device=self.mean[moment].device)
        if counts.sum() == 0:
            raise ValueError("posterior: no samples collected; the sampling phase must be at least `thin` steps")
        w = counts / counts.sum()
        mean = (w[:, None] * self.mean[moment]).sum(0)
        m2 = self.m2[moment].sum(0) + (counts[:, None] * (self.mean[moment] - mean) ** 2).sum(0)
        var = m2 / (counts.sum() - 1).clamp(min=1)
        if moment in MOMENT.values():
            return self._exact_where_untouched(mean), self._exact_where_untouched(var, power=2)
        return mean, var

    def chain_estimate(self, chain: int) -> torch.Tensor:
        """λ̂ of one chain alone (by ``estimator``, with the prior mean where the data never reached)."""
        return self._exact_where_untouched(self.mean[self.estimate][chain])

    def _exact_where_untouched(self, moment: torch.Tensor, power: int = 1) -> torch.Tensor:
        """``moment`` with α/β^power (the prior's mean, or with power 2 its variance) on untouched coordinates."""
        if self.flat_prior is None or self.touched is None:
            return moment
        alpha, beta = self.flat_prior
        return torch.where(self.touched, moment, alpha / beta**power)

    @property
    def untouched(self) -> int | None:
        """How many coordinates the data never touched (None: not recorded)."""
        return None if self.touched is None else int(self.d - self.touched.sum())

    @property
    def lambda_mean(self) -> torch.Tensor:
        """λ̂: the posterior mean of λ for every covered coordinate (pooled over chains), by ``estimator``."""
        return self.pooled(self.estimate)[0]

    def trace(self, name: str) -> torch.Tensor:
        """Traces as a (chain, draw, …) tensor, cut to the shortest chain."""
        draws = min(len(t[name]) for t in self.traces)
        return torch.stack([torch.stack(t[name][:draws]) if draws else torch.empty(0) for t in self.traces])

    def save(self, run_dir: str | os.PathLike, extra: dict | None = None) -> None:
        tensors = {"tracked_index": self.tracked_index}
        if self.touched is not None:
            tensors["touched"] = self.touched
        for m in self.mean:
            tensors[f"{m}_mean"], tensors[f"{m}_m2"] = self.mean[m], self.m2[m]
        for name in self.traces[0]:
            tensors[f"trace.{name}"] = self.trace(name)
        save_paired(Path(run_dir) / "posterior.safetensors", tensors,
                    {"chains": self.chains, "counts": self.counts, "d": self.d, "layout": self.layout.to_json(),
                     LAYOUT_HASH: self.layout.sha256, "estimator": self.estimator,
                     "flat_prior": list(self.flat_prior) if self.flat_prior is not None else None, **(extra or {})},
                    FORMAT)

    @classmethod
    def concatenate(cls, parts: list[StreamingPosterior]) -> StreamingPosterior:
        """One posterior whose chains are those of ``parts`` (same layout and tracked set), in order."""
        post = cls.__new__(cls)
        estimators = {p.estimator for p in parts}
        if len(estimators) > 1:
            raise ValueError(f"runs: the chains use different λ estimators ({', '.join(sorted(estimators))})")
        post.layout, post.tracked_index, post.meta = parts[0].layout, parts[0].tracked_index, {}
        post.estimator = parts[0].estimator
        priors = {p.flat_prior for p in parts}
        if len(priors) > 1:
            raise ValueError("runs: the chains' posteriors have different flat_prior (alpha, beta)")
        post.flat_prior = priors.pop()
        touched = [p.touched for p in parts]
        post.touched = None if any(t is None for t in touched) else torch.stack(touched).any(0)
        post.chains = sum(p.chains for p in parts)
        post.counts = [n for p in parts for n in p.counts]
        post.mean = {m: torch.cat([p.mean[m] for p in parts]) for m in parts[0].mean if all(m in p.mean for p in parts)}
        post.m2 = {m: torch.cat([p.m2[m] for p in parts]) for m in post.mean}
        post.traces = [t for p in parts for t in p.traces]
        return post

    @classmethod
    def load(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu", *,
             backbone: str | None = None) -> StreamingPosterior:
        """The posterior of ``run_dir``, every field and tensor shape checked, and sampled on ``backbone`` if given
        (the run's); a one-line ValueError naming the file and the field otherwise."""
        tensor_file = Reader("posterior", Path(run_dir) / "posterior.safetensors")
        record_file, meta, tensors = tensor_file.paired(FORMAT)
        layout = record_file.layout(meta)
        chains = record_file.count(meta, "chains")
        counts = record_file.items(meta, "counts", (int,), chains)
        if chains < 1 or min(counts) < 0:
            raise record_file.error(f"has chains={chains} and counts={str(counts)[:40]}; need chains >= 1 and "
                                    "one sample count >= 0 per chain")
        estimator = record_file.value(meta, "estimator", (str,), "draws")  # runs before the estimator was recorded
        if estimator not in ESTIMATORS:
            raise record_file.error(f"has estimator={estimator!r}, not one of: {', '.join(ESTIMATORS)}")
        if backbone is not None and record_file.value(meta, "backbone", (str, None), None) is not None:
            record_file.agree("backbone", meta["backbone"], backbone, "the run's config.yaml")
        tracked = tensor_file.index(tensors, "tracked_index", layout.d)
        moments = dict.fromkeys(["lambda", MOMENT[estimator]] + [m for m in ("delta",) if f"{m}_mean" in tensors])
        draws = min(counts)
        traces = ("lambda", "delta") + STATS
        if not record_file.sealed:  # files of earlier versions may lack a trace
            traces = tuple(n for n in traces if f"trace.{n}" in tensors)
        tensor_file.only(tensors, {"tracked_index", "touched", *(f"{m}_{s}" for m in moments for s in ("mean", "m2")),
                                   *(f"trace.{n}" for n in traces)})
        flat_prior = record_file.value(meta, "flat_prior", (list, None), None)
        if flat_prior is not None and (len(flat_prior) != 2 or not all(_positive(v) for v in flat_prior)):
            raise record_file.error(f"has flat_prior={str(flat_prior)[:40]}, not null or [alpha, beta] > 0")
        post = cls.__new__(cls)
        post.layout, post.chains, post.counts, post.estimator = layout, chains, counts, estimator
        post.flat_prior = tuple(float(v) for v in flat_prior) if flat_prior is not None else None
        post.touched = tensor_file.tensor(tensors, "touched", (torch.bool,), (layout.d,)).to(device) \
            if "touched" in tensors else None
        post.tracked_index = tracked.to(device)
        post.mean = {m: tensor_file.tensor(tensors, f"{m}_mean", "float", (chains, layout.d)).to(device)
                     for m in moments}
        post.m2 = {m: tensor_file.tensor(tensors, f"{m}_m2", "float", (chains, layout.d)).to(device) for m in moments}
        shapes = {n: (chains, draws, tracked.numel()) if draws and n in ("lambda", "delta") else (chains, draws)
                  for n in traces}
        stacked = {n: tensor_file.tensor(tensors, f"trace.{n}", "float", shapes[n]).to(device) for n in traces}
        post.traces = [{n: list(stacked[n][c].unbind(0)) for n in traces} for c in range(chains)]
        post.meta = meta
        return post


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
