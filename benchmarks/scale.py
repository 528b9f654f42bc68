"""Stage 1, the posterior, the mask and stage 2 at BERT-base size (110M parameters, random initialisation) on CPU.

    python benchmarks/scale.py [--steps 3] [--batch-size 16] [--max-length 64] [--threads 2]

Variants, each on the same bbc-news minibatches through a BERT-base-shaped classifier (12 layers, hidden 768,
every weight covered, d ≈ 1.09e8):
- plain fine-tuning: forward, backward, ``torch.optim.Adam`` over every parameter (the reference);
- a stage-1 pSGLD step (``stage1_psgld``), and the same step followed by the streaming posterior's update (λ and
  the Rao-Blackwellised E[λ | θ] moments), as at each kept draw, one step in ``--thin`` (``stage1_draw``);
- a stage-2 step on a top-p mask at p = 0.005 and at p = 0.05 (``SparseFineTuner``).
Prints one JSON line per variant (median seconds, peak memory growth, ratios to plain; see step_cost.py), then the
seconds to cut a top-p mask from λ̂ over all d (``selection.masks.top_p``) at both p.
"""
from __future__ import annotations

import json
import time

import torch
from step_cost import arguments, loader_for, measure
from transformers import BertConfig, BertForSequenceClassification

from bayestune_pyro.data import infinite_batches
from bayestune_pyro.finetune.stage2 import SparseFineTuner, Stage2Config
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.inference.potential import Potential
from bayestune_pyro.inference.sgld import SGLD, SGLDConfig
from bayestune_pyro.models.backbones import Backbone
from bayestune_pyro.models.gamma_laplace import GammaLaplaceModel
from bayestune_pyro.models.lambda_conditional import LambdaConditional
from bayestune_pyro.models.lifted import LiftedBackbone
from bayestune_pyro.selection.masks import top_p

HEAD = ["classifier.weight", "classifier.bias"]


def bert_base() -> Backbone:
    """A randomly initialised BERT-base classifier (5 labels), seed 0."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=5))  # the defaults are BERT-base's shape
    return Backbone(model, HEAD, kind="text", source="bert-base (random)")


def plain(batches):
    model = bert_base().model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step():
        batch = next(batches)
        loss = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def stage1(batches, draw: bool):
    """A pSGLD step of the sgld engine; with ``draw``, then the posterior's update with E[λ | θ] (a kept draw)."""
    lifted = LiftedBackbone(bert_base())
    lifted.model.train()
    model = GammaLaplaceModel(lifted)
    potential = Potential(model)
    z = potential.init(1e-4)
    kernel = SGLD(SGLDConfig(), z, torch.Generator().manual_seed(0), workspace=potential.work)
    head_opt = torch.optim.Adam(lifted.head_parameters(), lr=1e-3)
    if draw:
        posterior = StreamingPosterior(lifted.layout, estimator="rao-blackwell")
        conditional = LambdaConditional(model.alpha, model.beta)

    def step():
        loss, grads = potential.gradient(z, next(batches))
        kernel.step(z, grads, {"theta": 1e-4, "lambda": 1e-2})
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)
        if not draw:
            return
        with torch.no_grad():  # as the sgld engine's collect: into the potential's work buffers
            delta, lam, lam_rb = potential.work
            torch.sub(z["theta"], lifted.theta_bar, out=delta)
            conditional.mean(torch.abs(delta, out=lam_rb), out=lam_rb)
            posterior.update(0, potential.lam(z, out=lam), delta, {"loss": loss, "log_joint": loss}, lam_rb)

    return step


def stage2(batches, p: float):
    lifted = LiftedBackbone(bert_base())
    index = torch.randperm(lifted.d, generator=torch.Generator().manual_seed(0))[:int(p * lifted.d)].sort().values
    tuner = SparseFineTuner(lifted, index, torch.nn.functional.cross_entropy, Stage2Config(lr=1e-3, head_lr=1e-3))
    lifted.model.train()
    return lambda: tuner.step(next(batches))


def main():
    args = arguments(__doc__)
    loader = loader_for(args)
    measure({"plain_adam": lambda: plain(infinite_batches(loader)),
             "stage1_psgld": lambda: stage1(infinite_batches(loader), draw=False),
             "stage1_draw": lambda: stage1(infinite_batches(loader), draw=True),
             "stage2_p0.005": lambda: stage2(infinite_batches(loader), 0.005),
             "stage2_p0.05": lambda: stage2(infinite_batches(loader), 0.05)}, args.steps)
    layout = LiftedBackbone(bert_base()).layout
    scores = torch.rand(layout.d, generator=torch.Generator().manual_seed(0))
    for p in (0.005, 0.05):
        start = time.perf_counter()
        mask = top_p(scores, p, layout)
        print(json.dumps({"variant": f"mask_export_p{p}", "d": layout.d, "k": mask.k,
                          "seconds": round(time.perf_counter() - start, 3)}), flush=True)


if __name__ == "__main__":
    main()
