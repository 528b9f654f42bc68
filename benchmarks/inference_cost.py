"""Cost of each inference engine per stage-1 step, relative to plain fine-tuning, measured in the same process.

    pip install posteriors        # optional, in the benchmark's environment only: adds the posteriors_sgld row
    python benchmarks/inference_cost.py [--steps 12] [--batch-size 16] [--max-length 64] [--threads 2]

Variants, all on the offline-default backbone (MiniLM-L6) and the same bbc-news minibatches:
plain Adam fine-tuning; SGLD (no preconditioner); pSGLD (rmsprop); MAP (the kernel with γ = 0, rmsprop);
VI (engine ``vi``: the mean-field guide on flat buffers, the one-draw ELBO gradient in closed form, Adam);
VI through Pyro (engine ``vi-pyro``: Trace_ELBO with an AutoNormal guide over θ and log λ, Adam over the guide and
the head);
posteriors' ``sgmcmc.sgld``, the SGLD a user would take instead (row ``posteriors_sgld``, when posteriors is
installed): every parameter of the network, the likelihood through ``torch.func.functional_call`` and a Laplace prior
around θ̄ at a fixed scale λ₀ (posteriors has no hierarchical prior, so it samples θ only: half of our state), in
the scaling its docs recommend (mean log-likelihood + log prior / N̂, temperature 1/N̂), updated in place.
Prints one JSON line per variant (median seconds, peak MB, ratios to plain); see step_cost.py for the method.
"""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import torch
from step_cost import arguments, loader_for, measure, plain, sgld
from torch.func import functional_call

from bayestune_pyro.data import infinite_batches
from bayestune_pyro.engines.svi import elbo_step, make_guide
from bayestune_pyro.engines.vi import MeanFieldKernel
from bayestune_pyro.inference.potential import Potential
from bayestune_pyro.methods.bayestune import BayesTuneOptions
from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.models.gamma_laplace import GammaLaplaceModel
from bayestune_pyro.models.lifted import LiftedBackbone

N_HAT, LAMBDA_0, LR = 1e9, 1e-4, 1e-4


def vi(batches):
    """One step of engine vi's own kernel: a draw z = μ + σ ⊙ ε, the potential's gradient at it, the ELBO's
    gradient, Adam."""
    lifted = LiftedBackbone(load_backbone("minilm-l6", 5))
    setup = SimpleNamespace(lifted=lifted, model=GammaLaplaceModel(lifted), config=SimpleNamespace(head_lr=1e-3))
    kernel = MeanFieldKernel(setup, BayesTuneOptions(), init_scale=1e-4, seed=0)
    kernel.setup(next(batches))
    return lambda: kernel.step(next(batches), "sampling")


def vi_pyro(batches):
    """One SVI step: a draw of (θ, log λ) from the guide, the ELBO through the Pyro trace, Adam on everything."""
    lifted = LiftedBackbone(load_backbone("minilm-l6", 5))
    lifted.model.train()
    model = GammaLaplaceModel(lifted)
    guide = make_guide(Potential(model), "normal", lambda_init=1e-4, init_scale=1e-4)
    guide(next(batches))
    opt = torch.optim.Adam([*guide.parameters(), *lifted.head_parameters()], lr=1e-4)
    return lambda: elbo_step(model, guide, opt, next(batches))


def posteriors_sgld(batches):
    """One step of posteriors' SGLD: grad_and_value of the log posterior, then θ ← θ + lr·∇ + √(2·lr·T)·ξ."""
    import posteriors

    backbone = load_backbone("minilm-l6", 5)
    model = backbone.model.train()
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    prior_centre = {k: p.clone() for k, p in params.items()}

    def log_posterior(params, batch):
        logits = functional_call(model, params, kwargs=backbone.inputs(batch)[1]).logits
        log_lik = -torch.nn.functional.cross_entropy(logits, batch["labels"])
        log_prior = -sum(((p - prior_centre[k]).abs() / LAMBDA_0).sum() for k, p in params.items())
        return log_lik + log_prior / N_HAT, logits

    transform = posteriors.sgmcmc.sgld.build(log_posterior, lr=LR, temperature=1.0 / N_HAT)
    state = transform.init(params)

    def step():
        transform.update(state, next(batches), inplace=True)

    return step


def main():
    args = arguments(__doc__)
    loader = loader_for(args)
    variants = {
        "plain_adam": lambda: plain(infinite_batches(loader)),
        "sgld": lambda: sgld(infinite_batches(loader), "none"),
        "psgld": lambda: sgld(infinite_batches(loader), "rmsprop"),
        "map": lambda: sgld(infinite_batches(loader), "rmsprop", gamma=0.0, jacobian=False),
        "vi": lambda: vi(infinite_batches(loader)),
        "vi_pyro": lambda: vi_pyro(infinite_batches(loader)),
    }
    if importlib.util.find_spec("posteriors") is None:
        print("posteriors_sgld: skipped (pip install posteriors to measure it)")
    else:
        variants["posteriors_sgld"] = lambda: posteriors_sgld(infinite_batches(loader))
    measure(variants, args.steps)


if __name__ == "__main__":
    main()
