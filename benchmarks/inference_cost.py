"""Cost of each inference engine per stage-1 step, relative to plain fine-tuning, measured in the same process.

    python benchmarks/inference_cost.py [--steps 12] [--batch-size 16] [--max-length 64] [--threads 2]

Variants, all on the offline-default backbone (MiniLM-L6) and the same bbc-news minibatches:
plain Adam fine-tuning; SGLD (no preconditioner); pSGLD (rmsprop); MAP (the kernel with γ = 0, rmsprop);
VI (engine ``vi``: the mean-field guide on flat buffers, the one-draw ELBO gradient in closed form, Adam);
VI through Pyro (engine ``vi-pyro``: Trace_ELBO with an AutoNormal guide over θ and log λ, Adam over the guide and
the head).
Prints one JSON line per variant (median seconds, peak MB, ratios to plain); see step_cost.py for the method.
"""
from __future__ import annotations

import torch
from step_cost import arguments, loader_for, measure, plain, sgld

from bayestune_pyro.data import infinite_batches
from bayestune_pyro.engines.svi import elbo_step, make_guide
from bayestune_pyro.engines.vi import MeanField
from bayestune_pyro.inference.potential import Potential
from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.models.gamma_laplace import GammaLaplaceModel
from bayestune_pyro.models.lifted import LiftedBackbone


def vi(batches):
    """One step of engine vi: a draw z = μ + σ ⊙ ε, the potential's gradient at it, the ELBO's gradient, Adam."""
    lifted = LiftedBackbone(load_backbone("minilm-l6", 5))
    lifted.model.train()
    potential = Potential(GammaLaplaceModel(lifted))
    q = MeanField(potential, potential.init(1e-4), 1e-4, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([{"params": q.parameters("theta"), "lr": 1e-4},
                            {"params": q.parameters("lambda"), "lr": 1e-2},
                            {"params": lifted.head_parameters(), "lr": 1e-3}])

    def step():
        q.draw()
        q.gradient(next(batches))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def vi_pyro(batches):
    """One SVI step: a draw of (θ, log λ) from the guide, the ELBO through the Pyro trace, Adam on everything."""
    lifted = LiftedBackbone(load_backbone("minilm-l6", 5))
    lifted.model.train()
    model = GammaLaplaceModel(lifted)
    guide = make_guide(Potential(model), "normal", lambda_init=1e-4, init_scale=1e-4)
    guide(next(batches))
    opt = torch.optim.Adam([*guide.parameters(), *lifted.head_parameters()], lr=1e-4)
    return lambda: elbo_step(model, guide, opt, next(batches))


def main():
    args = arguments(__doc__)
    loader = loader_for(args)
    measure({
        "plain_adam": lambda: plain(infinite_batches(loader)),
        "sgld": lambda: sgld(infinite_batches(loader), "none"),
        "psgld": lambda: sgld(infinite_batches(loader), "rmsprop"),
        "map": lambda: sgld(infinite_batches(loader), "rmsprop", gamma=0.0, jacobian=False),
        "vi": lambda: vi(infinite_batches(loader)),
        "vi_pyro": lambda: vi_pyro(infinite_batches(loader)),
    }, args.steps)


if __name__ == "__main__":
    main()
