"""One inference interface: SGLD, MAP and VI fill the same posterior; chains, resumption and merging."""
import json
import math

import numpy as np
import pytest
import torch

from bayestune_pyro.cli import main
from bayestune_pyro.engines.svi import guide_lambda_moments, make_guide
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.inference.potential import Potential
from bayestune_pyro.registry import ENGINES

TINY = ["--backbone", "tiny-bert", "--shots-per-class", "3", "--max-length", "16", "--steps", "8", "--warmup", "2",
        "--burnin", "2", "--thin", "2", "--stage2-steps", "2", "--n-tracked", "16"]


def test_map_potential_without_jacobian_fast_equals_trace(tiny_model, text_batch):
    exact = Potential(tiny_model, fast=False, jacobian=False)
    z_exact = exact.init(1e-2)
    with torch.no_grad():
        z_exact["theta"].add_(0.01 * torch.randn(z_exact["theta"].shape, generator=torch.Generator().manual_seed(0)))
    _, g_exact = exact.gradient(z_exact, text_batch)
    fast = Potential(tiny_model, jacobian=False)
    z_fast = fast.init(1e-2)
    with torch.no_grad():
        z_fast["theta"].copy_(z_exact["theta"])
    _, g_fast = fast.gradient(z_fast, text_batch)
    fast.release()
    for k in g_exact:
        assert torch.allclose(g_fast[k], g_exact[k], atol=1e-5 * g_exact[k].abs().max()), k
    # the Jacobian's only effect: ∂/∂logλ shifts by 1/N̂
    with_jac = Potential(tiny_model, fast=False)
    z = {k: v.detach().clone().requires_grad_(True) for k, v in z_exact.items()}
    _, g_jac = with_jac.gradient(z, text_batch)
    assert torch.allclose(g_exact["lambda"] - g_jac["lambda"], torch.full_like(g_jac["lambda"], 1 / tiny_model.n_hat),
                          atol=1e-7)


def test_vi_guide_moments_are_the_log_normal_ones(tiny_model, text_batch):
    potential = Potential(tiny_model)
    guide = make_guide(potential, "normal", lambda_init=0.02, init_scale=0.3)
    guide(text_batch)
    mean, var = guide_lambda_moments(guide)
    loc, scale = guide._get_loc_and_scale("lambda")
    draws = torch.distributions.LogNormal(loc[:50], scale[:50]).sample((20000,))  # the guide's law of λ
    assert (mean[:50] / draws.mean(0)).mean().item() == pytest.approx(1.0, abs=0.01)
    assert (var[:50] / draws.var(0)).mean().item() == pytest.approx(1.0, abs=0.05)
    assert guide()["lambda"].min() > 0
    assert mean[0].item() == pytest.approx(0.02 * math.exp(0.3**2 / 2), rel=1e-5)
    delta = make_guide(potential, "delta", lambda_init=0.02, init_scale=0.3)
    delta(text_batch)
    mean, var = guide_lambda_moments(delta)
    assert torch.allclose(mean, torch.full_like(mean, 0.02)) and not var.any()


@pytest.mark.parametrize("engine", ["map", "vi", "vi-pyro", "map-svi"])
def test_every_engine_runs_the_same_pipeline(tmp_path, engine):
    out = tmp_path / engine
    assert main(["run", "--out", str(out), *TINY, "--inference", engine]) == 0
    posterior = StreamingPosterior.load(out)
    assert posterior.meta["inference"] == engine and posterior.counts == [2]
    assert posterior.trace("lambda").shape == (1, 2, 16)
    mean, var = posterior.pooled("lambda")
    assert torch.isfinite(mean).all() and (var >= 0).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_updated"] == math.floor(0.005 * metrics["n_total"])


