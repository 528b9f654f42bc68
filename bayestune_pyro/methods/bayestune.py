"""bayestune: the Gamma–Laplace posterior over the search space, sampled in stage 1 by an engine (``--inference``,
default sgld); the mask is the top-k posterior mean scales λ̂; stage 2 trains δ on it."""
from dataclasses import dataclass

from ..config import Options, check_at_least_one, check_positive, option
from ..inference.posterior import ESTIMATORS
from . import Method, register


@dataclass
class BayesTuneOptions(Options):
    """The prior (α, β), N̂, the start λ₀, the stage-1 learning rates and what the posterior keeps."""

    GRID = ("n_hat", "lr_lambda")

    alpha: float = option(0.01, "Gamma shape α of the prior on λ")
    beta: float = option(100.0, "Gamma rate β of the prior on λ (prior mean α/β)")
    n_hat: float | list[float] = option(1e9, "effective data size N̂ (likelihood weight); a list (1e8,1e10) is a "
                                        "grid chosen on validation, like --gamma")
    lambda_init: float = option(1e-4, "initial λ₀ of every coordinate")
    lr: float = option(1e-4, "stage-1 learning rate for θ (η = 2·lr/N̂)")
    lr_lambda: float | list[float] = option(1e-2, "stage-1 learning rate for log λ; a list is a grid, like --gamma")
    chains: int = option(1, "independent stage-1 chains (seeds seed, seed+1, …), run one after the other")
    n_tracked: int = option(256, "coordinates whose full traces are kept")
    delta_moments: bool = option(False, "also keep the posterior mean and variance of θ − θ̄ for every coordinate")
    checkpoint_every: int = option(100, "stage-1 checkpoint interval in steps")
    lambda_estimator: str | None = option(None, "λ̂ from the λ draws (draws) or the mean of E[λ | θ] over draws "
                                          "(rao-blackwell); default: rao-blackwell for a sampler, draws (the λ "
                                          "path) otherwise", choices=ESTIMATORS)

    def check(self):
        check_positive(self, "alpha", "beta", "n_hat", "lambda_init", "lr", "lr_lambda")
        check_at_least_one(self, "chains", "n_tracked", "checkpoint_every")
        if self.lambda_estimator is not None and self.lambda_estimator not in ESTIMATORS:
            raise ValueError(f"lambda_estimator: unknown value {self.lambda_estimator!r}; "
                             f"choose one of: {', '.join(ESTIMATORS)}")


register(Method("bayestune", "SGLD (or --inference) posterior of the Gamma–Laplace model, top-k by λ̂",
                BayesTuneOptions, posterior=True))
