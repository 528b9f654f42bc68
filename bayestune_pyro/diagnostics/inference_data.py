"""The run's posterior as ``arviz.InferenceData``, saved as ``trace.nc`` (``az.from_netcdf`` reads it back).

- ``posterior``: ``lambda`` (λ), ``log_lambda`` and ``delta`` (θ − θ̄) of the K tracked coordinates, dims
  (chain, draw, coordinate), and, with the Rao-Blackwellised estimator, ``lambda_rb`` = E[λ | θ] of each draw
  (the quantity λ̂ averages) and ``log_lambda_rb``; a coordinate is labelled
  ``<parameter tensor>[<flat index within it>]`` and carries ``flat_index``, its index into θ, and (when the run
  recorded it) ``touched``: whether a likelihood gradient ever reached it (if not, λ̂ there is α/β, not these draws).
- ``sample_stats``: ``log_joint`` (log p(θ, λ, B) on the N̂ scale), ``potential`` (−log_joint), ``loss`` (the
  minibatch mean NLL), ``step_size`` (lr) and ``temperature`` (γ²; 0 for MAP, NaN for VI).
- ``attrs``: the run configuration (flat names), the engine's kind (``sampler``, ``point``, ...), the λ̂
  estimator and the posterior's d and draw counts, as netCDF-safe strings and numbers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import arviz as az
import numpy as np
import torch

from ..config import RunConfig
from ..inference.posterior import StreamingPosterior
from ..io import atomic_path
from ..models.lambda_conditional import LambdaConditional
from ..models.lifted import Layout
from ..registry import ENGINES

TRACE_FILE = "trace.nc"


def coordinate_labels(layout: Layout, index: torch.Tensor) -> list[str]:
    """``name[i]`` for each flat index of θ: the parameter tensor holding it and its flat index in that tensor."""
    tensor = torch.searchsorted(torch.tensor(layout.offsets), index.cpu(), right=True) - 1
    return [f"{layout.names[t]}[{i - layout.offsets[t]}]" for t, i in zip(tensor.tolist(), index.tolist())]


def netcdf_attrs(values: dict) -> dict:
    """Numbers and strings as they are; anything else (None, booleans, lists) as its JSON text."""
    return {k: v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else json.dumps(v)
            for k, v in values.items()}


def temperature(config: RunConfig) -> float:
    """γ² of a sampler, 0 for a point estimate, undefined (NaN) for a variational fit or a heuristic."""
    return ENGINES.get(config.inference).temperature(config.engine_options)


def lambda_variable(idata: az.InferenceData) -> str:
    """The posterior variable whose draws λ̂ averages: ``lambda_rb`` (E[λ | θ]) or ``lambda`` (the λ draws)."""
    return "lambda_rb" if "lambda_rb" in idata.posterior else "lambda"


def to_inference_data(posterior: StreamingPosterior, config: RunConfig) -> az.InferenceData:
    """The tracked traces and per-draw statistics of ``posterior`` (every chain, cut to the shortest)."""
    lam = posterior.trace("lambda").double().cpu().numpy()
    if lam.ndim != 3 or lam.shape[1] == 0:
        raise ValueError("posterior: no draws were collected; the sampling phase must be at least `thin` steps")
    log_joint = posterior.trace("log_joint").double().cpu().numpy()
    index = posterior.tracked_index.cpu()
    delta = posterior.trace("delta").double().cpu()
    variables = {"lambda": lam, "log_lambda": np.log(lam), "delta": delta.numpy()}
    if posterior.estimator == "rao-blackwell":
        rb = LambdaConditional(config.alpha, config.beta, dtype=torch.float64).mean(delta.abs()).numpy()
        variables.update(lambda_rb=rb, log_lambda_rb=np.log(rb))
    idata = az.from_dict(
        posterior=variables,
        sample_stats={"log_joint": log_joint, "potential": -log_joint,
                      "loss": posterior.trace("loss").double().cpu().numpy(),
                      "step_size": np.full_like(log_joint, config.lr),
                      "temperature": np.full_like(log_joint, temperature(config))},
        coords={"coordinate": coordinate_labels(posterior.layout, index)},
        dims={name: ["coordinate"] for name in variables},
        attrs=netcdf_attrs({**config.flat(), "engine_kind": ENGINES.get(config.inference).kind,
                            "estimator": posterior.estimator, "chains": posterior.chains, "d": posterior.d,
                            "counts": posterior.counts}),
    )
    idata.posterior.coords["flat_index"] = ("coordinate", index.numpy())
    if posterior.touched is not None:
        idata.posterior.coords["touched"] = ("coordinate", posterior.touched[posterior.tracked_index].cpu().numpy())
    return idata


def save_trace(idata: az.InferenceData, run_dir: str | os.PathLike) -> Path:
    """Write ``RUN/trace.nc`` atomically (netCDF4 through h5netcdf)."""
    path = Path(run_dir) / TRACE_FILE
    with atomic_path(path) as tmp:
        idata.to_netcdf(str(tmp))
    return path
