"""Can the run be trusted? Convergence of the tracked coordinates, posterior variance of all of them, chain agreement.

- Tracked coordinates (λ and θ − θ̄): ArviZ's rank-normalised split R-hat, bulk and tail ESS and MCSE
  (Vehtari et al. 2021). The checks are on the draws λ̂ averages, which alone decide the mask: the λ draws, or
  E[λ | θ] with the Rao-Blackwellised estimator. R-hat ≤ 1.01 and ESS ≥ 100 on at least 95% of the tracked
  coordinates (the K coordinates are a random sample, and a few cross a threshold by chance).
- All d coordinates: the pooled streaming variance of λ summarised per parameter tensor.
- Chain agreement: the Jaccard overlap of the top-p sets that each chain's own λ̂ would pick.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import arviz as az
import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..inference.posterior import StreamingPosterior
from ..selection.masks import Mask, top_p
from .inference_data import lambda_variable
from .modules import MODULE_TYPES, OTHER, layer_index, module_type

RHAT_MAX = 1.01
ESS_MIN = 100
DRAWS_MIN = 100
PASS_SHARE = 0.95


@contextmanager
def quiet_arviz():
    """Silence ArviZ's shape-validation log lines (1 chain, few draws): :func:`assess` states these cases itself."""
    log = az._log  # ArviZ logs through its own Logger instance, which logging.getLogger("arviz") does not return
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@dataclass
class Convergence:
    """``az.summary`` of the tracked λ and θ − θ̄, shares that pass each check, warnings and a one-line verdict.

    ``variable`` is the one the checks judge: ``lambda`` or ``lambda_rb`` (see :func:`lambda_variable`).
    """

    summary: pd.DataFrame
    chains: int
    draws: int
    shares: dict[str, float]
    warnings: list[str]
    status: str  # "ok", "caution" or "fail"
    verdict: str
    variable: str = "lambda"

    def overview(self) -> pd.DataFrame:
        """One row per variable: R-hat and ESS medians and extremes, the share passing, median MCSE/sd."""
        s = self.summary.assign(variable=self.summary.index.str.split("[").str[0],
                                mcse_sd_ratio=self.summary["mcse_mean"] / self.summary["sd"])
        rows = {}
        for name, g in s.groupby("variable", sort=False):
            rows[name] = {"R-hat median": g["r_hat"].median(), "R-hat max": g["r_hat"].max(),
                          f"R-hat ≤ {RHAT_MAX}": (g["r_hat"] <= RHAT_MAX).mean() if self.chains > 1 else np.nan,
                          "bulk ESS median": g["ess_bulk"].median(), "bulk ESS min": g["ess_bulk"].min(),
                          "tail ESS min": g["ess_tail"].min(), "MCSE/sd median": g["mcse_sd_ratio"].median()}
        return pd.DataFrame.from_dict(rows, orient="index")

    def worst(self, n: int = 4) -> list[str]:
        """Labels of the n tracked coordinates whose λ mixes worst: highest R-hat, or lowest bulk ESS (1 chain)."""
        lam = variable_rows(self.summary, self.variable)
        badness = lam["r_hat"] if self.chains > 1 else -lam["ess_bulk"]
        return [label[len(self.variable) + 1:-1] for label in badness.sort_values(ascending=False).index[:n]]


def variable_rows(summary: pd.DataFrame, variable: str) -> pd.DataFrame:
    """The rows of an ``az.summary`` that describe ``variable`` (the index reads ``<variable>[<coordinate>]``)."""
    return summary[summary.index.str.startswith(variable + "[")]


