"""Every fine-tuning method behind one interface: how it picks coordinates, and which stage-2 tuner trains them.

The budget is k = ⌊p·d⌋ covered backbone coordinates (the head is always trained and never counted).

========================  ==========================================  =========================================
method                    stage 1 (selection)                         stage 2
========================  ==========================================  =========================================
bayestune                 SGLD posterior, top-k by λ̂                  fixed mask: δ on k coordinates
bayestune-map             the same with γ = 0 (MAP)                   fixed mask
bayestune-paper           the original algorithm: λ in linear space   fixed mask
                          (clamped at 1e-8), Adam on noisy gradients,
                          likelihood gradient clipped at norm 1,
                          top-k by the mean of the λ draws
random                    k uniformly random coordinates              fixed mask
magnitude                 top-k |θ̄|                                   fixed mask
gradient (SAM)            top-k Σ|∇| over ``grad_batches`` batches    fixed mask
sift                      top-k |∇| of the first ``sift_batches``     fixed mask, sparse backward hooks
                          (within ``sift_modules``)                   (k-sized gradient and optimiser state)
bitfit                    bias terms (top-k by Σ|∇| if too many)      fixed mask (natural p if below budget)
l1sp                      L1-to-θ̄ full fine-tuning, top-k relative    fixed mask
                          change |θ − θ̄| / (|θ̄| + ε)
linear                    nothing (k = 0)                             head only
stochastic                none: a fresh mask of k per step            masked Adam on the step's k coordinates
full                      none                                        every coordinate (AdamW at ``dense_lr``)
lora                      none                                        rank matched to k on ``lora_targets``
========================  ==========================================  =========================================
"""
from __future__ import annotations

import dataclasses

from .finetune.dense import DenseFineTuner
from .finetune.lora import LoRATuner, lora_targets, rank_for_budget
from .finetune.stage2 import SparseFineTuner, Stage2Config, Tuner, fit
from .finetune.stochastic import StochasticTuner
from .selection import peers
from .selection.masks import Mask, budget, top_k

METHODS = ("bayestune", "bayestune-map", "bayestune-paper", "random", "bitfit", "magnitude", "gradient", "sift", "stochastic",
           "l1sp", "full", "linear", "lora")
POSTERIOR = ("bayestune", "bayestune-map", "bayestune-paper")  # masks cut from a stage-1 posterior (export)
SELECTED = ("random", "bitfit", "magnitude", "gradient", "sift", "l1sp", "linear")  # masks from peers.py


def stage2_config(config) -> Stage2Config:
    return Stage2Config(config.stage2_steps, config.stage2_lr, config.stage2_head_lr or config.head_lr,
                        config.weight_decay, eval_every=config.eval_every)


def select_mask(s) -> Mask:
    """The fixed mask of a peer method (``SELECTED``) for the run described by the pipeline ``Setup`` ``s``."""
    config, lifted = s.config, s.lifted
    k = budget(config.p, lifted.d)
    method, layout = config.method, lifted.layout
    if method == "random":
        return top_k(peers.random_scores(lifted.d, config.seed, lifted.theta_bar.device), k, layout, method)
    if method == "magnitude":
        return top_k(peers.magnitude_scores(lifted), k, layout, method)
    if method == "gradient":
        scores = peers.gradient_scores(lifted, s.train_batches(), s.nll, config.grad_batches)
        return top_k(scores, k, layout, method, batches=config.grad_batches)
    if method == "sift":
        scores = peers.gradient_scores(lifted, s.train_batches(), s.nll, config.sift_batches)
        scores = peers.restrict(scores, layout, tuple(config.sift_modules), k, "sift_modules")
        return top_k(scores, k, layout, method, batches=config.sift_batches, modules=config.sift_modules)
    if method == "bitfit":
        return peers.bitfit_mask(layout, k, lambda: peers.gradient_scores(lifted, s.train_batches(), s.nll,
                                                                         config.grad_batches))
    if method == "l1sp":
        dense = DenseFineTuner(lifted, s.nll, Stage2Config(config.steps, config.dense_lr, config.head_lr,
                                                           log_every=max(1, config.steps // 10)), l1=config.l1)
        fit(dense, s.train_batches(), dense.config, progress=False)
        scores = peers.relative_change_scores(dense.theta, lifted.theta_bar)
        dense.release()
        return top_k(scores, k, layout, method, l1=config.l1, steps=config.steps)
    if method == "linear":
        return top_k(lifted.theta_bar, 0, layout, method)
    raise ValueError(f"method: {method!r} has no fixed mask; choose one of: {', '.join(POSTERIOR + SELECTED)}")


def make_tuner(s, mask: Mask | None) -> Tuner:
    """The stage-2 tuner of the configured method (masked methods need their ``mask``)."""
    config, lifted = s.config, s.lifted
    cfg = stage2_config(config)
    if config.method in POSTERIOR + SELECTED:
        return SparseFineTuner(lifted, mask.index, s.nll, cfg,
                               backward="hooks" if config.method == "sift" else "functional")
    k = budget(config.p, lifted.d)
    if config.method == "stochastic":
        return StochasticTuner(lifted, s.nll, cfg, k, seed=config.seed)
    if config.method == "full":
        return DenseFineTuner(lifted, s.nll, dataclasses.replace(cfg, lr=config.dense_lr))
    targets = lora_targets(lifted, tuple(config.lora_targets))
    rank = config.lora_rank or rank_for_budget(lifted, targets, k)
    return LoRATuner(lifted, s.nll, cfg, rank, targets, seed=config.seed)
