"""Do the SGLD and SGHMC kernels sample the right posterior? Checks against NUTS and against closed forms.

    python benchmarks/sampler_validity.py [--quick] [--only logistic|separable] [--seed S]

Prints one JSON line per check, {"name", "statistic", "threshold", "passed"}; report-only lines have
"passed": null. A threshold is either a bound (statistic ≤ threshold) or an interval [lo, hi]. Exits 1 if an
asserted check fails. Wall time on 2 idle CPU cores: about 4 min (--quick: about 1.5 min) for the logistic toy;
NUTS runs in a second process beside the SGLD chains. The separable toy took 12 min (--quick: 3.5–5.5 min) on 2
cores shared with other jobs (load ~5). ``--only`` runs one toy, ``--seed`` seeds the separable toy's chains.

The logistic toy (``bayestune_pyro/testing/toy.py``): d = 12 weights (3 nonzero), N = 200 points, N̂ = N,
γ = 1, α = 2, β = 20. SGLD goes through the product path; the reference is NUTS on the non-centred form.

- nuts.divergences, nuts.rhat_max    the reference is trustworthy: no divergences, R-hat ≤ 1.01
- <run>.mean_z_max                   max over the coordinates of w, λ and b of |Δmean| / √(mcse² + mcse_NUTS²)
                                     (ArviZ MCSE on both sides) ≤ 3
- <run>.sd_rel_err_max               max |sd / sd_NUTS − 1| ≤ 0.2
- <run>.diagnostics                  report: max |Δmean| / sd_NUTS, sd ratio range, the run's own R-hat and ESS,
                                     top-3 λ̂, seconds
  for <run> = sgld.full, sgld.minibatch (plain SGLD, |B| = 50), psgld.full, psgld.minibatch (rmsprop at the
  default ρ = 0.9999, with the longer burn-in that slow preconditioner needs, frozen when sampling starts as in
  the engines) and sghmc.full, sghmc.minibatch
  (the sghmc engine's update, friction α = 0.2, no preconditioner)
- psgld.full.rho_0.999               report: pSGLD with a faster preconditioner adapting throughout. It drops
                                     the Γ term, so the fluctuations of G bias it, by ~0.05–0.1 sd in some
                                     means at ρ = 0.999 (3–4 MCSE at this precision), twice that at ρ = 0.99;
                                     hence the default 0.9999
- adam.*                             report: the paper's adam mode, not a valid sampler, at two lrs
- funnel.*                           report at the paper's α = 0.01, β = 100 (a Laplace-scale funnel): NUTS on the
                                     centred form (divergences, R-hat, ESS) and pSGLD / SGLD against it (over the
                                     chains that stayed finite)
- gaussian.<kernel>.*                closed form N(ȳ, γ²s²/N̂), d = 2000 independent copies, s = 0.5, N̂ = 100:
                                     var / (s²/N̂) within 5% (asserted for plain SGLD, reported for pSGLD, whose
                                     missing Γ term inflates it), var(γ = ½) / var(γ = 1) = ¼ and
                                     var(2N̂) / var(N̂) = ½ within 5% (both kernels)

The separable toy (``bayestune_pyro/testing/separable.py``): d = 10 independent coordinates (3 signals, 3 weak, 4
nulls), Gaussian data (σ = 0.1, N = 500), N̂ = N, γ = 1, against its exact posterior (quadrature, no sampler), at
the paper's prior ("funnel", α = 0.01, β = 100) and a benign one (α = 2, β = 20). Kernels: sgld (plain), psgld
(rmsprop, ρ = 0.9999, preconditioner adapting throughout), psgld_frozen (G frozen at the end of burn-in), gibbs
(plain SGLD for θ, then λ drawn exactly from λ | θ every step) and adam (the paper's mode). The valid kernels are
the first four.

- separable.reference.methods_agree  max relative difference between the two quadratures (λ by Bessel functions vs
                                     a 2-D (log|Δ|, log λ) grid) over every reported moment, both priors, ≤ 1e-6
- separable.<prior>.reference        report: the exact moments per coordinate, incl. the spike share P(|Δ| < 1e-30)
- separable.benign.<kernel>.z_max    max over coordinates of |draw mean − exact| / MCSE for θ, λ, the
                                     Rao-Blackwellised λ̂ = mean E[λ | θ], and (x − exact mean)² of θ and λ against
                                     the exact variance ≤ 4.5 (valid kernels; adam reported). 50 z-scores at an
                                     ESS of ~100 are heavier-tailed than normal: 4.1 was the largest in 3 quick runs
- separable.benign.<kernel>.sd_rel_err_max  max |sd / exact sd − 1| over θ and λ ≤ 0.2 (valid kernels)
- separable.funnel.<kernel>.topk_rb  the RB λ̂ puts the exact top-3 coordinates by E[λ] (the mask) in its top 3
                                     (= 1, asserted for sgld, psgld, psgld_frozen; gibbs and adam reported)
- separable.<prior>.<kernel>         report, per coordinate: z-scores of θ, λ, RB λ and of the variances of θ
                                     and λ; sd ratios of θ and λ; the bias of E[log λ] (nats); draw share of
                                     |Δ| < 1e-3 minus exact; Spearman ρ and top-3 overlap of λ̂ and RB λ̂ with the
                                     exact E[λ]; R-hat, ESS, diverged chains (dropped from the statistics)

What it shows at α = 0.01 (full and 3 quick runs): the exact posterior puts ~53% of each null's mass (48% of the
m/s = 3.5 signal's) below |Δ| = 1e-30, E[log λ] ≈ −105. No kernel enters that spike: E[log λ] comes out 90–100
nats too high, E[λ] of weak and null coordinates too large, their θ 4–7× too wide. Strong signals (m/s = 21, 7)
are exact under sgld and gibbs; pSGLD (frozen or not, alike) has not converged from λ₀ = α/β there (R-hat ~2);
half of the plain-SGLD chains diverge; gibbs's θ-step is thrown far by the tiny λ it draws near θ̄ (θ sd
200–1500× at the nulls) and loses the weakest signal from the top 3; adam shrinks the strong signals' λ. The RB
λ̂ ranking is what survives: top-3 right and Spearman ≥ 0.9 for sgld and both pSGLDs in every run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch

from bayestune_pyro.testing import separable, toy

N = 200
# plain SGLD: lr = ε·N̂/2, ε the Langevin step on U; w is the stiffest site (the Laplace kink at scale λ)
SGLD_LRS = {k: eps * N / 2 for k, eps in {"theta": 1e-4, "lambda": 5e-3, "b": 4e-4}.items()}
# SGHMC at friction α: lr = α·(SGLD's lr), the same drift per unit of momentum decay
SGHMC_FRICTION = 0.2
SGHMC_LRS = {k: SGHMC_FRICTION * v for k, v in SGLD_LRS.items()}
# pSGLD: G ≈ N̂/√(∂²U), so ε ≈ 2·lr/√(∂²U)
PSGLD_LRS = {"theta": 2e-3, "lambda": 8e-3, "b": 2e-3}

FULL = {
    "nuts": dict(chains=4, warmup=500, samples=1000),
    "funnel_nuts": dict(chains=2, warmup=200, samples=200, max_tree_depth=8),
    "none": dict(chains=128, steps=30000, burnin=6000, thin=20),
    "fast_rmsprop": dict(chains=128, steps=16000, burnin=4000, thin=10),
    "adam": dict(chains=64, steps=6000, burnin=2000, thin=10),
    "rmsprop": dict(chains=64, steps=40000, burnin=15000, thin=20),
    "funnel": dict(chains=64, steps=10000, burnin=2000, thin=10),
    "gaussian": dict(steps=23000, burnin=3000),
    "separable": dict(chains=64, steps=16000, burnin=4000, thin=10),
    "separable_rmsprop": dict(chains=64, steps=20000, burnin=8000, thin=10),
}
QUICK = {
    "nuts": dict(chains=2, warmup=300, samples=500),
    "funnel_nuts": dict(chains=2, warmup=100, samples=100, max_tree_depth=8),
    "none": dict(chains=128, steps=12000, burnin=4000, thin=10),
    "fast_rmsprop": dict(chains=128, steps=5000, burnin=2000, thin=5),
    "adam": dict(chains=64, steps=3000, burnin=1000, thin=5),
    "rmsprop": dict(chains=64, steps=12000, burnin=8000, thin=10),
    "funnel": dict(chains=64, steps=4000, burnin=1000, thin=5),
    "gaussian": dict(steps=8000, burnin=3000),
    "separable": dict(chains=32, steps=6000, burnin=2000, thin=10),
    "separable_rmsprop": dict(chains=32, steps=9000, burnin=5000, thin=10),
}

SEPARABLE_PRIORS = {"funnel": (0.01, 100.0), "benign": (2.0, 20.0)}
# plain SGLD: Langevin step ε = 2·lr/N̂ = 1.25e-6 on θ (ε·n_i/σ² ≤ 0.025), 0.01 on log λ; pSGLD: ε·∂²U ≈ 2·lr·√(n_i)/σ
SEPARABLE_SGLD_LRS = {"theta": 3.125e-4, "lambda": 2.5}
SEPARABLE_PSGLD_LRS = {"theta": 2e-4, "lambda": 0.01}
SEPARABLE_KERNELS = {  # name: (SGLDConfig fields and runner options, schedule)
    "sgld": (dict(preconditioner="none", lrs=SEPARABLE_SGLD_LRS), "separable"),
    "psgld": (dict(preconditioner="rmsprop", freeze_preconditioner=False, lrs=SEPARABLE_PSGLD_LRS),
              "separable_rmsprop"),
    "psgld_frozen": (dict(preconditioner="rmsprop", freeze_preconditioner=True, lrs=SEPARABLE_PSGLD_LRS),
                     "separable_rmsprop"),
    "gibbs": (dict(preconditioner="none", gibbs=True, lrs=SEPARABLE_SGLD_LRS), "separable"),
    "adam": (dict(preconditioner="adam", lrs=SEPARABLE_PSGLD_LRS), "separable"),
}
VALID = ("sgld", "psgld", "psgld_frozen", "gibbs")
Z_SCORES = ("z_theta", "z_lambda", "z_lambda_rb", "z_theta_var", "z_lambda_var")
MASK_ASSERTED = ("sgld", "psgld", "psgld_frozen")  # kernels whose RB top-3 at α = 0.01 held in every run we made


class Report:
    """Prints the JSON lines and remembers the failed checks."""

    def __init__(self):
        self.failed: list[str] = []

    def __call__(self, name: str, statistic, threshold=None) -> None:
        if threshold is None:
            passed = None
        elif isinstance(threshold, list):
            passed = threshold[0] <= statistic <= threshold[1]
        else:
            passed = statistic <= threshold
        print(json.dumps({"name": name, "statistic": _round(statistic), "threshold": threshold, "passed": passed}),
              flush=True)
        if passed is False:
            self.failed.append(name)


def _round(value):
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, (list, np.ndarray)):
        return [_round(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return float(f"{value:.4g}") if isinstance(value, float) else value


def gaussian_checks(report: Report, schedule: dict) -> None:
    for kernel in ("none", "rmsprop"):
        base = toy.gaussian_moments(n_hat=100.0, gamma=1.0, preconditioner=kernel, seed=1, **schedule)[1]
        cold = toy.gaussian_moments(n_hat=100.0, gamma=0.5, preconditioner=kernel, seed=2, **schedule)[1]
        big = toy.gaussian_moments(n_hat=200.0, gamma=1.0, preconditioner=kernel, seed=3, **schedule)[1]
        report(f"gaussian.{kernel}.var_over_closed_form", base, [0.95, 1.05] if kernel == "none" else None)
        report(f"gaussian.{kernel}.var_gamma_half_over_gamma_one", cold * 0.25 / base, [0.2375, 0.2625])
        report(f"gaussian.{kernel}.var_2n_hat_over_n_hat", big * 0.5 / base, [0.475, 0.525])


def separable_checks(report: Report, plan: dict, seed: int) -> None:
    errors = []
    for prior, (alpha, beta) in SEPARABLE_PRIORS.items():
        model = separable.default_toy(alpha, beta)
        start = time.perf_counter()
        exact = separable.reference(model, method="bessel")
        seconds = time.perf_counter() - start
        grid = separable.reference(model, method="grid")
        errors += [np.abs(grid[k] - v) / np.where(v == 0, 1.0, np.abs(v)) for k, v in exact.items()]
        report(f"separable.{prior}.reference", {"kinds": list(model.kinds), **{k: exact[k] for k in (
            "theta_mean", "theta_sd", "lambda_mean", "log_lambda_mean", "spike")},
            "p_within_1e-6": exact["p_within"][1], "seconds": seconds})
        for name, (options, schedule) in SEPARABLE_KERNELS.items():
            start = time.perf_counter()
            draws = separable.sgld_separable(model, seed=seed, **options, **plan[schedule])
            stats = {**separable.agreement(model, draws, exact), "seconds": time.perf_counter() - start}
            if prior == "benign" and "z_theta" in stats:
                z_max = max(np.abs(stats[k]).max() for k in Z_SCORES)
                sd_err = max(np.abs(stats[k] - 1).max() for k in ("sd_theta", "sd_lambda"))
                report(f"separable.benign.{name}.z_max", float(z_max), 4.5 if name in VALID else None)
                report(f"separable.benign.{name}.sd_rel_err_max", float(sd_err), 0.2 if name in VALID else None)
            if prior == "funnel":
                report(f"separable.funnel.{name}.topk_rb", stats.get("topk_rb", 0.0),
                       [1.0, 1.0] if name in MASK_ASSERTED else None)
            report(f"separable.{prior}.{name}", stats)
    report("separable.reference.methods_agree", float(max(e.max() for e in errors)), 1e-6)


def sgld_run(data: dict, kernel: str, schedule: dict, lrs: dict, **kwargs) -> tuple[dict, float]:
    start = time.perf_counter()
    draws = toy.sgld_logistic(data, preconditioner=kernel, lrs=lrs, **schedule, **kwargs)
    return draws, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter chains (about a third of the time)")
    parser.add_argument("--only", choices=("logistic", "separable"), help="run one toy's checks only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the separable toy's chains")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", "Encountered NaN")  # plain SGLD chains that blow up in the funnel
    start = time.perf_counter()
    report = Report()
    if args.only != "separable":
        logistic_checks(report, plan)
    if args.only != "logistic":
        separable_checks(report, plan, args.seed)
    report("wall_seconds", time.perf_counter() - start)
    return 1 if report.failed else 0


def logistic_checks(report: Report, plan: dict) -> None:
    data = toy.logistic_data(n=N)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:
        nuts = pool.submit(toy.nuts_logistic, toy.for_subprocess(data), alpha=2.0, beta=20.0, **plan["nuts"])
        funnel_nuts = pool.submit(toy.nuts_logistic, toy.for_subprocess(data), alpha=0.01, beta=100.0,
                                  centred=True, **plan["funnel_nuts"])
        gaussian_checks(report, plan["gaussian"])
        lrs = {"none": SGLD_LRS, "rmsprop": PSGLD_LRS}
        runs = {f"{'sgld' if kernel == 'none' else 'psgld'}.{mode}": sgld_run(
                    data, kernel, plan[kernel], lrs[kernel], alpha=2.0, beta=20.0, batch_size=size)
                for kernel in ("none", "rmsprop") for mode, size in (("full", None), ("minibatch", 50))}
        runs.update({f"sghmc.{mode}": sgld_run(data, "none", plan["none"], SGHMC_LRS, alpha=2.0, beta=20.0,
                                                batch_size=size, friction=SGHMC_FRICTION)
                     for mode, size in (("full", None), ("minibatch", 50))})
        fast = sgld_run(data, "rmsprop", plan["fast_rmsprop"], PSGLD_LRS, alpha=2.0, beta=20.0, rho=0.999,
                        freeze_preconditioner=False)
        adam = {f"adam.lr_x{scale}": sgld_run(data, "adam", plan["adam"], {k: scale * v for k, v in PSGLD_LRS.items()},
                                                alpha=2.0, beta=20.0)
                for scale in (1.0, 0.25)}
        funnel = {f"funnel.{name}": sgld_run(data, kernel, plan["funnel"], lrs[kernel], alpha=0.01, beta=100.0)
                  for name, kernel in (("psgld", "rmsprop"), ("sgld", "none"))}

        reference, divergences = nuts.result()
        stats = toy.diagnostics(toy.summary(reference))
        report("nuts.divergences", divergences, 0)
        report("nuts.rhat_max", stats.pop("rhat_max"), 1.01)
        report("nuts.diagnostics", stats)
        for name, (draws, seconds) in runs.items():
            stats = toy.agreement(draws, reference)
            report(f"{name}.mean_z_max", stats.pop("z_max"), 3.0)
            report(f"{name}.sd_rel_err_max", stats.pop("sd_err"), 0.2)
            report(f"{name}.diagnostics", {**stats, "seconds": seconds})
        report("psgld.full.rho_0.999", {**toy.agreement(fast[0], reference), "seconds": fast[1]})
        for name, (draws, seconds) in adam.items():
            report(name, {**toy.agreement(draws, reference), "seconds": seconds})

        reference, divergences = funnel_nuts.result()
        report("funnel.nuts", {"divergences": divergences, **toy.diagnostics(toy.summary(reference))})
        for name, (draws, seconds) in funnel.items():
            finite = np.all([np.isfinite(v.reshape(len(v), -1)).all(1) for v in draws.values()], axis=0)
            stats = toy.agreement({k: v[finite] for k, v in draws.items()}, reference) if finite.any() else {}
            report(name, {**stats, "diverged_chains": int((~finite).sum()), "seconds": seconds})


if __name__ == "__main__":
    sys.exit(main())
