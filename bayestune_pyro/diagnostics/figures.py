"""Figures of a run, as matplotlib ``Figure`` objects (no pyplot state; ``to_png`` renders them with Agg).

- ``lambda_curve``: sorted posterior means λ̂ against the sparsity level p, log-log, with p, λ_th and the knee;
- ``lambda_curves_by_group``: the same within each module type (additive kinds included) and each layer;
- ``trace_plot`` / ``rank_plot``: ArviZ trace and rank plots of log λ at a few tracked coordinates;
- ``diagnostic_histograms``: R-hat, bulk and tail ESS of all tracked coordinates against their thresholds;
- ``mask_shares``: the share of each module type's and each layer's parameters in the mask (the paper's Figs. 6–38);
- ``sweep_plot``: validation and test metric against the budget p, from ``sweep.json`` (``bayestune sweep``);
- ``reliability_diagram``: stage 2's test accuracy against confidence per bin, from ``metrics.json``.
"""
from __future__ import annotations

import io

import arviz as az
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..selection.uncertainty import Curve, Knee
from .convergence import ESS_MIN, RHAT_MAX, by_module, quiet_arviz
from .inference_data import lambda_variable


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def lambda_curve(curve: Curve, p: float | None = None, threshold: float | None = None,
                 knee: Knee | None = None) -> Figure:
    """λ̂ sorted in descending order against p = rank/d, with the mask's p and λ_th and the knee marked."""
    fig = new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    keep = curve.values > 0
    ax.loglog(curve.p[keep], curve.values[keep], color="black", lw=1.5, label="sorted λ̂")
    if p:
        ax.axvline(p, color="tab:blue", ls="--", label=f"mask p = {p:.3g}")
    if threshold:
        ax.axhline(threshold, color="tab:green", ls=":", label=f"λ_th = {threshold:.3g}")
    if knee is not None:
        ax.plot(knee.p, knee.threshold, "o", color="tab:red", ms=8,
                label=f"knee: p = {knee.p:.3g}, λ̂ = {knee.threshold:.3g}")
    ax.set(title="Sorted posterior means λ̂ (the mask keeps the left of the p line)",
           xlabel="sparsity level p (share of coordinates with λ̂ at least this large)",
           ylabel="posterior mean scale λ̂")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left")
    return fig


def lambda_curves_by_group(by_type: dict[str, Curve], by_layer: dict[str, Curve],
                           threshold: float | None = None) -> Figure:
    """Sorted λ̂ within each module type (left) and each layer (right), against the share of the group's
    coordinates: where the posterior puts its scale, and so its budget."""
    fig = new_figure(11, 4.2)
    for ax, (title, curves) in zip(fig.subplots(1, 2), (("module type", by_type), ("layer", by_layer))):
        colors = _palette(len(curves))
        for color, (name, curve) in zip(colors, curves.items()):
            keep = curve.values > 0
            ax.loglog(curve.p[keep], curve.values[keep], color=color, lw=1.3, label=f"{name} ({curve.d:,})")
        if threshold:
            ax.axhline(threshold, color="black", ls=":", lw=1, label=f"λ_th = {threshold:.3g}")
        ax.set(title=f"Sorted λ̂ per {title}", xlabel="share of the group's coordinates", ylabel="λ̂")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1, loc="lower left")
    return fig


