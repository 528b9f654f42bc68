"""A separable toy of BayesTune's model whose posterior is known exactly, even at the paper's α = 0.01, β = 100.

d independent coordinates; coordinate i has θ̄_i and n_i Gaussian data y_i1..y_in_i ~ N(θ_i, σ²) with mean ȳ_i, so

    p(θ_i, λ_i | y) ∝ N(ȳ_i; θ_i, s_i²) · Laplace(θ_i; θ̄_i, λ_i) · Gamma(λ_i; α, β),   s_i = σ/√n_i.

- :class:`SeparableToy` holds the definition and builds the data; :func:`default_toy` is a spread of "signal",
  "weak" and "null" coordinates (|ȳ − θ̄| large, about one s, or about zero).
- :func:`reference` gives E[θ], sd[θ], E[λ], sd[λ], E[log λ], P(|Δ| < ε) and the spike share P(|Δ| < ε₀) per
  coordinate (Δ = θ − θ̄) by deterministic float64 quadrature, two independent ways (``method``):
  ``"bessel"`` integrates λ out in closed form (DESIGN.md's GIG conditional) and Δ adaptively (``scipy.quad``);
  ``"grid"`` integrates (log|Δ|, log λ) by composite Gauss–Legendre and never uses a Bessel function.
- :func:`sgld_separable` samples the toy through the product path, like ``testing/toy.py``'s logistic toy;
  :func:`agreement` scores its draws against the reference.

The spike. The marginal prior of Δ is p(Δ) = β^α/Γ(α)·(|Δ|/β)^((α−1)/2)·K_{α−1}(2√(β|Δ|)) ≈ C·|Δ|^(α−1) as Δ → 0,
C = β^α·Γ(1−α)/(2Γ(α)). At α = 0.01 its mass in |Δ| < ε is about ε^α (0.5 at ε = 1e-30): in u = log|Δ| the
density falls off as e^(αu), over ~1/α = 100 e-folds. Both methods integrate u ∈ [log ε₀, log(|m| + 40s)] on
each side of θ̄ (m = ȳ − θ̄) and add |Δ| < ε₀ in closed form, with the likelihood frozen at Δ = 0:

- bessel: prior ≈ C|Δ|^(α−1) there and E[log λ | Δ] ≈ log|Δ| − ψ(1−α) (the inverse-gamma limit of the GIG);
  for α > 1 the prior is ≈ p(0) = β/(2(α−1)) and λ | Δ ≈ Gamma(α−1, β). Δ, Δ², λ and λ² are taken as 0 there.
- grid: the exact λ-integral of the region, ∫ Gamma(λ)·(1 − e^(−ε₀/λ))·g(λ) dλ, below λ = ε₀e^(−4) by the
  incomplete gamma function (E[log λ] there to first order in βλ).

Truncation error, relative to each moment: from the frozen likelihood ≤ ε₀(|m| + ε₀)/s²; from the small-|Δ|
form of the prior ≤ |Γ(α−1)/Γ(1−α)|·(βε₀)^(1−α) + βε₀ (α < 1) or O(βε₀·log(βε₀)) (α > 1); the dropped
E[λ·1(|Δ|<ε₀)] ≤ P(|Δ|<ε₀)·E[λ | |Δ| = ε₀] (≈ 100·ε₀^0.99 at α = 0.01, β = 100) and the dropped Δ, Δ² terms
≤ P(|Δ|<ε₀)·ε₀, ·ε₀²; the cut at |Δ| = |m| + 40s drops a likelihood factor < e^(−800). At ε₀ = 1e-30 every bound
is below 1e-23 for the toys here, so only quadrature error remains (the two methods agree to ~1e-11).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import integrate, special
from scipy.stats import spearmanr
from torch import nn

from ..inference.potential import Potential
from ..inference.sgld import SGLD, SGLDConfig
from ..models.backbones import Backbone
from ..models.gamma_laplace import GammaLaplaceModel
from ..models.lambda_conditional import LambdaConditional
from ..models.lifted import LiftedBackbone
from .toy import summary

EPS0 = 1e-30
EPS = (1e-3, 1e-6, 1e-12, 1e-24)
TAIL = 40.0  # in posterior sds s past |m|: the likelihood there is below e^(−800)


@dataclass(frozen=True)
class SeparableToy:
    """d independent coordinates: ȳ_i, the mean of n_i points ~ N(θ_i, σ²); θ_i ~ Laplace(θ̄_i, λ_i);
    λ_i ~ Gamma(α, β)."""

    y_bar: tuple[float, ...]
    n: tuple[int, ...]
    sigma: float = 0.1
    alpha: float = 0.01
    beta: float = 100.0
    theta_bar: tuple[float, ...] = ()  # empty: all 0
    kinds: tuple[str, ...] = field(default=(), compare=False)  # labels for reports, e.g. "signal"

    @property
    def d(self) -> int:
        return len(self.y_bar)

    @property
    def size(self) -> int:
        """N = Σ n_i, the real data size (and N̂)."""
        return int(sum(self.n))

    @property
    def centre(self) -> np.ndarray:
        """θ̄."""
        return np.asarray(self.theta_bar or (0.0,) * self.d, dtype=np.float64)

    @property
    def s(self) -> np.ndarray:
        """The likelihood's sd in θ_i: σ/√n_i."""
        return self.sigma / np.sqrt(np.asarray(self.n, dtype=np.float64))

    def data(self, seed: int = 0) -> dict[str, torch.Tensor]:
        """N points {"x": coordinate index i_n, "labels": y_n}, the y of each coordinate shifted to mean exactly ȳ_i."""
        g = torch.Generator().manual_seed(seed)
        index = torch.repeat_interleave(torch.arange(self.d), torch.tensor(self.n))
        noise = torch.randn(self.size, generator=g, dtype=torch.float64) * self.sigma
        noise -= torch.zeros(self.d, dtype=torch.float64).index_add_(0, index, noise)[index] / torch.tensor(
            self.n, dtype=torch.float64)[index]
        labels = torch.tensor(self.y_bar, dtype=torch.float64)[index] + noise
        return {"x": index, "labels": labels.float()}