def test_two_chains_in_one_run_and_merged_from_two_runs(tmp_path, capsys):
    both = tmp_path / "both"
    assert main(["stage1", "--out", str(both), *TINY, "--chains", "2"]) == 0
    pooled = StreamingPosterior.load(both)
    assert pooled.counts == [2, 2] and pooled.trace("lambda").shape == (2, 2, 16)
    assert not torch.equal(pooled.mean["lambda"][0], pooled.mean["lambda"][1])  # different seeds
    for seed in (0, 1):
        assert main(["stage1", "--out", str(tmp_path / f"s{seed}"), *TINY, "--seed", str(seed)]) == 0
    assert main(["merge-chains", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 0
    merged = StreamingPosterior.load(tmp_path / "m")
    assert merged.counts == [2, 2] and merged.meta["seeds"] == [0, 1]
    # chain c of a 2-chain run is the run with seed + c: merging separate runs gives the same posterior
    assert torch.equal(merged.lambda_mean, pooled.lambda_mean)
    assert torch.equal(merged.trace("delta"), pooled.trace("delta"))
    assert main(["export", str(tmp_path / "m"), "--p", "0.01"]) == 0
    assert main(["stage2", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["merge-chains", str(tmp_path / "s0"), "--out", str(tmp_path / "x")]) == 2
    assert "at least two" in capsys.readouterr().err


def test_bad_engine_is_named(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "r"), "--inference", "hmc"]) == 2
    assert capsys.readouterr().err.startswith("bayestune: error: inference: invalid choice: 'hmc'")


def test_map_kernel_and_pyro_autodelta_reach_the_same_mode():
    """γ = 0 SGLD kernel (no Jacobian) and Pyro SVI with AutoDelta: the same MAP of a small logistic regression."""
    from bayestune_pyro.engines.svi import elbo_step, make_guide
    from bayestune_pyro.inference.sgld import SGLD, SGLDConfig
    from bayestune_pyro.models.backbones import Backbone
    from bayestune_pyro.models.gamma_laplace import GammaLaplaceModel
    from bayestune_pyro.models.lifted import LiftedBackbone
    from bayestune_pyro.testing.toy import Logistic, logistic_data

    data = logistic_data(n=200, d=6, seed=0)

    def toy():
        lifted = LiftedBackbone(Backbone(Logistic(1, 6), head_names=["b"], kind="tensor", source="toy"))
        # α > 2: the joint mode in (w, λ) is finite (at α ≤ 2 the density grows without bound as w, λ → 0)
        return lifted, GammaLaplaceModel(lifted, alpha=4.0, beta=4.0, n_hat=200.0)

    lifted, model = toy()
    potential = Potential(model, jacobian=False)
    z = potential.init(0.5)
    head = lifted.head_parameters()[0]
    sites = {**z, "b": head.data}
    kernel = SGLD(SGLDConfig(n_hat=200.0, gamma=0.0, preconditioner="none"), sites, torch.Generator())
    for t in range(3000):  # geometric decay, so the iterates settle at the kinks of |w| too
        decay = 1e-3 ** (t / 3000)
        head.grad = None
        _, grads = potential.gradient(z, data)
        kernel.step(sites, {**grads, "b": head.grad}, {"theta": 2.0 * decay, "lambda": 50.0 * decay, "b": 2.0 * decay})
    potential.release()
    kernel_mode = {"w": z["theta"].clone(), "lambda": z["lambda"].exp(), "b": head.detach().clone()}

    lifted, model = toy()
    guide = make_guide(Potential(model), "delta", lambda_init=0.5, init_scale=0.1)
    guide(data)
    opt = torch.optim.Adam([*guide.parameters(), *lifted.head_parameters()], lr=0.05)
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1e-3 ** (1 / 3000))
    for _ in range(3000):
        elbo_step(model, guide, opt, data)
        schedule.step()
    point = guide.median()
    svi_mode = {"w": point["theta"].detach(), "lambda": point["lambda"].detach(),
                "b": lifted.head_parameters()[0].detach()}
    for k in kernel_mode:
        assert torch.allclose(kernel_mode[k], svi_mode[k], atol=3e-3, rtol=1e-2), (k, kernel_mode[k], svi_mode[k])
    assert not lifted.theta_bar.any()  # θ̄ (= 0 here) never moves while the guide's loc does