def _palette(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def trace_plot(idata: az.InferenceData, coordinates: list[str]) -> Figure:
    """Trace plots (density and draws per chain) of log λ (or log E[λ | θ], whichever λ̂ averages) at
    ``coordinates`` and of the per-draw loss."""
    name = "log_" + lambda_variable(idata)
    data = xr.merge([idata.posterior[[name]].sel(coordinate=coordinates), idata.sample_stats[["loss"]]])
    fig = new_figure(11, 1.9 * (len(coordinates) + 1))
    axes = np.array(fig.subplots(len(coordinates) + 1, 2)).reshape(-1, 2)
    with quiet_arviz():
        az.plot_trace(data, axes=axes, compact=False, legend=False)
    for ax in axes.ravel():
        ax.title.set_fontsize(8)
    axes[-1, 0].set_xlabel("value")
    axes[-1, 1].set_xlabel("draw")
    what = "log E[λ | θ]" if name == "log_lambda_rb" else "log λ"
    fig.suptitle(f"Traces: {what} at the worst-mixing tracked coordinates, and the minibatch loss (one colour per "
                 "chain)")
    return fig


def rank_plot(idata: az.InferenceData, coordinates: list[str]) -> Figure:
    """Rank plots of log λ (or log E[λ | θ]) at ``coordinates``: near-uniform histograms for every chain mean the
    chains agree."""
    fig = new_figure(11, 2.6)
    axes = np.array(fig.subplots(1, len(coordinates))).reshape(-1)
    with quiet_arviz():
        az.plot_rank(idata, var_names=["log_" + lambda_variable(idata)], coords={"coordinate": coordinates}, ax=axes)
    for ax in axes:
        ax.title.set_fontsize(7)
        ax.xaxis.label.set_fontsize(9)
        ax.yaxis.label.set_fontsize(9)
    fig.suptitle("Rank plots of the draws λ̂ averages (uniform bars in every chain = good mixing)")
    return fig


def diagnostic_histograms(summary: pd.DataFrame) -> Figure:
    """Histograms of R-hat and of bulk and tail ESS over the tracked coordinates, thresholds marked."""
    fig = new_figure(11, 3.0)
    axes = fig.subplots(1, 3)
    rhat = summary["r_hat"].dropna()
    if len(rhat):
        axes[0].hist(rhat, bins=30, color="tab:gray")
        axes[0].axvline(RHAT_MAX, color="tab:red", ls="--", label=f"{RHAT_MAX}")
        axes[0].legend()
    else:
        axes[0].text(0.5, 0.5, "not computable\nwith 1 chain", ha="center", va="center", transform=axes[0].transAxes)
    axes[0].set(title="R-hat (rank-normalised, split)", xlabel="R-hat", ylabel="tracked values")
    for ax, column, title in ((axes[1], "ess_bulk", "bulk ESS"), (axes[2], "ess_tail", "tail ESS")):
        ax.hist(summary[column].dropna(), bins=30, color="tab:gray")
        ax.axvline(ESS_MIN, color="tab:red", ls="--", label=f"{ESS_MIN}")
        ax.set(title=title, xlabel="effective sample size", ylabel="tracked values")
        ax.legend()
    return fig


def mask_shares(tensors: xr.Dataset) -> Figure:
    """Bars: the percentage of each module type's and each layer's parameters that the mask updates."""
    fig = new_figure(11, 3.6)
    left, right = fig.subplots(1, 2)
    modules = by_module(tensors)
    _bars(left, modules.module.values, modules)
    left.set(title="Updated parameters by module type", ylabel="% of the module type's parameters")
    left.tick_params(axis="x", labelrotation=30)
    layers = tensors[["numel", "in_mask"]].where(tensors.layer >= 0, drop=True)
    if layers.sizes["tensor"]:
        by_layer = layers.groupby("layer").sum()
        _bars(right, [str(int(i)) for i in by_layer.layer.values], by_layer)
        right.set(title="Updated parameters by layer (blocks only)", xlabel="layer index",
                  ylabel="% of the layer's parameters")
    else:
        right.set_axis_off()
    return fig


def _bars(ax, labels, group: xr.Dataset) -> None:
    share = 100 * group["in_mask"].values / group["numel"].values
    bars = ax.bar(labels, share, color="tab:blue")
    ax.bar_label(bars, labels=[f"{int(k):,}" for k in group["in_mask"].values], fontsize=7)
    ax.margins(y=0.15)


def sweep_plot(sweep: dict) -> Figure:
    """Validation and test metric against p (log axis) from ``sweep.json``, the chosen p marked."""
    rows = sorted(sweep["rows"], key=lambda r: r["p"])
    fig = new_figure(6.5, 3.6)
    ax = fig.add_subplot()
    ps = [r["p"] for r in rows]
    ax.semilogx(ps, [r["validation"] for r in rows], "o-", color="tab:blue", label="validation (chooses p)")
    ax.semilogx(ps, [r["test"] for r in rows], "s--", color="tab:orange", label="test")
    ax.axvline(sweep["chosen"], color="0.4", lw=1, ls=":", label=f"chosen p = {sweep['chosen']:g}")
    ax.set(title="Stage-2 metric against the budget p", xlabel="p (share of covered coordinates fine-tuned)",
           ylabel=rows[0]["metric"])
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    return fig


def reliability_diagram(table: dict, ece: float, what: str = "point estimate") -> Figure:
    """Accuracy against mean top-1 confidence in each equal-width confidence bin (bars; the gap to the diagonal
    shaded), with the bin counts below: a calibrated model's bars reach the diagonal."""
    bins, count = table["bins"], np.array(table["count"])
    edges = np.linspace(0, 1, bins + 1)
    left, width = edges[:-1], 1 / bins
    filled = count > 0
    accuracy = np.array([a if a is not None else 0.0 for a in table["accuracy"]])
    confidence = np.array([c if c is not None else 0.0 for c in table["confidence"]])
    fig = new_figure(6.5, 6.2)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(left[filled], accuracy[filled], width=width, align="edge", color="tab:blue", edgecolor="white",
            label="accuracy in the bin")
    gap_low = np.minimum(accuracy, confidence)[filled]
    top.bar(left[filled], np.abs(confidence - accuracy)[filled], bottom=gap_low, width=width, align="edge",
            color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", label="gap to the mean confidence")
    top.plot(confidence[filled], accuracy[filled], "o", color="black", ms=4, label="(mean confidence, accuracy)")
    top.plot([0, 1], [0, 1], "--", color="0.3", lw=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy (share of top-1 predictions correct)",
            title=f"Reliability diagram, {what}\ntest split ({bins} bins): ECE = {ece:.4f}")
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", fontsize=8, frameon=False)
    bottom.bar(left, count, width=width, align="edge", color="0.55", edgecolor="white")
    for x, k in zip(left + width / 2, count):
        if k:
            bottom.text(x, k, f"{k:,}", ha="center", va="bottom", fontsize=7)
    bottom.set(xlabel="confidence (top-1 softmax probability)", ylabel="examples", ylim=(0, count.max() * 1.25))
    bottom.set_xticks(edges[::3])
    return fig
