"""λ | θ ~ GIG(α − 1, 2β, 2|Δ|): the tabulated mean against Bessel functions and quadrature, the sampler against
scipy's GIG, and the Gibbs step against the Gamma–Laplace prior it comes from."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from scipy.special import kve

import bayestune_pyro.models.lambda_conditional as lc_module
from bayestune_pyro.models.lambda_conditional import MIN_ABS_DELTA, U_MAX, U_MIN, LambdaConditional

PARAMS = [(0.01, 100.0), (2.0, 20.0)]
F64 = torch.float64


def bessel_mean(alpha, beta, d):
    z = 2.0 * np.sqrt(beta * d)
    return np.sqrt(d / beta) * kve(alpha, z) / kve(alpha - 1.0, z)


def bessel_second_moment(alpha, beta, d):
    z = 2.0 * np.sqrt(beta * d)
    return d / beta * kve(alpha + 1.0, z) / kve(alpha - 1.0, z)


def quadrature_mean(alpha, beta, d):
    """∫ λ·f / ∫ f for f(λ) = λ^(α−2) exp(−βλ − d/λ), integrated in s = log λ around the mode."""
    def log_f(s, power):  # log of λ^power·f(λ)·dλ/ds
        return (alpha - 1.0 + power) * s - beta * math.exp(s) - d * math.exp(-s)

    lo, hi = math.log(d / 200.0), math.log(200.0 / beta)
    grid = np.linspace(lo, hi, 2001)
    results = []
    for power in (0, 1):
        peak = max(log_f(s, power) for s in grid)

        def f(s, power=power, peak=peak):
            return math.exp(log_f(s, power) - peak)

        value, _ = integrate.quad(f, lo, hi, limit=2000,
                                  points=[grid[np.argmax([log_f(s, power) for s in grid])]], epsabs=0, epsrel=1e-11)
        results.append(math.log(value) + peak)
    return math.exp(results[1] - results[0])


def gig(alpha, beta, d):
    """scipy's GIG(p = α − 1, a = 2β, b = 2d) = √(b/a)·geninvgauss(p, √(ab))."""
    a, b = 2.0 * beta, 2.0 * d
    return stats.geninvgauss(alpha - 1.0, math.sqrt(a * b), scale=math.sqrt(b / a))


def gig_cdf(dist, sample):
    """The CDF of ``dist`` on the sample's range: its pdf integrated on a fine log grid (geninvgauss.cdf integrates
    once per point, far too slow for 10^5 points). The mass outside the grid must be negligible."""
    log_x = np.linspace(math.log(sample.min()) - 3.0, math.log(sample.max()) + 3.0, 200_001)
    x = np.exp(log_x)
    density = dist.pdf(x) * x  # per unit of log x
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2.0 * np.diff(log_x))])
    assert cdf[-1] == pytest.approx(1.0, abs=1e-6)
    return lambda points: np.interp(np.log(points), log_x, cdf)


# ---------------------------------------------------------------------------------------------------------- mean

@pytest.mark.parametrize("alpha,beta", PARAMS + [(1.0, 100.0), (0.5, 3.0), (7.3, 0.5)])
def test_mean_matches_the_bessel_formula_on_random_points(alpha, beta):
    g = torch.Generator().manual_seed(0)
    d = 10.0 ** (torch.rand(20_000, generator=g, dtype=F64) * 15.0 - 12.0)  # 1e-12 … 1e3, log-uniform
    expected = bessel_mean(alpha, beta, d.numpy())
    got = LambdaConditional(alpha, beta, dtype=F64).mean(d).numpy()
    assert np.abs(got / expected - 1.0).max() < 1e-5
    got32 = LambdaConditional(alpha, beta).mean(d.float()).double().numpy()
    assert np.abs(got32 / expected - 1.0).max() < 1e-4


def test_mean_reference_values():
    lc = LambdaConditional(0.01, 100.0, dtype=F64)
    got = lc.mean(torch.tensor([1e-5, 1e-3, 1.0], dtype=F64))
    assert torch.allclose(got, torch.tensor([5.9717e-05, 1.9408e-03, 9.7637e-02], dtype=F64), rtol=1e-4)


@pytest.mark.parametrize("alpha,beta", PARAMS)
@pytest.mark.parametrize("d", [1e-8, 1e-5, 1e-3, 1e-1, 1.0, 10.0])
def test_mean_matches_quadrature(alpha, beta, d):
    got = LambdaConditional(alpha, beta, dtype=F64).mean(torch.tensor([d], dtype=F64)).item()
    assert got == pytest.approx(quadrature_mean(alpha, beta, d), rel=1e-5)


