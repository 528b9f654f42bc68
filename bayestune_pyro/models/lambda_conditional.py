"""The full conditional of λ in BayesTune's Gamma–Laplace prior: its mean (a Rao-Blackwellised λ̂) and exact draws.

With λ_i ~ Gamma(α, β) (rate β) and θ_i | λ_i ~ Laplace(θ̄_i, λ_i), and the data never touching λ,

    p(λ_i | θ_i) ∝ λ_i^(α−2) exp(−βλ_i − |Δ_i|/λ_i),   Δ_i = θ_i − θ̄_i,

i.e. λ_i | θ_i ~ GIG(p = α − 1, a = 2β, b = 2|Δ_i|), with mean

    E[λ_i | Δ_i] = √(|Δ_i|/β) · K_α(2√(β|Δ_i|)) / K_{α−1}(2√(β|Δ_i|)).

Both operations are elementwise torch work on the input's device, for d up to 10^8 and beyond.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import kve

from ..inference import fused

# Range of the mean's table in the scale-free variable u = β|Δ| (E[λ|Δ] = h_α(β|Δ|)/β): down to 1e-46 so that for
# β ≥ 0.08 every positive float32 |Δ| (subnormals included) is inside it; up to 1e12, where the large-|Δ| asymptote
# √(|Δ|/β) is reached to a relative 2.5e-7·|2α − 1|.
U_MIN, U_MAX = 1e-46, 1e12
TABLE_SIZE = 16384  # grid step 0.008 in log|Δ|: linear-interpolation error in log E below 1e-6 (checked in tests)

# sample: at Δ = 0 the conditional λ^(α−2) e^(−βλ) is improper for α ≤ 1, and as |Δ| → 0 the draws collapse towards
# λ = 0 (λ ≈ |Δ|·(a heavy-tailed variate) for α < 1), which float underflow would turn into λ = 0 and log λ = −inf.
# So sample treats |Δ| < MIN_ABS_DELTA as MIN_ABS_DELTA; the draws then stay ≳ 1e-14 (for α > 1 the exact law at
# Δ = 0, Gamma(α − 1, β), differs from it only by its mass below ~1e-12).
MIN_ABS_DELTA = 1e-12
CHUNK = 1 << 20  # sample works through chunks of this many coordinates: bounded scratch (~30 chunk-sized tensors)
MAX_ROUNDS = 100  # the acceptance rate is ≥ 0.83 for every |Δ| (tested ≥ 0.75): 100 rounds never run out in practice

_COSH1_M1 = math.cosh(1.0) - 1.0


def _log_reduced_mean(alpha: float, log_u: np.ndarray) -> np.ndarray:
    """log h_α(u) = log(β·E[λ|Δ]) = ½ log u + log K_α(z)/K_{α−1}(z), z = 2√u, in float64.

    The Bessel ratio starts from orders in [−1, 1] (no overflow at tiny z) and climbs to α with the stable upward
    recurrence K_{ν+1} = K_{ν−1} + (2ν/z) K_ν, written for ratios r_ν = K_{ν+1}/K_ν: r_ν = 1/r_{ν−1} + 2ν/z.
    """
    z = 2.0 * np.exp(0.5 * log_u)
    n = math.floor(alpha)
    f = alpha - n
    ratio = kve(f, z) / kve(1.0 - f, z)  # r_{f−1} = K_f / K_{f−1}, and K_{−ν} = K_ν
    for k in range(n):
        ratio = 1.0 / ratio + 2.0 * (f + k) / z
    return 0.5 * log_u + np.log(ratio)


class LambdaConditional:
    """λ_i | θ_i ~ GIG(α − 1, 2β, 2|θ_i − θ̄_i|) of BayesTune's Gamma–Laplace prior."""

    def __init__(self, alpha: float, beta: float, *, device=None, dtype=torch.float32):
        for field, value in (("alpha", alpha), ("beta", beta)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{field}: must be a positive finite number, got {value!r}")
        self.alpha, self.beta = float(alpha), float(beta)
        # mean: log E[λ|Δ] tabulated on a uniform grid of x = log|Δ|. Segment j = 1 … N−1 interpolates between grid
        # points j−1 and j; segment 0 (below the grid) and N (above) continue with the leading asymptotic slopes
        # max(1 − α, 0) (E ∝ |Δ|^(1−α) for α < 1, E → (α − 1)/β for α > 1) and ½ (E ≈ √(|Δ|/β)). Near α = 0 or 1
        # the slope nears its limit only like (β|Δ|)^α or (β|Δ|)^|α−1| (at α = 0.01 it is still 0.98 at β|Δ| = 1e-46),
        # so float64 inputs far below the grid get an approximate value. Each segment is stored as (value at its
        # left end, rise per grid step).
        log_beta = math.log(self.beta)
        log_u = np.linspace(math.log(U_MIN), math.log(U_MAX), TABLE_SIZE)
        values = _log_reduced_mean(self.alpha, log_u) - log_beta
        step = float(log_u[1] - log_u[0])
        rise_low, rise_high = max(1.0 - self.alpha, 0.0) * step, 0.5 * step
        self._flat_below = rise_low == 0.0
        base = np.concatenate([[values[0] - rise_low], values])
        rise = np.concatenate([[rise_low], np.diff(values), [rise_high]])
        self._base = torch.tensor(base, dtype=dtype, device=device)
        self._rise = torch.tensor(rise, dtype=dtype, device=device)
        self.device, self.dtype = self._base.device, dtype
        # fractional position t = (log|Δ| − x_0)/step + 1 in segment units, as one fused t = c + log|Δ|/step.
        self._inv_step = 1.0 / step
        self._offset = torch.tensor(1.0 - (math.log(U_MIN) - log_beta) / step, dtype=dtype)
        # sample: λ = √(|Δ|/β)·X^(±1) with X ~ GIG(ν, ω) in Devroye's two-parameter form, ν = |α − 1|, ω = 2√(β|Δ|).
        self._nu = abs(self.alpha - 1.0)

    def _check(self, tensor: torch.Tensor, field: str):
        if tensor.dtype != self.dtype or tensor.device != self.device:
            raise ValueError(f"{field}: expected a {self.dtype} tensor on {self.device}, "
                             f"got {tensor.dtype} on {tensor.device}")

    @torch.no_grad()
    def mean(self, abs_delta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """E[λ_i | |Δ_i|] elementwise.

        Linear interpolation of log E in log|Δ| (relative error ≤ 1e-6 in float64, ≤ 1e-5 in float32, where the
        rounding of log|Δ| dominates). |Δ| = 0 gives the limit: 0 for α < 1, (α − 1)/β for α > 1 (for α = 1, whose
        E → 0 only like 1/(β log(1/(β|Δ|))), the value at the table's end). NaN gives NaN. One compiled pass on
        inputs of ``fused.FUSE_FROM`` elements or more, else nine elementwise passes with at most two temporaries of
        the input's size besides ``out``; no host synchronisation; ``out`` may be ``abs_delta``.
        """
        self._check(abs_delta, "abs_delta")
        if out is None:
            out = torch.empty_like(abs_delta)
        if fused.gig_mean_(abs_delta, out, self._base, self._rise, offset=float(self._offset),
                           inv_step=self._inv_step, flat_below=self._flat_below):
            return out
        t = out.view(-1)
        torch.log(abs_delta.reshape(-1), out=t)
        torch.add(self._offset, t, alpha=self._inv_step, out=t)
        if self._flat_below:  # |Δ| = 0: t = −inf → finite, so that the flat lower segment gives 0·t = 0, not NaN
            t.clamp_(min=torch.finfo(t.dtype).min)
        segment = torch.nan_to_num(t, nan=0.0).clamp_(0, TABLE_SIZE).to(torch.int32)  # truncation = floor here
        t.sub_(segment)  # position inside the segment, in grid steps (outside [0, 1] only in the end segments)
        scratch = torch.index_select(self._rise, 0, segment)
        t.mul_(scratch)
        torch.index_select(self._base, 0, segment, out=scratch)
        t.add_(scratch).exp_()
        return out

    @torch.no_grad()
    def sample(self, abs_delta: torch.Tensor, generator: torch.Generator,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """One exact draw of λ_i | |Δ_i| per coordinate (a Gibbs step for λ).

        Devroye's (2014) rejection sampler for GIG, vectorised: every coordinate gets a proposal, then only the
        rejected ones again, round after round (≤ ``MAX_ROUNDS``), each round in chunks of ``CHUNK`` coordinates.
        Its acceptance rate is bounded away from 0 uniformly in |Δ| (≥ 0.83, ~1.17 proposals per draw). |Δ| is
        floored at ``MIN_ABS_DELTA``; a non-finite |Δ| gives NaN. Reproducible from ``generator``, which must live on
        the input's device; one host synchronisation per chunk and round (the count of rejected draws).
        """
        self._check(abs_delta, "abs_delta")
        if out is None:
            out = torch.empty_like(abs_delta)
        flat_in, flat_out = abs_delta.reshape(-1), out.view(-1)
        n = flat_in.numel()
        pending = None  # None: every coordinate; else the indices still rejected
        for _ in range(MAX_ROUNDS):
            rejected = []
            for start in range(0, n if pending is None else pending.numel(), CHUNK):
                if pending is None:
                    lam, accepted = self._propose(flat_in[start:start + CHUNK], generator)
                    flat_out[start:start + lam.numel()] = lam
                    rejected.append(torch.nonzero(~accepted).squeeze(1).add_(start))
                else:
                    index = pending[start:start + CHUNK]
                    lam, accepted = self._propose(flat_in[index], generator)
                    flat_out[index[accepted]] = lam[accepted]
                    rejected.append(index[~accepted])
            pending = torch.cat(rejected) if rejected else flat_in.new_empty(0, dtype=torch.int64)
            if pending.numel() == 0:
                return out
        raise RuntimeError(f"LambdaConditional.sample: {pending.numel()} draws still rejected after {MAX_ROUNDS} "
                           f"rounds (alpha={self.alpha}, beta={self.beta})")

    def _propose(self, abs_delta: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One proposal per coordinate and whether it is accepted.

        Devroye (2014): with ν = |α − 1|, ω = 2√(β|Δ|) and ᾱ = √(ω² + ν²) − ν, Y = log(X/m) has the log density
        ψ(y) = −ᾱ(cosh y − 1) − ν(eʸ − y − 1), concave with maximum ψ(0) = 0. The hat of e^ψ is 1 on [−s', t'] and
        the exponential of ψ's tangents at t > 0 and −s < 0 beyond. Any t, s > 0 keep the draw exact; Devroye's
        closed-form choices keep the acceptance rate bounded. λ = ᾱ/(2β)·e^(−Y) for α < 1 (where X is inverted) and
        (ᾱ + 2ν)/(2β)·e^Y for α ≥ 1. Selections are lerps by 0/1 float masks (several times faster than torch.where
        on CPU; every operand is finite).
        """
        nu = self._nu
        omega = abs_delta.clamp_min(MIN_ABS_DELTA).sqrt_().mul_(2.0 * math.sqrt(self.beta))
        if nu > 0:  # ᾱ = √(ω² + ν²) − ν = ω/(√(1 + (ν/ω)²) + ν/ω): no cancellation, no overflow for any finite |Δ|
            ratio = omega.reciprocal().mul_(nu)
            alpha_bar = omega.div_(ratio.square().add_(1.0).sqrt_().add_(ratio))
        else:
            alpha_bar = omega
        mask, mask_left = torch.empty_like(alpha_bar), torch.empty_like(alpha_bar)

        def minus_psi(y):
            """(−ψ(y), eʸ − 1, e⁻ʸ − 1), using cosh y − 1 = −(eʸ − 1)(e⁻ʸ − 1)/2: no cancellation, and −ψ = +inf
            rather than NaN where an exponential overflows."""
            em, am = torch.expm1(y), torch.expm1(-y)
            value = (em * am).mul_(alpha_bar).mul_(-0.5)
            return (value.add_((em - y).mul_(nu)) if nu > 0 else value), em, am

        def regimes(minus_psi_at_1, low, high):
            """1 where −ψ(±1) = ᾱ(cosh 1 − 1) + minus_psi_at_1 is in [1/2, 2], else low() below, high() above."""
            point = torch.ones_like(alpha_bar)
            lower, upper = (0.5 - minus_psi_at_1) / _COSH1_M1, (2.0 - minus_psi_at_1) / _COSH1_M1
            if lower > 0:  # otherwise no ᾱ > 0 is below
                point.lerp_(low(), torch.lt(alpha_bar, lower, out=mask))
            return point.lerp_(high(), torch.gt(alpha_bar, upper, out=mask))

        def s_low():  # min(1/ν, log(1 + 1/ᾱ + √(1/ᾱ² + 2/ᾱ)))
            s = torch.log1p((2.0 * alpha_bar + 1.0).sqrt_().add_(1.0).div_(alpha_bar))
            return s.clamp_(max=1.0 / nu) if nu > 0 else s

        t = regimes(nu * (math.e - 2.0), lambda: (alpha_bar + 2.0 * nu).reciprocal_().mul_(4.0).log_(),
                    lambda: (alpha_bar + nu).reciprocal_().mul_(2.0).sqrt_())
        minus_s = regimes(nu / math.e, s_low,
                          lambda: (alpha_bar * math.cosh(1.0) + nu).reciprocal_().mul_(4.0).sqrt_()).neg_()
        eta, em, am = minus_psi(t)  # η = −ψ(t); ζ = −ψ'(t) = ᾱ sinh t + ν(eᵗ − 1), sinh = (eʸ − 1 − (e⁻ʸ − 1))/2
        r = (em - am).mul_(alpha_bar).mul_(0.5).add_(em.mul_(nu)).reciprocal_()  # 1/ζ: mean length of the right tail
        theta, em, am = minus_psi(minus_s)  # θ = −ψ(−s); ξ = ψ'(−s)
        p = (em - am).mul_(alpha_bar).mul_(-0.5).sub_(em.mul_(nu)).reciprocal_()  # 1/ξ: mean length of the left tail
        t_flat = torch.addcmul(t, r, eta, value=-1.0)  # t' = t − η/ζ: the hat is 1 on [−s', t']
        minus_s_flat = torch.addcmul(minus_s, p, theta)  # −s' = −s + θ/ξ
        q = t_flat - minus_s_flat

        u, v, w = torch.rand((3, alpha_bar.numel()), generator=generator, dtype=alpha_bar.dtype,
                             device=alpha_bar.device).unbind(0)
        u.mul_(p + q + r)  # uniform over the hat's area q (flat) + r (right tail) + p (left tail)
        tail = torch.ge(u, q, out=mask)
        left = torch.ge(u, q + r, out=mask_left)
        log_v = torch.log1p(-v)  # −Exp(1), from v ∈ [0, 1)
        y = torch.addcmul(minus_s_flat, v, q)  # flat piece: −s' + q·v
        y.lerp_(torch.addcmul(t_flat, r, log_v, value=-1.0), tail)  # right tail: t' + r·Exp(1)
        y.lerp_(torch.addcmul(minus_s_flat, p, log_v), left)  # left tail: −s' − p·Exp(1)
        log_hat = log_v.mul_(tail)  # 0 on the flat piece, −Exp(1) on either tail
        minus_log_density = minus_psi(y)[0]
        accepted = ~(w.log_().add_(log_hat).add_(minus_log_density) >= 0)  # NaN (from NaN input) is accepted
        if self.alpha < 1.0:
            return y.neg_().exp_().mul_(alpha_bar).mul_(0.5 / self.beta), accepted
        return y.exp_().mul_(alpha_bar + 2.0 * nu).mul_(0.5 / self.beta), accepted
