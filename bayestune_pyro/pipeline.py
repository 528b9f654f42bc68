"""The BayesTune pipeline as a Python API: stage 1 → mask → stage 2 → evaluation, into one run directory.

Run directory::

    config.yaml            the resolved RunConfig
    stage1.ckpt            stage-1 checkpoint: safetensors, the state's structure as JSON in its header; removed
                           once the posterior is written
    posterior.safetensors  streaming posterior (+ posterior.json)
    mask.safetensors       stage-2 mask (+ mask.json)
    delta.safetensors      sparse delta + head: the fine-tuned model, given the pretrained backbone
    ensemble-<kind>.safetensors  with --ensemble: the S members' deltas and heads over the mask (finetune/ensemble.py)
    metrics.json           task metric on the test split (``test``: all metrics; for classification also nll, brier,
                           ece, and ``reliability``: the ECE's 15-bin table), n_updated, n_total, p, seconds per stage;
                           ``temperature``: the point estimate temperature-scaled on validation; ``ensembles``: per
                           kind, the ensemble's mean predictive, scored the same way

Each function reads what earlier stages wrote, so stages can be run (and re-run) one at a time.
Peer methods (``config.method``, one module each in ``methods/``) go through the same functions: their mask replaces the
posterior's (stage 1 is their selection), or, for methods without a fixed mask, stage 2 trains as they
prescribe; every method gets the same data, budget, stage-2 schedule, model selection and evaluation.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import torch

from .config import ENSEMBLES, RunConfig
from .data.calibration import fit_temperature
from .finetune.delta import SparseDelta
from .finetune.ensemble import deep_members, predictive, sgld_members
from .finetune.evaluate import predict, score
from .finetune.stage2 import fit
from .inference import distributed
from .inference.driver import CHECKPOINT, checkpoint_chain, run_chain
from .inference.posterior import StreamingPosterior
from .io import atomic_path, read_json, write_json, write_yaml
from .models.backbones import init_head
from .registry import ENGINES, METHODS
from .run_setup import setup
from .selection.masks import Mask
from .selection.uncertainty import select


def ensemble_file(kind: str) -> str:
    return f"ensemble-{kind}.safetensors"


def stage1(config: RunConfig, run_dir: str | os.PathLike, progress: bool = True) -> StreamingPosterior:
    """Infer (θ, λ) with the configured engine, chain after chain, and write the streaming posterior.

    Every chain starts from the pretrained θ̄; chain c uses seed ``config.seed + c`` (head initialisation, data
    order, dropout, Langevin noise), so it is the single-chain run with that seed. An interrupted run resumes in
    the chain it stopped.
    """
    if not METHODS.get(config.method).posterior:
        raise ValueError(f"method: stage 1 samples a posterior for the posterior methods only, not "
                         f"{config.method!r}; use `bayestune run`")
    config.single("stage 1")
    run_dir = Path(run_dir)
    options, engine = config.options, ENGINES.get(config.inference)
    if distributed.size() > 1 and not engine.data_parallel:
        raise ValueError(f"inference: engine {engine.name!r} does not average its gradient over torchrun's ranks; "
                         "run it in one process, or use sgld, sghmc, map, noisy-adam or vi")
    s = setup(config)
    estimator = options.lambda_estimator or ("rao-blackwell" if engine.sampler else "draws")
    # the tracked subset is seeded by 0, not the run's seed, so separately run chains can be merged
    posterior = StreamingPosterior(s.lifted.layout, chains=options.chains, n_tracked=options.n_tracked,
                                   track_delta_moments=options.delta_moments, estimator=estimator,
                                   flat_prior=(options.alpha, options.beta) if engine.sampler else None, seed=0,
                                   device=s.lifted.theta_bar.device)
    start = time.perf_counter()
    for chain in range(checkpoint_chain(run_dir), options.chains):
        seed = config.seed + chain
        init_head(s.lifted.backbone, seed, s.task.target_mean)
        kernel = engine.kernel(s, options, config.engine_options, seed)
        run_chain(kernel, distributed.shard(s.train_batches(seed)), config.schedule(), posterior,
                  engine=engine.name, chain=chain, device=s.lifted.theta_bar.device, checkpoint_dir=run_dir,
                  checkpoint_every=options.checkpoint_every, progress=progress)
    if distributed.is_writer():
        posterior.save(run_dir, {"backbone": config.backbone, "seconds": time.perf_counter() - start,
                                 "n_train": len(s.task.train), "inference": config.inference,
                                 "seeds": [config.seed + c for c in range(options.chains)],
                                 "ranks": distributed.size()})
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    distributed.barrier()  # every rank returns once the posterior is on disk
    return posterior


def merge_chains(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> StreamingPosterior:
    """Pool the stage-1 posteriors of separately run chains (same backbone, search space and tracked set) into
    ``out``."""
    if len(run_dirs) < 2:
        raise ValueError(f"runs: merge-chains needs at least two run directories, got {len(run_dirs)}")
    parts = []
    for d in run_dirs:
        if not (Path(d) / "posterior.json").exists():
            raise ValueError(f"runs: {str(d)!r} has no posterior.json (run stage 1 there first)")
        parts.append(load_posterior(d))
    first = parts[0]
    for d, part in zip(run_dirs[1:], parts[1:]):
        backbones = {part.meta.get("backbone"), first.meta.get("backbone")} - {None}  # None: not recorded
        if len(backbones) > 1 or part.layout != first.layout or not torch.equal(part.tracked_index,
                                                                                  first.tracked_index):
            raise ValueError(f"runs: {str(d)!r} has another backbone, search space or tracked set than "
                             f"{str(run_dirs[0])!r}")
    merged = StreamingPosterior.concatenate(parts)
    config = RunConfig.from_yaml(Path(run_dirs[0]) / "config.yaml", strict=False).replace(chains=merged.chains)
    out = Path(out)
    write_config(config, out)
    seeds = [seed for part in parts for seed in part.meta.get("seeds", [None] * part.chains)]
    merged.save(out, {"backbone": first.meta.get("backbone"),
                      "seconds": sum(part.meta.get("seconds", 0.0) for part in parts),
                      "inference": first.meta.get("inference"), "seeds": seeds,
                      "merged_from": [str(d) for d in run_dirs]})
    return merged


def export(run_dir: str | os.PathLike, p: float | None = None, threshold: float | None = None, *,
           auto: bool = False, rank: str = "mean", z: float | None = None) -> Mask:
    """Cut the stage-2 mask from the posterior and write it: top-p, score > threshold, or (``auto``) top-p at the
    knee of the sorted λ̂; the score is λ̂ (``rank="mean"``) or λ̂ − z·sd (``"lcb"``). See ``selection.uncertainty``."""
    if not (Path(run_dir) / "posterior.json").exists():
        raise ValueError(f"run: {str(run_dir)!r} has no posterior to cut a mask from (run stage 1 there first; "
                         f"peer methods select their mask in `bayestune run`)")
    mask = select(load_posterior(run_dir), p, threshold, auto=auto, rank=rank, z=z)
    mask.save(run_dir)
    return mask


def load_posterior(run_dir: str | os.PathLike) -> StreamingPosterior:
    """The posterior of ``run_dir``, checked against the backbone its config.yaml names (when it has one)."""
    config = Path(run_dir) / "config.yaml"
    backbone = RunConfig.from_yaml(config, strict=False).backbone if config.is_file() else None
    return StreamingPosterior.load(run_dir, backbone=backbone)


def stage2(config: RunConfig, run_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Fine-tune with the configured method (the run's mask for masked methods, checked against the backbone),
    evaluate, write config.yaml, metrics.json and, for masked methods, delta.safetensors."""
    config.single("stage 2")
    run_dir = Path(run_dir)
    method = METHODS.get(config.method)
    mask = Mask.load(run_dir) if method.masked else None  # a damaged mask fails before anything is loaded
    s = setup(config)
    if mask is not None:
        mask.expect(run_dir, s.lifted.layout, config.backbone)
        mask.index = mask.index.to(s.lifted.theta_bar.device)
    write_config(config, run_dir)  # once the run's files fit it: a refused stage 2 leaves the run as it was
    tuner = method.tuner(s, config.options, mask)
    device, spec = s.lifted.theta_bar.device, s.task.spec
    try:
        start = time.perf_counter()
        selection = fit(tuner, s.train_batches(), tuner.config, s.validator(), progress)
        seconds = time.perf_counter() - start
        outputs, labels = predict(tuner.forward, s.test_loader(), device)
        scores, reliability = score(outputs, labels, spec)
        n_changed = tuner.n_changed()
        identity = (config.backbone, spec.num_labels, config.seed, config.pretrained, config.to_dict()["search_space"])
        sparse = tuner.sparse_delta(*identity)
        temperature = _temperature(s, tuner, outputs, labels)
        ensembles = {kind: _ensemble(s, kind, tuner, identity, progress) for kind in config.ensemble}
    finally:
        tuner.release()  # the module's parameters are θ̄ again, whatever happened
    metric = spec.metric
    metrics = {
        "task": config.task, "method": config.method, "metric": metric, f"test_{metric}": scores[metric],
        "test": scores, "n_test": len(s.task.test), "n_train": len(s.task.train),
        "n_validation": len(s.task.validation),
        "n_updated": tuner.n_updated, "budget": s.k if config.budget_p() is not None else None,
        "n_total": s.lifted.d, "p": mask.p if mask is not None else config.p,
        "threshold": mask.threshold if mask is not None else None,
    }
    if reliability is not None:
        metrics["reliability"] = reliability
    if temperature is not None:
        metrics["temperature"] = temperature
    if ensembles:
        metrics["ensembles"] = {}
        for kind, (members, report) in ensembles.items():
            members.save(run_dir / ensemble_file(kind))
            metrics["ensembles"][kind] = {**report, "bytes": (run_dir / ensemble_file(kind)).stat().st_size}
    if "best_step" in selection:
        metrics.update(validation_best_step=selection["best_step"], validation_score=selection["best_score"])
    if n_changed is not None:
        metrics["n_changed"] = n_changed
    if sparse is not None:
        sparse.save(run_dir / "delta.safetensors")
        metrics["delta_bytes"] = (run_dir / "delta.safetensors").stat().st_size
    stage1_meta = read_json(run_dir / "posterior.json") if (run_dir / "posterior.json").exists() else {}
    selection_seconds = mask.info.get("seconds") if mask is not None else None
    metrics["seconds"] = {"stage1": stage1_meta.get("seconds", selection_seconds), "stage2": seconds}
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def _temperature(s, tuner, outputs: torch.Tensor, labels: torch.Tensor) -> dict | None:
    """Temperature scaling of the point estimate, T fitted on the validation split: T and the test split's ``nll``,
    ``brier`` and ``ece`` at T (None for regression or without a validation split)."""
    if s.task.spec.is_regression or not s.task.validation:
        return None
    t = fit_temperature(*predict(tuner.forward, s.validation_loader(), s.lifted.theta_bar.device))
    scaled, _ = score(outputs / t, labels, s.task.spec)
    return {"T": t, **{k: scaled[k] for k in ("nll", "brier", "ece")}}