def assess(idata: az.InferenceData) -> Convergence:
    """Summarise the tracked coordinates and say, in actionable terms, what is wrong with the run if anything."""
    chains, draws = idata.posterior.sizes["chain"], idata.posterior.sizes["draw"]
    variable = lambda_variable(idata)
    with quiet_arviz():
        summary = az.summary(idata, var_names=list(dict.fromkeys(["lambda", variable, "delta"])), round_to="none")
    lam = variable_rows(summary, variable)
    shares = {"r_hat": float((lam["r_hat"] <= RHAT_MAX).mean()) if chains > 1 else float("nan"),
              "ess_bulk": float((lam["ess_bulk"] >= ESS_MIN).mean()),
              "ess_tail": float((lam["ess_tail"] >= ESS_MIN).mean())}
    warnings = []
    inference = idata.attrs.get("inference", "sgld")
    if idata.attrs.get("engine_kind", "sampler" if inference == "sgld" else "point") != "sampler":
        warnings.append(f"inference={inference}: the draws do not come from a sampler, so R-hat and ESS describe "
                        "the optimiser or the variational guide, not posterior mixing")
    if chains == 1:
        warnings.append("R-hat is not computable with 1 chain: rerun stage 1 with --chains 2 (or more) "
                        "to check that independent chains agree")
    elif shares["r_hat"] < PASS_SHARE:
        warnings.append(f"R-hat > {RHAT_MAX} on {1 - shares['r_hat']:.0%} of the tracked λ: the chains "
                        "disagree; run longer (--steps, --burnin) or lower the step (--lr, --lr-lambda)")
    if draws < DRAWS_MIN:
        warnings.append(f"only {draws} draws per chain: R-hat and ESS are themselves noisy below {DRAWS_MIN}; "
                        "collect more (raise --steps or lower --thin)")
    if shares["ess_bulk"] < PASS_SHARE:
        warnings.append(f"bulk ESS < {ESS_MIN} on {1 - shares['ess_bulk']:.0%} of the tracked λ: "
                        "λ̂ carries Monte Carlo error; collect more draws (--steps, --thin) or add --chains")
    if shares["ess_tail"] < PASS_SHARE:
        warnings.append(f"tail ESS < {ESS_MIN} on {1 - shares['ess_tail']:.0%} of the tracked λ: "
                        "credible bounds (--rank lcb) and inclusion probabilities are unreliable; collect more draws")
    status, verdict = _verdict(chains, draws, shares)
    return Convergence(summary, chains, draws, shares, warnings, status, verdict, variable)


def _verdict(chains: int, draws: int, shares: dict[str, float]) -> tuple[str, str]:
    ess = f"bulk ESS ≥ {ESS_MIN} on {shares['ess_bulk']:.0%}"
    if draws < 4:
        return "fail", f"not assessable: {draws} draws per chain (R-hat and ESS need at least 4)"
    if chains == 1:
        return "caution", f"not assessable with 1 chain (R-hat needs 2); {ess} of the tracked λ"
    rhat = f"R-hat ≤ {RHAT_MAX} on {shares['r_hat']:.0%} of the tracked λ ({chains} chains)"
    if shares["r_hat"] < PASS_SHARE:
        return "fail", f"the chains disagree: {rhat}; {ess}"
    if shares["ess_bulk"] < PASS_SHARE:
        return "caution", f"the chains agree ({rhat}) but give few effective draws: {ess}"
    return "ok", f"the chains agree: {rhat}; {ess}"


def tensor_summary(posterior: StreamingPosterior, mask: Mask | None = None) -> xr.Dataset:
    """Per parameter tensor, from the pooled moments of all its coordinates: size, mean and max λ̂, mean and max
    Var[λ], mean coefficient of variation sd/λ̂, and how many coordinates the mask holds."""
    layout = posterior.layout
    mean, var = (layout.split(x) for x in posterior.pooled(posterior.estimate))
    names = layout.names
    data = {"lambda_mean": [float(mean[n].mean()) for n in names],
            "lambda_max": [float(mean[n].max()) for n in names],
            "var_mean": [float(var[n].mean()) for n in names],
            "var_max": [float(var[n].max()) for n in names],
            "cv_mean": [float((var[n].sqrt() / mean[n]).mean()) for n in names]}
    numel = np.array(layout.numels)
    counts = mask.counts() if mask is not None else dict.fromkeys(names, 0)
    in_mask = np.array([counts[n] for n in names])
    return xr.Dataset(
        {**{k: ("tensor", np.array(v)) for k, v in data.items()},
         "numel": ("tensor", numel), "in_mask": ("tensor", in_mask), "share_in_mask": ("tensor", in_mask / numel)},
        coords={"tensor": list(names), "module": ("tensor", [module_type(n) for n in names]),
                "layer": ("tensor", [layer_index(n) for n in names])},
    )


def by_module(tensors: xr.Dataset) -> xr.Dataset:
    """Parameters and mask counts summed per module type (in the order of :data:`MODULE_TYPES`, then ``other``)."""
    grouped = tensors[["numel", "in_mask"]].groupby("module").sum()
    order = [m for m, _ in MODULE_TYPES] + [OTHER]
    return grouped.sel(module=[m for m in order if m in grouped.module.values])


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A ∪ B| of two sets of flat indices (1 when both are empty)."""
    inter = int(torch.isin(a, b).sum())
    union = a.numel() + b.numel() - inter
    return inter / union if union else 1.0


def chain_agreement(posterior: StreamingPosterior, p: float) -> np.ndarray:
    """(chains, chains) Jaccard overlaps of the top-p sets picked by each chain's own λ̂."""
    sets = [top_p(posterior.chain_estimate(c), p, posterior.layout).index for c in range(posterior.chains)]
    return np.array([[jaccard(a, b) for b in sets] for a in sets])