def default_toy(alpha: float = 0.01, beta: float = 100.0) -> SeparableToy:
    """Ten coordinates, σ = 0.1, θ̄ = 0: three signals (m/s = 21, −7, 3.5), three weak (2.1, −1.4, 0.7 s) and
    four nulls (|m| ≤ 0.1 s, n from 20 to 200), all with distinct data so the exact E[λ] has no ties."""
    y_bar = (0.3, -0.1, 0.05, 0.03, -0.02, 0.01, 0.001, -0.0005, 0.0, 0.0002)
    n = (50, 50, 50, 50, 50, 50, 20, 80, 200, 120)
    return SeparableToy(y_bar, n, alpha=alpha, beta=beta, kinds=("signal",) * 3 + ("weak",) * 3 + ("null",) * 4)


# ---------------------------------------------------------------------------------------------- exact reference

def reference(toy: SeparableToy, *, method: str = "bessel", eps0: float = EPS0,
              eps: tuple[float, ...] = EPS) -> dict[str, np.ndarray]:
    """Exact posterior moments per coordinate, in float64.

    Returns theta_mean, theta_sd, lambda_mean, lambda_sd, log_lambda_mean, spike (P(|Δ| < ε₀)) and
    log_evidence (log ∫ N(ȳ_i; θ, s_i²)·p(θ) dθ), each shaped (d,), and p_within (len(eps), d): P(|Δ| < ε) for
    each ε ≥ ε₀ in ``eps`` (also returned). ``method`` is "bessel" or "grid" (module docstring). α = 1, where
    p(Δ) has a log singularity at 0, is not covered.
    """
    if method not in ("bessel", "grid"):
        raise ValueError(f"method: unknown value {method!r}; choose one of: bessel, grid")
    if toy.alpha == 1:
        raise ValueError("alpha: 1 is not supported by the reference; use alpha < 1 or alpha > 1")
    if not all(e >= eps0 for e in eps):
        raise ValueError(f"eps: every ε must be >= eps0 = {eps0}, got {eps}")
    raw = _bessel if method == "bessel" else _grid
    out = [_moments(*raw(m, s, toy.alpha, toy.beta, eps0, eps))
           for m, s in zip(np.asarray(toy.y_bar) - toy.centre, toy.s)]
    res = {k: np.array([o[k] for o in out]) for k in out[0]}
    res["theta_mean"] = res["theta_mean"] + toy.centre
    res["p_within"], res["eps"] = res["p_within"].T, np.asarray(eps)
    return res


