"""The BayesTune pipeline as a Python API: stage 1 → mask → stage 2 → evaluation, into one run directory.

Run directory::

    config.yaml            the resolved RunConfig
    stage1.ckpt            stage-1 checkpoint (removed once the posterior is written)
    posterior.safetensors  streaming posterior (+ posterior.json)
    mask.safetensors       stage-2 mask (+ mask.json)
    delta.safetensors      sparse delta + head: the fine-tuned model, given the pretrained backbone
    metrics.json           task metric on the test split, n_updated, n_total, p, seconds per stage

Each function reads what earlier stages wrote, so stages can be run (and re-run) one at a time.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig
from .data import TaskData, infinite_batches, load_task, make_loader
from .finetune.delta import SparseDelta
from .finetune.evaluate import evaluate
from .finetune.stage2 import SparseFineTuner, Stage2Config
from .inference.posterior import StreamingPosterior
from .inference.potential import Potential
from .inference.runner import CHECKPOINT, StepSizes, run_stage1
from .inference.sgld import SGLDConfig
from .io import read_json, write_json, write_yaml
from .models.backbones import load_backbone
from .models.gamma_laplace import GammaLaplaceModel
from .models.lifted import LiftedBackbone
from .models.search_space import SearchSpace
from .selection.masks import Mask, above_threshold, top_p


@dataclass
class Setup:
    """Everything a stage needs, built from the configuration."""

    config: RunConfig
    task: TaskData
    lifted: LiftedBackbone
    model: GammaLaplaceModel

    def train_batches(self):
        loader = make_loader(self.task.train, self.lifted.backbone.tokenizer, batch_size=self.config.batch_size,
                             max_length=self.config.max_length, shuffle=True, seed=self.config.seed,
                             regression=self.task.spec.is_regression)
        return infinite_batches(loader)

    def test_loader(self):
        return make_loader(self.task.test, self.lifted.backbone.tokenizer, batch_size=self.config.eval_batch_size,
                           max_length=self.config.max_length, shuffle=False,
                           regression=self.task.spec.is_regression)

    def nll(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of a batch: the stage-2 loss, the same p(y|·) as stage 1."""
        return -self.model.observation(out).log_prob(labels).mean()


def setup(config: RunConfig) -> Setup:
    """Load the task and a fresh backbone (same seed → same head initialisation), lift it and build the model."""
    config.validate()
    task = load_task(config.task, config.data_dir, seed=config.seed, train_size=config.train_size,
                     shots_per_class=config.shots_per_class)
    backbone = load_backbone(config.backbone, task.spec.num_labels, pretrained=config.pretrained, seed=config.seed)
    lifted = LiftedBackbone(backbone, SearchSpace(tuple(config.include), tuple(config.exclude)), config.device)
    likelihood = "normal" if task.spec.is_regression else "categorical"
    model = GammaLaplaceModel(lifted, alpha=config.alpha, beta=config.beta, n_hat=config.n_hat,
                              likelihood=likelihood, sigma=config.sigma)
    return Setup(config, task, lifted, model)


def stage1(config: RunConfig, run_dir: str | os.PathLike, progress: bool = True) -> StreamingPosterior:
    """Sample (θ, λ) with SGLD and write the streaming posterior."""
    run_dir = Path(run_dir)
    s = setup(config)
    posterior = StreamingPosterior(s.lifted.layout, n_tracked=config.n_tracked,
                                   track_delta_moments=config.delta_moments, seed=config.seed,
                                   device=s.lifted.theta_bar.device)
    kernel = SGLDConfig(n_hat=config.n_hat, gamma=config.gamma, preconditioner=config.preconditioner,
                        clip_norm=config.clip_norm)
    sizes = StepSizes(config.lr, config.lr_lambda, config.head_lr, config.lambda_init)
    start = time.perf_counter()
    run_stage1(Potential(s.model), s.train_batches(), config.schedule(), kernel, sizes, posterior,
               seed=config.seed, checkpoint_dir=run_dir, checkpoint_every=config.checkpoint_every,
               progress=progress)
    posterior.save(run_dir, {"seconds": time.perf_counter() - start, "n_train": len(s.task.train)})
    (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return posterior


def export(run_dir: str | os.PathLike, p: float | None = None, threshold: float | None = None) -> Mask:
    """Turn the posterior mean λ̂ into the stage-2 mask (top-p, or λ̂ > threshold) and write it."""
    if (p is None) == (threshold is None):
        raise ValueError(f"p: give exactly one of p and threshold (p={p!r}, threshold={threshold!r})")
    posterior = StreamingPosterior.load(run_dir)
    lam = posterior.lambda_mean
    mask = top_p(lam, p, posterior.layout) if p is not None else above_threshold(lam, threshold, posterior.layout)
    mask.info["lambda_cut"] = float(lam[mask.index].min()) if mask.k else None
    mask.save(run_dir)
    return mask


def stage2(config: RunConfig, run_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Fine-tune the masked coordinates and the head, evaluate, write delta.safetensors and metrics.json."""
    run_dir = Path(run_dir)
    s = setup(config)
    mask = Mask.load(run_dir, s.lifted.theta_bar.device)
    if mask.layout != s.lifted.layout:
        raise ValueError(f"mask: {run_dir / 'mask.json'} was made for another backbone or search space")
    tuner = SparseFineTuner(s.lifted, mask.index, s.nll)
    start = time.perf_counter()
    train_cfg = Stage2Config(config.stage2_steps, config.stage2_lr, config.stage2_head_lr or config.head_lr,
                             config.weight_decay)
    tuner.train(s.train_batches(), train_cfg, progress=progress)
    seconds = time.perf_counter() - start
    scores = evaluate(tuner.forward, s.test_loader(), s.task.spec, s.lifted.theta_bar.device)
    sparse = tuner.sparse_delta(config.backbone, s.task.spec.num_labels, config.seed, config.pretrained)
    sparse.save(run_dir / "delta.safetensors")
    stage1_meta = read_json(run_dir / "posterior.json") if (run_dir / "posterior.json").exists() else {}
    metrics = {
        "task": config.task, "metric": s.task.spec.metric, f"test_{s.task.spec.metric}": scores[s.task.spec.metric],
        "test": scores, "n_test": len(s.task.test), "n_train": len(s.task.train),
        "n_updated": sparse.n_updated, "n_total": s.lifted.d, "p": mask.p, "threshold": mask.threshold,
        "delta_bytes": (run_dir / "delta.safetensors").stat().st_size,
        "seconds": {"stage1": stage1_meta.get("seconds"), "stage2": seconds},
    }
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def write_config(config: RunConfig, run_dir: str | os.PathLike) -> None:
    write_yaml(Path(run_dir) / "config.yaml", config.to_dict())


def run(config: RunConfig, run_dir: str | os.PathLike, progress: bool = True) -> dict:
    """The whole pipeline; stages whose outputs already exist in ``run_dir`` are not repeated."""
    config.validate()
    run_dir = Path(run_dir)
    write_config(config, run_dir)
    if not (run_dir / "posterior.json").exists():
        stage1(config, run_dir, progress)
    if not (run_dir / "mask.json").exists():
        export(run_dir, config.p, config.threshold)
    return stage2(config, run_dir, progress)