def _ensemble(s, kind: str, tuner, identity: tuple, progress: bool) -> tuple[SparseDelta, dict]:
    """The run's ensemble of ``kind`` (``finetune.ensemble``) from the point estimate the tuner holds: its members as
    one sparse delta, and what metrics.json reports of it (the test split's scores of its mean predictive, the
    validation scores, the reliability table, the prior and γ it sampled under, seconds). A grid of γ and prior
    scales samples one ensemble per point and keeps the lowest validation NLL (regression: the best validation
    score); ``grid`` records every point. The tuner is left at the point estimate."""
    device, spec, point = s.lifted.theta_bar.device, s.task.spec, tuner.state()
    candidates = []  # (members' states, report) per setting
    for config in s.ensemble_configs(kind):
        start, info = time.perf_counter(), {}
        if config.kind == "sgld":
            states, info = sgld_members(tuner, s.train_batches(s.config.seed + 1), config, len(s.task.train),
                                        s.config.seed, progress)
            info.update(gamma=config.gamma, prior_scale=config.prior_scale)
        else:
            states = deep_members(tuner, s.train_batches, tuner.config, s.validator(), config.size, s.config.seed,
                                  s.task.target_mean, progress)
        report = {"size": config.size, **info, "seconds": time.perf_counter() - start}
        if s.task.validation:
            validation, _ = score(*predictive(tuner, states, s.validation_loader(), spec, device), spec,
                                  probabilities=not spec.is_regression)
            report.update(validation=validation, validation_score=validation[spec.metric])
            tuner.load_state(point)
        candidates.append((states, report))
    states, report = min(candidates, key=lambda c: _validation_loss(c[1], spec))
    if len(candidates) > 1:
        report["grid"] = [{"gamma": r["gamma"], "prior_scale": r["prior_scale"], "validation": r["validation"]}
                          for _, r in candidates]
        report["seconds"] = sum(r["seconds"] for _, r in candidates)
    scores, reliability = score(*predictive(tuner, states, s.test_loader(), spec, device), spec,
                                probabilities=not spec.is_regression)
    report["test"] = scores
    if reliability is not None:
        report["reliability"] = reliability
    members = []
    for state in states:
        tuner.load_state(state)
        members.append(tuner.sparse_delta(*identity))
    tuner.load_state(point)
    return SparseDelta.stack(members), report