def _moments(main: np.ndarray, spike: np.ndarray, log_scale: float) -> dict:
    """Moments from the integrals of g = [1, Δ, Δ², λ, λ², log λ, 1(|Δ|<ε)…] over |Δ| ≥ ε₀ (``main``) and the
    spike's [mass, E[λ·1], E[λ²·1], E[log λ·1]], both in units of e^log_scale."""
    mass, lam, lam2, log_lam = spike
    total = main[0] + mass
    e = main / total
    return {"theta_mean": e[1], "theta_sd": math.sqrt(e[2] - e[1] ** 2),
            "lambda_mean": e[3] + lam / total, "lambda_sd": math.sqrt(e[4] + lam2 / total - (e[3] + lam / total) ** 2),
            "log_lambda_mean": e[5] + log_lam / total, "spike": mass / total, "p_within": e[6:] + mass / total,
            "log_evidence": log_scale + math.log(total)}


def _log_likelihood(delta, m: float, s: float):
    """log N(m; Δ, s²) + log(√(2π)·s): the constant is added back by :func:`_log_scale`."""
    return -0.5 * ((delta - m) / s) ** 2


def _log_scale(shift: float, s: float) -> float:
    return shift - 0.5 * math.log(2 * math.pi) - math.log(s)


def _u_points(m: float, s: float, eps: tuple[float, ...]) -> list[float]:
    """Where the integrand in u = log|Δ| changes character: the likelihood's bulk, its width, the indicators."""
    near = [abs(m) + k * s for k in range(-6, 7)]
    return [math.log(x) for x in [*near, s, *eps] if x > 0]


def _bessel(m: float, s: float, alpha: float, beta: float, eps0: float, eps: tuple[float, ...]):
    """Method (b), "bessel": λ integrated in closed form, then u = log|Δ| by adaptive quadrature on each side of θ̄."""

    def log_prior(a):
        z = 2 * np.sqrt(beta * a)
        return (alpha * math.log(beta) - math.lgamma(alpha) + 0.5 * (alpha - 1) * np.log(a / beta)
                + np.log(special.kve(alpha - 1, z)) - z)

    def conditional(a):
        """E[λ|Δ], E[λ²|Δ], E[log λ|Δ] of the GIG(α−1, 2β, 2|Δ|); ∂_p log K_p by a 4-point stencil."""
        z = 2 * np.sqrt(beta * a)
        k = special.kve(alpha - 1, z)
        h = 1e-3
        dlogk = sum(w * np.log(special.kve(alpha - 1 + j * h, z)) for j, w in ((-2, 1), (-1, -8), (1, 8), (2, -1)))
        dlogk /= 12 * h
        return (np.sqrt(a / beta) * special.kve(alpha, z) / k, a / beta * special.kve(alpha + 1, z) / k,
                0.5 * np.log(a / beta) + dlogk)

    def log_f(u, side):
        a = math.exp(u)
        return _log_likelihood(side * a, m, s) + log_prior(a) + u

    if alpha < 1:  # p(Δ) ≈ C|Δ|^(α−1), E[log λ | Δ] ≈ log|Δ| − ψ(1−α)
        log_c = alpha * math.log(beta) + math.lgamma(1 - alpha) - math.log(2) - math.lgamma(alpha)
        log_prior_mass = log_c + math.log(2 * eps0**alpha / alpha)
        log_lam = math.log(eps0) - 1 / alpha - special.digamma(1 - alpha)
    else:  # p(Δ) ≈ p(0) = β/(2(α−1)), λ | Δ → Gamma(α−1, β)
        log_prior_mass = math.log(beta / (alpha - 1) * eps0)
        log_lam = special.digamma(alpha - 1) - math.log(beta)
    log_spike = _log_likelihood(0.0, m, s) + log_prior_mass
    lo = math.log(eps0)
    sides = [(side, math.log(max(side * m, 0.0) + TAIL * s)) for side in (1.0, -1.0)]
    shift = max(log_spike, *(log_f(u, side) for side, hi in sides for u in np.linspace(lo, hi, 2000)))

    def integrand(u, side, j):
        a = math.exp(u)
        w = math.exp(log_f(u, side) - shift)
        if j < 3:
            return w * (side * a) ** j
        if j < 6:
            return w * conditional(a)[j - 3]
        return w * (a < eps[j - 6])

    main = np.zeros(6 + len(eps))
    for side, hi in sides:
        points = sorted(p for p in _u_points(m, s, eps) if lo < p < hi)
        for j in range(len(main)):
            main[j] += integrate.quad(integrand, lo, hi, args=(side, j), points=points, limit=1000,
                                      epsabs=0.0, epsrel=1e-12)[0]
    mass = math.exp(log_spike - shift)
    return main, np.array([mass, 0.0, 0.0, mass * log_lam]), _log_scale(shift, s)