@pytest.mark.parametrize("engine", ENGINES.names())
def test_every_engine_fills_the_posterior_and_the_report_reads_its_kind(engine, tmp_path, capsys):
    """Over the engine registry: stage 1 resumes-able output, a report, and a mixing warning exactly for engines
    that are not samplers; the temperature in trace.nc is the engine's."""
    import arviz as az

    out = tmp_path / engine
    assert main(["stage1", "--out", str(out), *TINY, "--inference", engine]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    kind = ENGINES.get(engine).kind
    assert any("do not come from a sampler" in w for w in result["warnings"]) == (kind != "sampler")
    temperature = az.from_netcdf(out / "trace.nc").sample_stats["temperature"].values
    expected = {"sampler": 1.0, "point": 0.0}.get(kind, math.nan)
    assert np.allclose(temperature, expected, equal_nan=True)
    assert f"{engine} ({kind})" in (out / "report.html").read_text()


def test_vi_gradient_is_pyros_trace_elbo_gradient_for_the_same_guide_and_draw():
    """``vi``'s closed-form gradient of the one-draw ELBO (engines/vi.py) against autograd through Pyro's
    ``Trace_ELBO`` on an AutoNormal guide with σ = exp(ρ), at the same μ, ρ and draw ε: μ, ρ and the head."""
    import pyro
    from pyro import poutine
    from pyro.distributions import constraints
    from pyro.infer import Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    from bayestune_pyro.engines.vi import MeanField
    from bayestune_pyro.models.backbones import Backbone
    from bayestune_pyro.models.gamma_laplace import GammaLaplaceModel
    from bayestune_pyro.models.lifted import LiftedBackbone
    from bayestune_pyro.testing.toy import Logistic, logistic_data

    class ExpNormal(AutoNormal):
        scale_constraint = constraints.positive  # σ = exp(ρ)

    data = logistic_data(n=40, d=6, seed=0)
    lifted = LiftedBackbone(Backbone(Logistic(1, 6), head_names=["b"], kind="tensor", source="toy"))
    model = GammaLaplaceModel(lifted, alpha=2.0, beta=3.0, n_hat=40.0)
    head = lifted.head_parameters()[0]
    guide = ExpNormal(model, init_scale=0.3)
    guide(data)
    params = dict(guide.named_parameters())  # "locs.theta_unconstrained": μ_θ, "scales.theta_unconstrained": ρ_θ
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a guide away from its start: every term of the gradient matters
        for name, param in params.items():
            param.copy_(torch.randn(6, generator=g) * 0.5 - (1.0 if "lambda" in name or "scales" in name else 0.0))
    pyro.set_rng_seed(7)
    loss = Trace_ELBO().differentiable_loss(model, guide, data) / model.n_hat
    head.grad = None
    loss.backward()
    reference = {(kind, site): params[f"{kind}.{site}_unconstrained"].grad.clone()
                 for kind in ("locs", "scales") for site in ("theta", "lambda")}
    head_reference = head.grad.clone()
    pyro.set_rng_seed(7)  # the same draw again, to read ε off it
    draw = poutine.trace(guide).get_trace(data)
    values = {"theta": draw.nodes["theta"]["value"], "lambda": draw.nodes["lambda"]["value"].log()}
    with torch.no_grad():
        eps = {k: (values[k] - getattr(guide.locs, k)) / getattr(guide.scales, k) for k in values}

    potential = Potential(model)
    q = MeanField(potential, potential.init(1.0), 1.0, torch.Generator())
    with torch.no_grad():
        for k in ("theta", "lambda"):
            q.loc[k].copy_(params[f"locs.{k}_unconstrained"])
            q.rho[k].copy_(params[f"scales.{k}_unconstrained"])
    head.grad = None
    q.draw(eps)
    q.gradient(data)
    potential.release()
    for k in ("theta", "lambda"):
        torch.testing.assert_close(q.loc[k].grad, reference[("locs", k)], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(q.rho[k].grad, reference[("scales", k)], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(head.grad, head_reference, rtol=1e-4, atol=1e-7)
    assert reference[("scales", "lambda")].abs().min() > 1e-3  # the entropy and the draw both count