def _validation_loss(report: dict, spec) -> float:
    """What an ensemble grid minimises: the validation NLL, or for regression minus the validation score (0 without
    a validation split, where there is no grid)."""
    if "validation" not in report:
        return 0.0
    return report["validation"]["nll"] if not spec.is_regression else -report["validation_score"]


GRID_OUTPUTS = ("posterior.safetensors", "posterior.json", "mask.safetensors", "mask.json", "delta.safetensors",
                *map(ensemble_file, ENSEMBLES))


def run_grid(config: RunConfig, run_dir: Path, progress: bool = True) -> dict:
    """Run every grid point (the paper's Appendix A) in ``RUN/grid/<point>/`` and keep the one whose stage 2
    scores best on the *validation* split; the test split plays no part in the choice.

    The chosen point's posterior, mask and delta are copied to ``RUN``; ``metrics.json`` is the chosen point's,
    plus ``grid`` (every point with its validation score) and ``chosen``. A NaN validation score never wins.
    """
    points = []
    for point in config.grid():
        name = "_".join(f"{k}={v:g}" for k, v in point.items())
        sub = run_dir / "grid" / name
        done = (sub / "metrics.json").exists()  # a finished point of an interrupted grid is not rerun
        metrics = read_json(sub / "metrics.json") if done else run(config.replace(**point), sub, progress)
        score = metrics.get("validation_score")
        points.append({**point, "directory": f"grid/{name}", "validation_score": score})
    finite = [i for i, pt in enumerate(points) if pt["validation_score"] is not None
              and math.isfinite(pt["validation_score"])]
    if not finite:
        raise FloatingPointError(f"grid: no grid point has a finite validation score ({run_dir})")
    best = max(finite, key=lambda i: points[i]["validation_score"])  # the first point wins a tie
    chosen = run_dir / points[best]["directory"]
    for name in GRID_OUTPUTS:
        if (chosen / name).exists():
            with atomic_path(run_dir / name) as tmp:
                shutil.copyfile(chosen / name, tmp)
    metrics = read_json(chosen / "metrics.json")
    metrics.update(grid=points, chosen={k: v for k, v in points[best].items() if k in config.grid()[0]})
    metrics["seconds"] = {"grid": sum(_seconds(run_dir / pt["directory"]) for pt in points), **metrics["seconds"]}
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def sweep(run_dir: str | os.PathLike, budgets: list[float], progress: bool = True) -> dict:
    """Stage 2 at every budget p of ``budgets``, each cut from the run's posterior, in ``RUN/sweep/p=<p>/``; the
    p whose stage 2 scores best on the *validation* split is chosen (the paper's Fig. 1 right and Fig. 3).

    Writes ``RUN/sweep.json``: one row per p (k, validation and test metric) and ``chosen``. A finished point of
    an interrupted sweep is not rerun; a NaN validation score never wins.
    """
    run_dir = Path(run_dir)
    config = RunConfig.from_yaml(run_dir / "config.yaml", strict=False)
    if not config.validation_fraction > 0:
        raise ValueError("p_sweep: p is chosen on the validation split; run with --validation-fraction > 0")
    if not (run_dir / "posterior.json").exists():
        raise ValueError(f"run: {str(run_dir)!r} has no posterior to cut the sweep's masks from")
    posterior, rows = StreamingPosterior.load(run_dir, backbone=config.backbone), []
    for p in sorted(budgets):
        sub = run_dir / "sweep" / f"p={p:g}"
        if not (sub / "metrics.json").exists():
            point = config.replace(p=p, threshold=None)
            write_config(point, sub)
            select(posterior, p).save(sub)
            stage2(point, sub, progress)
        metrics = read_json(sub / "metrics.json")
        rows.append({"p": p, "k": metrics["n_updated"], "validation": metrics.get("validation_score"),
                     "test": metrics[f"test_{metrics['metric']}"], "metric": metrics["metric"]})
    finite = [r for r in rows if r["validation"] is not None and math.isfinite(r["validation"])]
    if not finite:
        raise FloatingPointError(f"p_sweep: no budget has a finite validation score ({run_dir})")
    result = {"rows": rows, "chosen": max(finite, key=lambda r: r["validation"])["p"]}  # the smallest p wins a tie
    write_json(run_dir / "sweep.json", result)
    return result


