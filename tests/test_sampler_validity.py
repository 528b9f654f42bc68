"""Fast versions of ``benchmarks/sampler_validity.py``: the SGLD and SGHMC kernels sample the right posterior.

The logistic toy (α = 2, β = 20, N̂ = N, through the product path) against NUTS, a deliberately wrong temperature
that must be caught, and the γ² and 1/N̂ scaling of the variance on a Gaussian with a closed-form posterior.
Shorter chains and larger steps than the benchmark's: their bias, a few hundredths of a posterior sd, is inside
these looser tolerances.
"""
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
import torch

from bayestune_pyro.testing import toy

DATA = toy.logistic_data()
PLAIN = dict(preconditioner="none", lrs={"theta": 0.025, "lambda": 0.5, "b": 0.04}, steps=4000, burnin=1500)
RUNS = {
    "sgld": PLAIN,
    "sgld_minibatch": {**PLAIN, "batch_size": 50},
    # pSGLD burns in longer: its slow preconditioner (default ρ = 0.9999) must forget the dispersed start
    "psgld": dict(preconditioner="rmsprop", lrs={"theta": 4e-3, "lambda": 1.6e-2, "b": 4e-3}, steps=4000, burnin=2000),
    "sgld_gamma_half": {**PLAIN, "gamma": 0.5, "steps": 2500, "burnin": 1000},  # tempered: the wrong posterior
    # SGHMC at friction α takes lr = α·(SGLD's lr): the same drift per unit of momentum decay
    "sghmc": {**PLAIN, "friction": 0.2, "lrs": {k: 0.2 * v for k, v in PLAIN["lrs"].items()}},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def draws():
    """(NUTS draws, divergences) and SGLD draws per run; NUTS runs in a second process beside the SGLD chains."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        nuts = pool.submit(toy.nuts_logistic, toy.for_subprocess(DATA), alpha=2.0, beta=20.0, chains=2, warmup=300,
                           samples=500)
        sgld = {name: toy.sgld_logistic(DATA, alpha=2.0, beta=20.0, chains=128, thin=10, **run)
                for name, run in RUNS.items()}
        return nuts.result(), sgld


def test_nuts_reference_is_trustworthy(draws):
    """The benchmark asserts R-hat ≤ 1.01 at ESS ≈ 1800; at this run's ESS ≈ 500 the worst of the 25 R-hats
    scatters around 1.01 (1.010–1.013 measured over run sizes), so the bound here is 1.02."""
    (reference, divergences), _ = draws
    assert divergences == 0
    assert toy.diagnostics(toy.summary(reference))["rhat_max"] <= 1.02


@pytest.mark.parametrize("name", ["sgld", "sgld_minibatch", "psgld", "sghmc"])
def test_sgld_matches_nuts(draws, name):
    (reference, _), sgld = draws
    stats = toy.agreement(sgld[name], reference)
    if name == "psgld":
        # pSGLD at this length and step is biased in the heavy right tail of the null coordinates' λ: by 0.11 to
        # 0.21 posterior sd over seeds 0–5 (max z 2.8–5.1), the same with the preconditioner frozen or adapting
        # and with one noise stream or sixteen; so its bound is on the bias in sds, not on z
        assert stats["bias_max"] <= 0.25, stats
    else:
        assert stats["z_max"] <= 3.0, stats
    assert stats["sd_err"] <= 0.2, stats


def test_a_wrong_temperature_is_caught(draws):
    """γ = 0.5 samples the posterior at T = ¼: every posterior sd comes out about half of NUTS's."""
    (reference, _), sgld = draws
    stats = toy.agreement(sgld["sgld_gamma_half"], reference)
    assert stats["sd_ratio"][1] < 0.8, stats


@pytest.mark.parametrize("kernel", ["none", "rmsprop"])
def test_gaussian_variance_scales_with_temperature_and_inverse_n_hat(kernel):
    base = toy.gaussian_moments(n_hat=100.0, gamma=1.0, preconditioner=kernel, seed=1)
    cold = toy.gaussian_moments(n_hat=100.0, gamma=0.5, preconditioner=kernel, seed=2)
    big = toy.gaussian_moments(n_hat=200.0, gamma=1.0, preconditioner=kernel, seed=3)
    for mean, _ in (base, cold, big):
        assert abs(mean) < 0.02  # in posterior sds, averaged over the 2000 copies
    # in units of γ²s²/N̂ each, so var(γ = ½)/var(γ = 1) = ¼ and var(2N̂)/var(N̂) = ½ hold iff these ratios are 1
    assert cold[1] / base[1] == pytest.approx(1.0, rel=0.05)
    assert big[1] / base[1] == pytest.approx(1.0, rel=0.05)
    if kernel == "none":  # pSGLD's missing Γ term inflates the variance by ~5% here (reported by the benchmark)
        assert base[1] == pytest.approx(1.0, rel=0.05)
