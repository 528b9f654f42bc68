"""Our stage-1 step next to the SGLD a user would take instead: posteriors' ``sgmcmc.sgld``, in the same run.

    pip install posteriors        # in the benchmark's environment only; the package does not depend on it
    python benchmarks/peer_cost.py [--steps 12] [--batch-size 16] [--max-length 64] [--threads 2]

Variants, on the offline-default backbone (MiniLM-L6) and the same bbc-news minibatches (see step_cost.py for
how time and memory are measured):
- plain_adam       forward, backward, torch.optim.Adam over every parameter;
- psgld            our default stage-1 step: (θ, log λ) under the Gamma–Laplace prior, fused passes;
- posteriors_sgld  posteriors' SGLD over every parameter of the network, the likelihood through
                   ``torch.func.functional_call`` and a Laplace prior around θ̄ at a fixed scale λ₀ (posteriors
                   has no hierarchical prior, so it samples θ only: half of our state), in the scaling its docs
                   recommend (mean log-likelihood + log prior / N̂, temperature 1/N̂), updated in place.
"""
from __future__ import annotations

import posteriors
import torch
from step_cost import arguments, loader_for, measure, plain, sgld
from torch.func import functional_call

from bayestune_pyro.data import infinite_batches
from bayestune_pyro.models.backbones import load_backbone

N_HAT, LAMBDA_0, LR = 1e9, 1e-4, 1e-4


def posteriors_sgld(batches):
    """One step of posteriors' SGLD: grad_and_value of the log posterior, then θ ← θ + lr·∇ + √(2·lr·T)·ξ."""
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
    measure({
        "plain_adam": lambda: plain(infinite_batches(loader)),
        "psgld": lambda: sgld(infinite_batches(loader), "rmsprop"),
        "posteriors_sgld": lambda: posteriors_sgld(infinite_batches(loader)),
    }, args.steps)


if __name__ == "__main__":
    main()
