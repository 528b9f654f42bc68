"""Cost of one stage-2 step of a masked method relative to one plain dense fine-tuning step, in the same run.

    python benchmarks/stage2_cost.py [--steps 12] [--batch-size 16] [--max-length 64] [--threads 2]

Variants, on the offline-default backbone (MiniLM-L6) and the same bbc-news minibatches (see step_cost.py for how
time and memory are measured):
- plain_adam            forward, backward, torch.optim.Adam over every parameter;
- sparse_<p>            a random mask at p = 0.005 and 0.05 through :class:`SparseFineTuner` as every masked
                        method runs it: the module updated in place at the k masked coordinates, each tensor's
                        gradient gathered into the k-sized δ in a hook, AdamW on δ and on the head;
- sparse_<p>_functional the reference path: θ = θ̄ + scatter(δ) rebuilt every step, autograd through it.
"""
from __future__ import annotations

import torch
from step_cost import arguments, loader_for, measure, plain

from bayestune_pyro.data import infinite_batches
from bayestune_pyro.finetune.stage2 import SparseFineTuner, Stage2Config
from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.models.lifted import LiftedBackbone


def sparse(batches, p: float, backward: str):
    lifted = LiftedBackbone(load_backbone("minilm-l6", 5))
    lifted.model.train()
    index = torch.randperm(lifted.d, generator=torch.Generator().manual_seed(0))[: int(p * lifted.d)].sort().values
    tuner = SparseFineTuner(lifted, index, torch.nn.functional.cross_entropy, Stage2Config(), backward=backward)
    return lambda: tuner.step(next(batches))


def main():
    args = arguments(__doc__)
    loader = loader_for(args)
    builders = {"plain_adam": lambda: plain(infinite_batches(loader))}
    for p in (0.005, 0.05):
        for backward in ("hooks", "functional"):
            name = f"sparse_{p}" + ("" if backward == "hooks" else "_functional")
            builders[name] = lambda p=p, backward=backward: sparse(infinite_batches(loader), p, backward)
    measure(builders, args.steps)


if __name__ == "__main__":
    main()