def _seconds(run_dir: Path) -> float:
    return sum(v or 0.0 for v in read_json(run_dir / "metrics.json")["seconds"].values())


def write_config(config: RunConfig, run_dir: str | os.PathLike) -> None:
    write_yaml(Path(run_dir) / "config.yaml", config.to_dict())


def run(config: RunConfig, run_dir: str | os.PathLike, progress: bool = True) -> dict:
    """The whole pipeline; stages whose outputs already exist in ``run_dir`` are not repeated.

    A list-valued γ, N̂ or lr_λ is a grid: see :func:`run_grid`.
    """
    run_dir = Path(run_dir)
    write_config(config, run_dir)
    if len(config.grid()) > 1:
        return run_grid(config, run_dir, progress)
    method = METHODS.get(config.method)
    if method.posterior:
        if not (run_dir / "posterior.json").exists():
            stage1(config, run_dir, progress)
        (run_dir / CHECKPOINT).unlink(missing_ok=True)  # stage 1 is done, even if it was cut before removing it
        if not (run_dir / "mask.json").exists():
            export(run_dir, config.budget_p(), config.threshold)
    elif method.select is not None and not (run_dir / "mask.json").exists():
        start = time.perf_counter()
        mask = method.select(setup(config), config.options)
        mask.info["seconds"] = time.perf_counter() - start
        mask.backbone = config.backbone
        mask.save(run_dir)
    return stage2(config, run_dir, progress)
