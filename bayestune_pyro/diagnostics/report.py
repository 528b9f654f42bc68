"""``bayestune diagnose RUN``: write ``trace.nc`` and ``report.html``, one page that says whether to trust the run.

Top to bottom: a verdict box (mixing, mask stability across chains, the mask's boundary, stage 2), what to do
about each warning, the run, convergence tables and figures, the selection (λ̂ curve, k, p, λ_th, knee, inclusion
probabilities, counts per module and layer), the posterior variance per tensor, stage-2 metrics (with the test
split's reliability diagram for a classification task) and the full configuration. Figures are embedded as
base64 PNG and the CSS is inline: the file needs nothing else.

Mask stability is the mean Jaccard overlap of the chains' top-p sets: ≥ 0.8 ok, ≥ 0.5 caution, below that fail.
"""
from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..artifacts import Reader
from ..config import RunConfig
from ..inference.posterior import StreamingPosterior
from ..io import atomic_path
from ..registry import ENGINES
from ..selection.masks import Mask
from ..selection.uncertainty import Curve, inclusion_from_draws, inclusion_probability, select
from . import figures
from .convergence import Convergence, assess, by_module, chain_agreement, tensor_summary
from .inference_data import lambda_variable, save_trace, to_inference_data
from .modules import layer_index, module_type

REPORT_FILE = "report.html"
AGREEMENT_OK, AGREEMENT_CAUTION = 0.8, 0.5
STATUS_ORDER = ("ok", "caution", "fail")
CONCLUSIONS = {"ok": "the diagnostics raise no concern",
               "caution": "usable with care; some checks could not be made or are weak",
               "fail": "do not trust the mask yet; see What to do"}