def test_mean_is_monotone_with_the_asymptotic_slopes():
    alpha, beta = 0.01, 100.0
    lc = LambdaConditional(alpha, beta, dtype=F64)
    d = torch.logspace(-60, 12, 20_001, dtype=F64)
    m = lc.mean(d)
    assert (m.diff() > 0).all()
    slope = torch.log(m).diff() / torch.log(d).diff()
    below, above = d[1:] < U_MIN / beta, d[:-1] > U_MAX / beta
    assert torch.allclose(slope[below], torch.tensor(1.0 - alpha, dtype=F64), atol=1e-9)
    assert torch.allclose(slope[above], torch.tensor(0.5, dtype=F64), atol=1e-9)
    # Inside the table the slope moves between them; |Δ| → 0 approaches 1 − α only like |Δ|^α (K_α ~ K_0 at α → 0).
    assert 0.97 < slope[d[1:] < 1e-40].min() and slope.max() < 1.0 - alpha + 1e-6
    # E ≈ √(|Δ|/β)·(1 + (2α − 1)/(4√(β|Δ|))): 2.4e-6 below √(|Δ|/β) at |Δ| = 1e8, 2.4e-7 in the limit
    assert lc.mean(torch.tensor([1e8], dtype=F64)).item() == pytest.approx(bessel_mean(alpha, beta, 1e8), rel=1e-7)
    assert lc.mean(torch.tensor([1e20], dtype=F64)).item() == pytest.approx(1e9, rel=3e-7)
    # Continuous across both ends of the table.
    for edge in (U_MIN / beta, U_MAX / beta):
        pair = lc.mean(torch.tensor([edge * (1 - 1e-9), edge * (1 + 1e-9)], dtype=F64))
        assert pair[0].item() == pytest.approx(pair[1].item(), rel=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_mean_at_zero_huge_and_nan(dtype):
    huge = torch.finfo(dtype).max
    special = torch.tensor([0.0, 1e-300 if dtype == F64 else 1e-45, 1e30, huge, math.inf, math.nan], dtype=dtype)
    m = LambdaConditional(0.01, 100.0, dtype=dtype).mean(special)
    assert m[0].item() == 0.0
    assert (m[1:4] > 0).all() and torch.isfinite(m[1:4]).all()
    assert m[3].item() == pytest.approx(math.sqrt(huge / 100.0), rel=1e-4)
    assert m[4].item() == math.inf and math.isnan(m[5].item())
    m2 = LambdaConditional(2.0, 20.0, dtype=dtype).mean(special)  # proper at Δ = 0: Gamma(α − 1, β), mean (α − 1)/β
    assert m2[0].item() == pytest.approx(1.0 / 20.0, rel=1e-6) and torch.isfinite(m2[:4]).all()


def test_mean_out_argument_and_shapes():
    lc = LambdaConditional(0.01, 100.0)
    d = torch.rand(3, 50) * 1e-2
    expected = lc.mean(d)
    assert expected.shape == d.shape
    out = torch.full_like(d, math.nan)
    assert lc.mean(d, out=out) is out and torch.equal(out, expected)
    same = d.clone()
    lc.mean(same, out=same)  # in place
    assert torch.equal(same, expected)
    with pytest.raises(ValueError, match="abs_delta: expected a torch.float32"):
        lc.mean(d.double())


def test_bad_hyper_parameters_are_named():
    with pytest.raises(ValueError, match="alpha: must be a positive finite number"):
        LambdaConditional(0.0, 1.0)
    with pytest.raises(ValueError, match="beta: must be a positive finite number"):
        LambdaConditional(1.0, math.inf)


# -------------------------------------------------------------------------------------------------------- sample

@pytest.mark.parametrize("alpha,beta", PARAMS)
@pytest.mark.parametrize("d", [1e-8, 1e-3, 1.0, 100.0])
def test_sample_matches_gig(alpha, beta, d):
    n = 400_000  # at 100k a 2% error in ν or a 0.05 slack in the acceptance test passes; at 400k neither does
    g = torch.Generator().manual_seed(1)
    draws = LambdaConditional(alpha, beta, dtype=F64).sample(torch.full((n,), d, dtype=F64), g).numpy()
    assert np.isfinite(draws).all() and (draws > 0).all()
    mean, second = bessel_mean(alpha, beta, d), bessel_second_moment(alpha, beta, d)
    assert abs(draws.mean() - mean) < 5.0 * math.sqrt((second - mean ** 2) / n)
    assert stats.kstest(draws, gig_cdf(gig(alpha, beta, d), draws)).pvalue > 1e-3


@pytest.mark.parametrize("d", [1e-3, 1.0])
def test_sample_matches_gig_in_float32(d):
    g = torch.Generator().manual_seed(2)
    draws = LambdaConditional(0.01, 100.0).sample(torch.full((200_000,), d), g).double().numpy()
    assert stats.kstest(draws, gig_cdf(gig(0.01, 100.0, d), draws)).pvalue > 1e-3


@pytest.mark.parametrize("alpha,beta", [(2.0, 20.0), (0.5, 3.0)])
def test_gibbs_step_leaves_the_gamma_prior_invariant(alpha, beta):
    """λ ~ Gamma(α, β), θ − θ̄ | λ ~ Laplace(0, λ) as in the Pyro model; then λ' | θ must again be Gamma(α, β), and
    the Rao-Blackwellised E[λ | θ] must average to α/β."""
    n = 200_000
    torch.manual_seed(3)
    lam = torch.distributions.Gamma(torch.tensor(alpha, dtype=F64), torch.tensor(beta, dtype=F64)).sample((n,))
    delta = torch.distributions.Laplace(torch.zeros(n, dtype=F64), lam).sample().abs()
    lc = LambdaConditional(alpha, beta, dtype=F64)
    redraw = lc.sample(delta, torch.Generator().manual_seed(4)).numpy()
    assert stats.kstest(redraw, stats.gamma(alpha, scale=1.0 / beta).cdf).pvalue > 1e-3
    rao_blackwell = lc.mean(delta).numpy()
    assert abs(rao_blackwell.mean() - alpha / beta) < 5.0 * rao_blackwell.std() / math.sqrt(n)


def test_sample_is_reproducible_and_positive_everywhere():
    special = torch.tensor([0.0, 1e-45, 1e-30, MIN_ABS_DELTA, 1e-6, 1.0, 1e6, 3e38]).repeat(5_000)
    for alpha, beta in PARAMS + [(1.0, 100.0)]:
        lc = LambdaConditional(alpha, beta)
        a = lc.sample(special, torch.Generator().manual_seed(5))
        b = lc.sample(special, torch.Generator().manual_seed(5))
        c = lc.sample(special, torch.Generator().manual_seed(6))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert torch.isfinite(a).all() and (a > 0).all()
    # Below the floor |Δ| is MIN_ABS_DELTA: the same seed gives the same draws.
    lc = LambdaConditional(0.01, 100.0, dtype=F64)
    zeros, floor = torch.zeros(1000, dtype=F64), torch.full((1000,), MIN_ABS_DELTA, dtype=F64)
    assert torch.equal(lc.sample(zeros, torch.Generator().manual_seed(7)),
                       lc.sample(floor, torch.Generator().manual_seed(7)))


def test_sample_rounds_chunks_out_and_nan(monkeypatch):
    """Several chunks and several rounds fill every coordinate of ``out``; NaN stays NaN without looping."""
    monkeypatch.setattr(lc_module, "CHUNK", 1000)
    lc = LambdaConditional(0.01, 100.0)
    d = 10.0 ** (torch.rand(2, 4_321, generator=torch.Generator().manual_seed(8)) * 12.0 - 10.0)
    d[0, 7] = math.nan
    out = torch.full_like(d, -1.0)
    assert lc.sample(d, torch.Generator().manual_seed(9), out=out) is out
    assert math.isnan(out[0, 7].item())
    rest = torch.cat([out[0, :7], out[0, 8:], out[1]])
    assert torch.isfinite(rest).all() and (rest > 0).all()
    monkeypatch.setattr(lc_module, "MAX_ROUNDS", 1)
    with pytest.raises(RuntimeError, match="still rejected after 1 rounds"):
        lc.sample(d, torch.Generator().manual_seed(9))


@pytest.mark.parametrize("alpha,beta", PARAMS + [(1.0, 100.0), (0.5, 3.0), (50.0, 1.0)])
def test_acceptance_rate_is_bounded_away_from_zero(alpha, beta):
    """Devroye's hat keeps the rejection sampler efficient from |Δ| = 1e-14 (floored) to 1e8 (measured ≥ 0.83)."""
    d = torch.logspace(-14, 8, 45, dtype=F64)
    _, accepted = LambdaConditional(alpha, beta, dtype=F64)._propose(d.repeat_interleave(4_000),
                                                                      torch.Generator().manual_seed(10))
    assert accepted.double().view(45, -1).mean(1).min() > 0.75