_GL = np.polynomial.legendre.leggauss(16)


def _gauss_legendre(breaks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the composite 16-point rule over the panels between sorted ``breaks`` (last axis)."""
    a, b = breaks[..., :-1, None], breaks[..., 1:, None]
    x, w = _GL
    nodes = (a + b) / 2 + (b - a) / 2 * x
    weights = (b - a) / 2 * w
    return nodes.reshape(*breaks.shape[:-1], -1), weights.reshape(*breaks.shape[:-1], -1)


def _v_panels(log_a: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """Panel breaks in v = log λ for the integrand λ^(α−1)·e^(−βλ − |Δ|/λ) (per |Δ| = e^log_a, shape (..., K)):
    dense around its mode λ*, around λ = |Δ| and λ = 1/β where the two cut-offs act, coarse in between."""
    a = np.exp(log_a)
    r = np.sqrt((alpha - 1) ** 2 + 4 * beta * a)
    mode = ((alpha - 1) + r) / (2 * beta) if alpha >= 1 else 2 * a / (r - (alpha - 1))
    lo, hi = log_a - math.log(800.0), np.full_like(log_a, math.log(800.0 / beta))
    fine, coarse = np.arange(-8.0, 8.5, 1.0), np.arange(-8.0, 8.5, 4.0)
    breaks = np.concatenate([np.log(mode)[..., None] + fine, log_a[..., None] + coarse,
                             np.full_like(log_a, -math.log(beta))[..., None] + coarse,
                             lo[..., None] + (hi - lo)[..., None] * np.linspace(0, 1, 21)], -1)
    return np.sort(np.clip(breaks, lo[..., None], hi[..., None]), -1)


def _grid(m: float, s: float, alpha: float, beta: float, eps0: float, eps: tuple[float, ...]):
    """Method (a), "grid": the joint density in (u, v) = (log|Δ|, log λ) by composite Gauss–Legendre, no Bessel."""
    log_norm = alpha * math.log(beta) - math.lgamma(alpha) - math.log(2)  # Gamma × the Laplace's 1/2

    def log_joint(u, v):
        """log of Gamma(λ)·Laplace(Δ|λ)·|Δ|·λ (|Δ|, λ: the Jacobians of u, v); the caller adds the likelihood."""
        return log_norm + (alpha - 1) * v - beta * np.exp(v) - np.exp(u - v) + u

    lo = math.log(eps0)
    sides = []
    for side in (1.0, -1.0):
        hi = math.log(max(side * m, 0.0) + TAIL * s)
        u, wu = _gauss_legendre(np.unique(np.r_[np.arange(lo, hi, 1.0), hi,
                                                [p for p in _u_points(m, s, eps) if lo < p < hi]]))
        v, wv = _gauss_legendre(_v_panels(u, alpha, beta))
        a = np.exp(u)
        log_w = _log_likelihood(side * a, m, s)[:, None] + log_joint(u[:, None], v)
        of_delta = np.stack([np.ones_like(a), side * a, a**2, *((a < e).astype(float) for e in eps)])
        of_lambda = np.stack([np.ones_like(v), np.exp(v), np.exp(2 * v), v])
        sides.append((log_w, wu, wv, of_delta, of_lambda))

    # the spike |Δ| < ε₀: ∫ Gamma(λ)(1 − e^(−ε₀/λ))·[1, λ, λ², log λ] dλ, likelihood frozen at Δ = 0
    cut = math.log(eps0) - 4.0  # below λ = ε₀e^(−4) the factor 1 − e^(−ε₀/λ) is 1 to double precision
    vs, ws = _gauss_legendre(np.r_[cut + np.arange(0, 8.5, 0.5), np.linspace(cut + 9, math.log(800 / beta), 60)])
    log_s = (_log_likelihood(0.0, m, s) + log_norm + math.log(2) + alpha * vs - beta * np.exp(vs)
             + np.log(-np.expm1(-eps0 * np.exp(-vs))))
    lam_c = math.exp(cut)
    x = beta * lam_c
    tail = np.array([special.gammainc(alpha, x), alpha / beta * special.gammainc(alpha + 1, x),
                     alpha * (alpha + 1) / beta**2 * special.gammainc(alpha + 2, x),
                     math.exp(log_norm + math.log(2)) * lam_c**alpha * (cut / alpha - 1 / alpha**2)])
    log_tail = _log_likelihood(0.0, m, s)

    shift = max(*(side[0].max() for side in sides), log_s.max(), log_tail)
    main = np.zeros(6 + len(eps))
    for log_w, wu, wv, of_delta, of_lambda in sides:  # [1, Δ, Δ², 1(|Δ|<ε)…] and [1, λ, λ², log λ]
        inner = (np.exp(log_w - shift) * wv * of_lambda).sum(-1) * wu  # ∫ dv, times the u-weights
        main += np.r_[of_delta[:3] @ inner[0], inner[1:].sum(-1), of_delta[3:] @ inner[0]]
    w = np.exp(log_s - shift) * ws
    spike = np.array([w.sum(), (w * np.exp(vs)).sum(), (w * np.exp(2 * vs)).sum(), (w * vs).sum()])
    return main, spike + math.exp(log_tail - shift) * tail, _log_scale(shift, s)


# ------------------------------------------------------------------------------------------------ product path

class Coordinates(nn.Module):
    """θ of C independent chains, shape (C, d) (initially θ̄); data point n reads its coordinate x_n: output
    θ[:, x_n] of shape (C, n, 1), so the normal likelihood is Σ_n log N(y_n; θ_{x_n}, σ²) per chain."""

    def __init__(self, chains: int, theta_bar: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta_bar.expand(chains, -1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta[:, x].unsqueeze(-1)


def sgld_separable(toy: SeparableToy, *, lrs: dict[str, float], steps: int, burnin: int, thin: int, chains: int,
                   gibbs: bool = False, seed: int = 0, **kernel) -> dict[str, np.ndarray]:
    """Draws {"theta", "lambda", "lambda_rb"} of the toy, each (chain, draw, d), through the product path.

    ``Coordinates`` → ``Backbone`` → ``LiftedBackbone`` → ``GammaLaplaceModel`` (normal likelihood, σ, N̂ = N)
    → ``Potential`` → ``SGLD``. ``kernel`` holds :class:`SGLDConfig` fields; if ``freeze_preconditioner`` (the
    config's default) the rmsprop preconditioner is frozen (:meth:`SGLD.freeze`) at the end of burn-in. ``lrs``
    has one lr per site, "theta" and "lambda" (log λ). ``gibbs=True`` is Gibbs-within-SGLD: an SGLD step of θ,
    then λ redrawn exactly from λ | θ ~ GIG(α−1, 2β, 2|θ − θ̄|) (``LambdaConditional.sample``); the "lambda" lr is
    then unused.
    "lambda_rb" is E[λ | θ] at each draw, whose mean is the Rao-Blackwellised λ̂. Draws are float64 (λ = e^(log λ)
    taken there, so no underflow); the sites are the product's float32. Chains start at
    θ = θ̄ + 0.1·ξ, log λ = log(α/β) + ξ; all steps use the full data.
    """
    g = torch.Generator().manual_seed(seed)
    data, d = toy.data(), toy.d
    theta_bar = torch.tensor(toy.centre, dtype=torch.float32)
    lifted = LiftedBackbone(Backbone(Coordinates(chains, theta_bar), head_names=[], kind="tensor", source="toy"))
    potential = Potential(GammaLaplaceModel(lifted, alpha=toy.alpha, beta=toy.beta, n_hat=toy.size,
                                            likelihood="normal", sigma=toy.sigma))
    z = potential.init(toy.alpha / toy.beta)
    with torch.no_grad():
        z["theta"].add_(torch.randn(z["theta"].shape, generator=g), alpha=0.1)
        z["lambda"].add_(torch.randn(z["lambda"].shape, generator=g))
    conditional = LambdaConditional(toy.alpha, toy.beta)
    sites = {"theta": z["theta"]} if gibbs else z
    sampler = SGLD(SGLDConfig(n_hat=toy.size, **kernel), sites, g)
    draws = []
    for t in range(steps):
        if t == burnin and sampler.config.freeze_preconditioner:
            sampler.freeze()
        _, grads = potential.gradient(z, data)
        sampler.step(sites, {k: grads[k] for k in sites}, lrs)
        keep = t >= burnin and (t - burnin) % thin == 0
        if gibbs or keep:
            abs_delta = (z["theta"] - lifted.theta_bar).abs()
        if gibbs:
            torch.log(conditional.sample(abs_delta, g), out=z["lambda"])
        if keep:
            state = (z["theta"], z["lambda"], conditional.mean(abs_delta))
            draws.append([v.view(chains, d).double() for v in state])
    potential.release()
    theta, log_lam, rb = (torch.stack(v, 1).numpy() for v in zip(*draws))
    return {"theta": theta, "lambda": np.exp(log_lam), "lambda_rb": rb}


def agreement(toy: SeparableToy, draws: dict[str, np.ndarray], exact: dict[str, np.ndarray], k: int = 3) -> dict:
    """How draws of ``toy`` (:func:`sgld_separable`) compare with its :func:`reference`, per coordinate and as
    rankings.

    Over the chains that stayed finite (``diverged_chains`` counts the others):
    z_theta, z_lambda, z_lambda_rb   (draw mean − exact mean) / ArviZ MCSE, per coordinate; "lambda_rb" is the
                                     Rao-Blackwellised λ̂, "lambda" the plain draw mean
    z_theta_var, z_lambda_var        the same for the variance: the draw mean of (x − exact mean)² against exact sd²
    sd_theta, sd_lambda              sd / exact sd, per coordinate
    log_lambda_bias                  mean log λ over draws − exact E[log λ], per coordinate (nats)
    within_gap                       share of draws with |Δ| < ε − exact P(|Δ| < ε), ε the reference's first
    spearman, spearman_rb            Spearman ρ of λ̂ (plain, RB) with the exact E[λ] over the d coordinates
    topk, topk_rb                    share of the exact top-k coordinates by E[λ] that λ̂ puts in its top k
                                     (BayesTune's stage-2 mask)
    rhat_max, ess_min                over θ and λ
    """
    finite = np.all([np.isfinite(v).all((1, 2)) for v in draws.values()], axis=0)
    out = {"diverged_chains": int((~finite).sum())}
    if finite.sum() < 2:
        return out
    draws = {key: v[finite] for key, v in draws.items()}
    squares = {f"{site}_var": (draws[site] - exact[f"{site}_mean"]) ** 2 for site in ("theta", "lambda")}
    stats = summary({**draws, **squares, "log_lambda": np.log(draws["lambda"])})
    top = set(np.argsort(-exact["lambda_mean"])[:k])
    for name, site, moment in (("z_theta", "theta", exact["theta_mean"]), ("z_lambda", "lambda", exact["lambda_mean"]),
                               ("z_lambda_rb", "lambda_rb", exact["lambda_mean"]),
                               ("z_theta_var", "theta_var", exact["theta_sd"] ** 2),
                               ("z_lambda_var", "lambda_var", exact["lambda_sd"] ** 2)):
        out[name] = (stats[site]["mean"] - moment) / stats[site]["mcse"]
    out["sd_theta"] = stats["theta"]["sd"] / exact["theta_sd"]
    out["sd_lambda"] = stats["lambda"]["sd"] / exact["lambda_sd"]
    out["log_lambda_bias"] = stats["log_lambda"]["mean"] - exact["log_lambda_mean"]
    within = (np.abs(draws["theta"] - toy.centre) < exact["eps"][0]).mean((0, 1))
    out["within_gap"] = within - exact["p_within"][0]
    for suffix, site in (("", "lambda"), ("_rb", "lambda_rb")):
        estimate = stats[site]["mean"]
        out[f"spearman{suffix}"] = float(spearmanr(estimate, exact["lambda_mean"])[0])
        out[f"topk{suffix}"] = len(top & set(np.argsort(-estimate)[:k])) / k
    out["rhat_max"] = float(max(stats[s]["rhat"].max() for s in ("theta", "lambda")))
    out["ess_min"] = float(min(stats[s]["ess"].min() for s in ("theta", "lambda")))
    return out