BADGES = {"ok": "OK", "caution": "CHECK", "fail": "FAIL", None: "INFO"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;background:#f6f7f9;margin:0}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6em;margin:0 0 2px}
h2{font-size:1.2em;margin:28px 0 10px;border-bottom:1px solid #d0d4da;padding-bottom:4px}
.sub{color:#5b6270;margin:0 0 18px}
.verdict{border-radius:8px;padding:14px 18px;border:2px solid}
.verdict h2{border:none;margin:0 0 6px;padding:0}.verdict ul{margin:0;padding-left:0;list-style:none}
.verdict li{margin:7px 0}
.ok{background:#eaf7ee;border-color:#2e8b57}.caution{background:#fff6e0;border-color:#d89b00}
.fail{background:#fdecec;border-color:#c0392b}
.badge{display:inline-block;min-width:44px;text-align:center;font-size:.75em;font-weight:700;color:#fff;
border-radius:4px;padding:1px 6px;margin-right:6px}
.badge.ok{background:#2e8b57}.badge.caution{background:#d89b00}.badge.fail{background:#c0392b}
.badge.info{background:#8a919c}
.grid{display:grid;grid-template-columns:repeat(3,1fr);gap:2px 18px;font-size:.9em}
.grid div{border-bottom:1px solid #e3e6ea;padding:3px 0;display:flex;justify-content:space-between}
.grid span{color:#5b6270;margin-right:8px}
.todo li{margin:4px 0}
table{border-collapse:collapse;margin:8px 0;font-size:.9em;background:#fff}
th,td{border:1px solid #d0d4da;padding:4px 8px;text-align:right}th{background:#eef0f3}
td:first-child,th:first-child{text-align:left}
.facts td:first-child{color:#5b6270}
img{max-width:100%;background:#fff;border:1px solid #d0d4da;margin:8px 0}
.row{display:flex;flex-wrap:wrap;gap:0 1%}.row img{max-width:49%}
.note{color:#5b6270;font-size:.9em}
details summary{cursor:pointer;color:#1f5fa8}
"""


def load_run(run_dir: str | os.PathLike) -> tuple[StreamingPosterior, RunConfig]:
    """The posterior and configuration of a run directory; a one-line ValueError if it is not one.

    For a grid run the configuration is the chosen point's (``metrics.json`` names it).
    """
    run_dir = Path(run_dir)
    missing = [f for f in ("config.yaml", "posterior.json", "posterior.safetensors") if not (run_dir / f).is_file()]
    if missing:
        raise ValueError(f"run: {str(run_dir)!r} has no {missing[0]} (not a run directory with a stage-1 posterior)")
    config = RunConfig.from_yaml(run_dir / "config.yaml", strict=False)
    if len(config.grid()) > 1:
        reader = Reader("metrics", run_dir / "metrics.json")
        config = config.replace(**reader.value(reader.record(), "chosen", (dict,)))
    return StreamingPosterior.load(run_dir, backbone=config.backbone), config


def diagnose(run_dir: str | os.PathLike) -> dict:
    """Write ``RUN/trace.nc`` and ``RUN/report.html``; return their paths and the verdict."""
    run_dir = Path(run_dir)
    posterior, config = load_run(run_dir)
    inputs = _inputs(run_dir, posterior, config)  # every file the report reads, checked before anything is written
    idata = to_inference_data(posterior, config)
    trace_path = save_trace(idata, run_dir)
    convergence = assess(idata)
    page = _page(run_dir, posterior, config, idata, convergence, *inputs)
    with atomic_path(run_dir / REPORT_FILE) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return {"report": str(run_dir / REPORT_FILE), "trace": str(trace_path), "status": convergence.status,
            "verdict": convergence.verdict, "warnings": convergence.warnings}


def _inputs(run_dir: Path, posterior: StreamingPosterior, config: RunConfig) -> tuple:
    """(mask, where it came from, metrics or None, sweep or None): the run's files besides the posterior."""
    if (run_dir / "mask.json").is_file():
        mask, mask_source = Mask.load(run_dir, layout=posterior.layout, backbone=config.backbone), "mask.json"
    else:
        mask, mask_source = select(posterior, config.budget_p(), config.threshold), "config.yaml (not exported yet)"
    metrics = _metrics(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else None
    sweep = _sweep(run_dir / "sweep.json") if (run_dir / "sweep.json").is_file() else None
    return mask, mask_source, metrics, sweep


def _page(run_dir: Path, posterior: StreamingPosterior, config: RunConfig, idata, convergence: Convergence,
          mask: Mask, mask_source: str, metrics: dict | None, sweep: dict | None) -> str:
    mean, var = posterior.pooled(posterior.estimate)
    lambda_th = mask.threshold if mask.threshold is not None else (float(mean[mask.index].min()) if mask.k else None)
    curve = Curve.of(mean)
    try:
        knee = curve.knee()
    except ValueError:
        knee = None
    agreement = chain_agreement(posterior, mask.p) if posterior.chains > 1 and mask.k else None
    tensors = tensor_summary(posterior, mask)

    verdict = [("Mixing", convergence.status, convergence.verdict), _stability(agreement)]
    selection_rows = {"source": mask_source, "selection": mask.info.get("selection", "p" if mask.threshold is None
                                                                          else "threshold"),
                      "rank": mask.info.get("rank", "mean"), "k (coordinates fine-tuned)": mask.k,
                      "d (coordinates)": mask.layout.d, "p = k/d": mask.p, "λ_th": lambda_th}
    if knee is not None:
        selection_rows["knee of the λ̂ curve"] = f"p = {knee.p:.3g}, λ̂ = {knee.threshold:.3g} (k = {knee.k:,})"
    inclusion_html = ""
    if lambda_th:
        line, facts = _inclusion(posterior, idata, mean, var, mask, lambda_th)
        verdict.append(line)
        inclusion_html = _facts(facts)
    verdict.append(_stage2(metrics, mask))
    overall = max((s for _, s, _ in verdict if s), key=STATUS_ORDER.index)

    worst = convergence.worst(4)
    parts = [
        f"<h1>BayesTune posterior diagnostics</h1><p class='sub'>{html.escape(str(run_dir))} · task "
        f"{html.escape(config.task)} · backbone {html.escape(config.backbone)} · inference "
        f"{html.escape(config.inference)} · {posterior.chains} chain(s) × {convergence.draws} draws</p>",
        f"<section class='verdict {overall}'><h2>Verdict: {CONCLUSIONS[overall]}</h2><ul>"
        + "".join(f"<li><span class='badge {s or 'info'}'>{BADGES[s]}</span><b>{html.escape(k)}:</b> "
                  f"{html.escape(v)}</li>" for k, s, v in verdict)
        + "</ul></section>",
    ]
    if convergence.warnings:
        parts.append("<h2>What to do</h2><ul class='todo'>"
                     + "".join(f"<li>{html.escape(w)}</li>" for w in convergence.warnings) + "</ul>")
    parts.append("<h2>Run</h2>" + _facts({
        "covered coordinates d": posterior.d, "tracked coordinates K": int(posterior.tracked_index.numel()),
        "chains": posterior.chains, "draws per chain": ", ".join(map(str, posterior.counts)),
        "stage-1 seconds": posterior.meta.get("seconds"), "N̂": config.n_hat, "α, β": f"{config.alpha}, {config.beta}",
        "lr (θ), lr (log λ)": f"{config.lr}, {config.lr_lambda}",
        "engine": f"{config.inference} ({ENGINES.get(config.inference).kind})",
        "coordinates the data never touched": _untouched(posterior),
        "engine options": ", ".join(f"{k}={v}" for k, v in config.engine_options.to_dict().items())
        if config.engine_options is not None else "none",
        "steps: warm-up / burn-in / sampling, thin":
            f"{config.warmup} / {config.burnin} / {config.steps - config.warmup - config.burnin}, {config.thin}"}))
    parts.append("<h2>Convergence of the tracked coordinates</h2>"
                 "<p class='note'>ArviZ on the K tracked coordinates of λ and θ − θ̄ (rank-normalised split R-hat, "
                 "bulk/tail ESS, MCSE). The same numbers are in <code>trace.nc</code> "
                 "(<code>az.summary(az.from_netcdf(...))</code>).</p>"
                 + _table(convergence.overview())
                 + _figure(figures.diagnostic_histograms(convergence.summary))
                 + _figure(figures.trace_plot(idata, worst)))
    if posterior.chains > 1:
        parts.append(_figure(figures.rank_plot(idata, worst)))
    else:
        parts.append("<p class='note'>Rank plots need at least 2 chains.</p>")
    worst_rows = convergence.summary.sort_values("r_hat" if posterior.chains > 1 else "ess_bulk",
                                                 ascending=posterior.chains == 1).head(10)
    parts.append("<details><summary>The 10 worst tracked values</summary>"
                 + _table(worst_rows[["mean", "sd", "mcse_mean", "ess_bulk", "ess_tail", "r_hat"]]) + "</details>")
    parts.append("<h2>Selection</h2>" + _facts(selection_rows)
                 + _figure(figures.lambda_curve(curve, mask.p, lambda_th, knee))
                 + _figure(figures.lambda_curves_by_group(*group_curves(posterior.layout, mean), lambda_th)))
    if inclusion_html:
        parts.append("<p class='note'>P(λ_i > λ_th): the posterior probability that a coordinate's scale exceeds "
                     "λ_th, from a log-normal matched to the streaming mean and variance of λ_i (checked against "
                     "the draws of the tracked coordinates).</p>" + inclusion_html)
    if agreement is not None:
        parts.append("<p class='note'>Jaccard overlap of the top-p sets picked by each chain's own λ̂:</p>"
                     + _table(pd.DataFrame(agreement, index=[f"chain {c}" for c in range(posterior.chains)],
                                           columns=[f"chain {c}" for c in range(posterior.chains)])))
    modules = by_module(tensors).to_dataframe()
    modules["% updated"] = 100 * modules["in_mask"] / modules["numel"]
    parts.append(_table(modules.rename(columns={"numel": "parameters", "in_mask": "in mask"}))
                 + _figure(figures.mask_shares(tensors)))
    parts.append("<h2>Posterior variance of λ per tensor</h2><p class='note'>From the streaming moments of all d "
                 "coordinates (pooled over chains).</p><details><summary>Table (one row per parameter tensor)</summary>"
                 + _table(tensors.to_dataframe()) + "</details>")
    if sweep is not None:
        rows = pd.DataFrame(sweep["rows"]).set_index("p")[["k", "validation", "test"]]
        parts.append(f"<h2>Budget sweep</h2><p class='note'>Stage 2 at each p (<code>bayestune sweep</code>); p = "
                     f"{sweep['chosen']:g} scores best on the validation split.</p>" + _table(rows)
                     + _figure(figures.sweep_plot(sweep)))
    parts.append("<h2>Stage 2</h2>" + (_stage2_section(metrics) if metrics else
                                       "<p>Not run yet (no metrics.json).</p>"))
    parts.append("<h2>Configuration</h2>" + _grid(config.to_dict()))
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>BayesTune diagnostics: "
            f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body><main>"
            + "".join(parts) + "</main></body></html>\n")


def group_curves(layout, mean) -> tuple[dict[str, Curve], dict[str, Curve]]:
    """Sorted-λ̂ curves of every module type and every layer (``outside`` the blocks: embeddings, pooler, …)."""
    by_type, by_layer = {}, {}
    for name, values in layout.split(mean).items():
        by_type.setdefault(module_type(name), []).append(values.reshape(-1))
        layer = layer_index(name)
        by_layer.setdefault(layer, []).append(values.reshape(-1))
    types = {k: Curve.of(torch.cat(v)) for k, v in by_type.items()}
    layers = {("outside" if k < 0 else f"layer {k}"): Curve.of(torch.cat(v)) for k, v in sorted(by_layer.items())}
    return types, layers


def _inclusion(posterior: StreamingPosterior, idata, mean, var, mask: Mask, lambda_th: float) -> tuple[tuple, dict]:
    """The verdict line and the facts about P(λ_i > λ_th) inside and outside the mask; the log-normal approximation
    is checked on the tracked draws of the quantity λ̂ averages (λ, or E[λ | θ])."""
    prob = inclusion_probability(mean, var, lambda_th)
    inside = prob[mask.index]
    outside = float(prob.sum() - inside.sum())
    tracked = inclusion_from_draws(torch.from_numpy(idata.posterior[lambda_variable(idata)].values), lambda_th)
    approx = prob[posterior.tracked_index].double()
    line = ("Mask boundary", None, f"median P(λ_i > λ_th) inside the mask {float(inside.median()):.2f}; about "
                                   f"{outside:,.0f} coordinates outside it exceed λ_th too "
                                   f"({outside / max(mask.k, 1):.2g} × k)")
    return line, {
        "mean P(λ_i > λ_th) inside the mask": float(inside.mean()),
        "share of the mask with P ≥ 0.9": float((inside >= 0.9).double().mean()),
        "expected count above λ_th outside the mask (Σ P)": outside,
        "log-normal vs draws at the tracked coordinates: mean |ΔP|": float((approx - tracked).abs().mean()),
    }


def _stability(agreement: np.ndarray | None) -> tuple[str, str, str]:
    if agreement is None:
        return "Mask stability", "caution", "not assessable with 1 chain (run with --chains 2 to compare masks)"
    c = len(agreement)
    mean = float((agreement.sum() - c) / (c * (c - 1)))
    status = "ok" if mean >= AGREEMENT_OK else "caution" if mean >= AGREEMENT_CAUTION else "fail"
    return "Mask stability", status, f"mean Jaccard overlap of the chains' top-p sets {mean:.2f}"


def _untouched(posterior: StreamingPosterior) -> str:
    n = posterior.untouched
    if n is None:
        return "not recorded"
    where = ("their λ̂ is the prior mean α/β, exactly" if posterior.flat_prior is not None
             else "a point estimate keeps its own λ̂ there")
    return f"{n:,} ({n / posterior.d:.1%} of d): {where}"


def _metrics(path: Path) -> dict:
    """metrics.json with the fields the report reads checked (a one-line ValueError naming the file otherwise)."""
    reader = Reader("metrics", path)
    metrics = reader.record()
    name = reader.value(metrics, "metric", (str,))
    reader.value(metrics, f"test_{name}", (float, None))
    for key in ("n_test", "n_updated", "n_total"):
        reader.count(metrics, key)
    ensembles = reader.value(metrics, "ensembles", (dict,), {})
    for scored in (metrics, *ensembles.values()):
        if not isinstance(scored, dict):
            raise reader.error(f"has an ensemble {str(scored)[:40]}, not an object")
        table = reader.value(scored, "reliability", (dict, None), None)
        if table is not None:
            reader.value(reader.value(scored, "test", (dict,)), "ece", (float,))
            bins = reader.count(table, "bins")
            for key, kinds in (("count", (int,)), ("accuracy", (float, None)), ("confidence", (float, None))):
                reader.items(table, key, kinds, bins)
            if bins < 1:
                raise reader.error("has a reliability table of 0 bins")
    return metrics


def _sweep(path: Path) -> dict:
    """sweep.json with the fields the report reads checked."""
    reader = Reader("sweep", path)
    sweep = reader.record()
    reader.value(sweep, "chosen", (float,))
    for row in reader.value(sweep, "rows", (list,)):
        if not isinstance(row, dict):
            raise reader.error(f"has a row {str(row)[:40]}, not an object")
        for key, kinds in (("p", (float,)), ("k", (int,)), ("validation", (float, None)), ("test", (float, None))):
            reader.value(row, key, kinds)
    return sweep


def _stage2(metrics: dict | None, mask: Mask) -> tuple[str, str | None, str]:
    if not metrics:
        return "Stage 2", None, "not run yet"
    name = metrics["metric"]
    stale = " (with an earlier mask: rerun stage 2)" if metrics["n_updated"] != mask.k else ""
    return "Stage 2", None, (f"test {name} {metrics['test_' + name]:.4f} on {metrics['n_test']:,} examples; "
                             f"{metrics['n_updated']:,} of {metrics['n_total']:,} coordinates updated{stale}")


def _grid_points(grid: list[dict]) -> str:
    """An ensemble's grid in one line: each (γ, prior scale) with its validation NLL (regression: validation scores)."""
    def scores(validation: dict) -> str:
        if "nll" in validation:
            return f"NLL {validation['nll']:.4g}"
        return ", ".join(f"{k} {v:.4g}" for k, v in validation.items())
    return "; ".join(f"γ {p['gamma']:g}, prior × {p.get('prior_scale', 1.0):g}: {scores(p['validation'])}"
                     for p in grid)


def _ensemble_title(kind: str, ensemble: dict) -> str:
    gamma = f" (γ = {ensemble['gamma']:g}, prior × {ensemble.get('prior_scale', 1.0):g})" if "gamma" in ensemble else ""
    return f"{kind} ensemble of {ensemble['size']}{gamma}"


def _stage2_section(metrics: dict) -> str:
    """Every metric, and the reliability diagram from the test split's bins (classification tasks)."""
    table, ensembles = metrics.get("reliability"), metrics.get("ensembles", {})
    shown = {k: v for k, v in metrics.items() if k not in ("reliability", "ensembles")}
    shown |= {f"ensembles.{kind}": {k: _grid_points(v) if k == "grid" else v for k, v in e.items()
                                    if k != "reliability"} for kind, e in ensembles.items()}
    facts = _grid(_flat(shown))
    if table is None:
        return facts
    diagrams = [figures.reliability_diagram(table, metrics["test"]["ece"])]
    diagrams += [figures.reliability_diagram(e["reliability"], e["test"]["ece"], _ensemble_title(kind, e))
                 for kind, e in ensembles.items() if e.get("reliability") is not None]
    return (facts + "<p class='note'>Calibration on the test split: the top-1 confidence (the largest softmax "
            "probability) against how often the top-1 prediction is right, per equal-width confidence bin. Bars "
            "below the diagonal: overconfident; above: underconfident. ECE is the count-weighted mean gap; NLL and "
            "Brier score are above (test.nll, test.brier; temperature.*: the point estimate with its temperature "
            "fitted on validation; ensembles.*: each ensemble's mean predictive).</p>"
            + "<div class='row'>" + "".join(_figure(f) for f in diagrams) + "</div>")


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _facts(rows: dict) -> str:
    return ("<table class='facts'>" + "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                                            for k, v in rows.items()) + "</table>")


def _grid(rows: dict) -> str:
    return ("<div class='grid'>" + "".join(f"<div><span>{html.escape(str(k))}</span>{html.escape(_fmt(v))}</div>"
                                          for k, v in rows.items()) + "</div>")


def _table(frame: pd.DataFrame) -> str:
    return frame.map(_fmt).to_html(border=0, index_names=False)


def _figure(fig) -> str:
    data = base64.b64encode(figures.to_png(fig)).decode("ascii")
    alt = html.escape((fig.get_suptitle() or fig.axes[0].get_title()).replace("\n", ", "))
    return f"<img alt='{alt}' src='data:image/png;base64,{data}'>"
