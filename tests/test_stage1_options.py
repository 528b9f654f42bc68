"""Stage-1 options of the sampler: frozen preconditioner, linear λ (the paper's algorithm), Rao-Blackwellised λ̂,
the Gibbs step for λ, and a γ/N̂/lr_λ grid chosen on the validation split."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bayestune_pyro.bench.harness import _check_protocol, protocol
from bayestune_pyro.config import RunConfig
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.inference.potential import Potential
from bayestune_pyro.inference.sgld import SGLD, SGLDConfig
from bayestune_pyro.models.lambda_conditional import LambdaConditional
from bayestune_pyro.pipeline import run
from bayestune_pyro.selection.masks import Mask

TINY = dict(backbone="tiny-bert", shots_per_class=4, max_length=24, steps=12, warmup=4, burnin=4, thin=2,
            stage2_steps=4, n_tracked=64, p=0.01)


def test_frozen_preconditioner_stops_adapting_and_keeps_its_g():
    z = torch.zeros(50)
    kernel = SGLD(SGLDConfig(gamma=0.0, preconditioner="rmsprop", rho=0.9), {"z": z}, torch.Generator())
    g = torch.linspace(0.1, 2.0, 50)
    for _ in range(3):
        kernel.step({"z": z}, {"z": g.clone()}, {"z": 0.1})
    kernel.freeze()
    v = kernel.state["z"]["v"].clone()
    expected_g = 1.0 / (torch.sqrt(v / (1 - 0.9**3)) + 1e-8)
    before = z.clone()
    kernel.step({"z": z}, {"z": 100 * g}, {"z": 0.1})  # a much larger gradient would move an adapting G
    assert torch.equal(kernel.state["z"]["v"], v)
    assert torch.allclose(z - before, -0.1 * expected_g * 100 * g, rtol=1e-5)
    state = kernel.state_dict()
    again = SGLD(kernel.config, {"z": z}, torch.Generator())
    again.load_state_dict(state)
    assert again.frozen_at == {"z": 3}


def test_frozen_rmsprop_samples_a_gaussian_exactly():
    """With G fixed, pSGLD is exact SGLD with a constant preconditioner: variance γ²s² within 5%."""
    d, n_hat, s, gamma = 2000, 100.0, 0.3, 1.0
    mu = torch.linspace(-1, 1, d)
    z = mu + s * torch.randn(d, generator=torch.Generator().manual_seed(0))
    kernel = SGLD(SGLDConfig(n_hat=n_hat, gamma=gamma), {"z": z}, torch.Generator().manual_seed(1))
    draws = []
    for t in range(4000):
        if t == 300:
            kernel.freeze()
        kernel.step({"z": z}, {"z": (z - mu) / s**2 / n_hat}, {"z": 0.02 * gamma * s})
        if t >= 300 and t % 5 == 0:
            draws.append(z.clone())
    draws = torch.stack(draws)
    assert (draws.mean(0) - mu).mean().abs() < 0.01 * s
    assert draws.var(0).mean().item() == pytest.approx(gamma**2 * s**2, rel=0.05)


def test_linear_lambda_prior_gradient_is_autograd_of_the_density(tiny_model, text_batch):
    """The paper's parameterisation: ∂/∂λ of log Gamma(λ) + log Laplace(θ | θ̄, λ), no Jacobian, λ read ≥ 1e-8."""
    potential = Potential(tiny_model, lambda_space="linear")
    z = potential.init(1e-2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z["theta"].add_(0.02 * torch.randn(z["theta"].shape, generator=g))
        z["lambda"].mul_(torch.rand(z["lambda"].shape, generator=g) * 2)
        z["lambda"][:5] = -1.0  # below the floor: read as 1e-8
    _, grads = potential.gradient(z, text_batch)
    theta = z["theta"].detach().clone().requires_grad_(True)
    lam_raw = z["lambda"].detach().clone().requires_grad_(True)
    lam = torch.where(lam_raw < 1e-8, torch.full_like(lam_raw, 1e-8), lam_raw)  # gradient passes the floor
    a, b = tiny_model.alpha, tiny_model.beta
    logp = ((a - 1) * lam.log() - b * lam - (2 * lam).log() - (theta - tiny_model.lifted.theta_bar).abs() / lam).sum()
    g_theta, g_lam = torch.autograd.grad(-logp / tiny_model.n_hat, (theta, lam_raw))
    lam_floor = lam.detach() < 2e-8
    g_lam = g_lam[~lam_floor]
    assert torch.allclose(grads["lambda"][~lam_floor], g_lam, rtol=1e-4, atol=1e-5 * g_lam.abs().max().item())
    # θ: the likelihood part is there too, so compare the difference to the exact-path likelihood gradient
    potential.release()
    plain = Potential(tiny_model, lambda_space="log")
    z_plain = plain.init(1e-2)
    with torch.no_grad():
        z_plain["theta"].copy_(z["theta"])
    _, lik = plain.gradient(z_plain, text_batch, with_prior=False)
    assert torch.allclose(grads["theta"] - lik["theta"], g_theta, rtol=1e-4, atol=1e-6)
    plain.release()


def test_paper_potential_clips_the_likelihood_gradient_of_network_and_head(tiny_model, text_batch):
    clipped = Potential(tiny_model, clip_likelihood=1e-3)
    z = clipped.init(1e-2)
    _, grads = clipped.gradient(z, text_batch, with_prior=False)
    head = [p.grad.clone() for p in tiny_model.lifted.head_parameters()]
    total = torch.linalg.vector_norm(torch.cat([grads["theta"]] + [h.reshape(-1) for h in head]))
    assert total.item() == pytest.approx(1e-3, rel=1e-3)
    clipped.release()


def _rb_check(out, alpha, beta):
    """λ̂ of the tracked coordinates = mean over their draws of E[λ | θ⁽ˢ⁾] (recomputed from the traces)."""
    post = StreamingPosterior.load(out)
    assert post.estimator == "rao-blackwell" and post.estimate == "lambda_rb"
    delta = post.trace("delta")[0].double()  # (draw, K)
    expected = LambdaConditional(alpha, beta, dtype=torch.float64).mean(delta.abs()).mean(0)
    got = post.mean["lambda_rb"][0, post.tracked_index].double()
    assert torch.allclose(got, expected, rtol=1e-3)
    assert not torch.allclose(got, post.mean["lambda"][0, post.tracked_index].double(), rtol=1e-2)
    return post


def test_rao_blackwell_lambda_hat_is_the_mean_of_the_conditional_means(tmp_path):
    config = RunConfig.from_dict(TINY)
    run(config, tmp_path / "rb", progress=False)
    post = _rb_check(tmp_path / "rb", config.alpha, config.beta)
    mask = Mask.load(tmp_path / "rb")
    assert mask.info["lambda_cut"] == pytest.approx(post.lambda_mean[mask.index].min().item())


def test_gibbs_draws_lambda_from_its_conditional(tmp_path):
    config = RunConfig.from_dict({**TINY, "gibbs": True})
    run(config, tmp_path / "gibbs", progress=False)
    post = _rb_check(tmp_path / "gibbs", config.alpha, config.beta)
    lam = post.trace("lambda")
    assert torch.isfinite(lam).all() and (lam > 0).all()
    assert not torch.allclose(lam, torch.full_like(lam, config.lambda_init))
    run(config, tmp_path / "again", progress=False)  # seeded: the same draws
    assert torch.equal(StreamingPosterior.load(tmp_path / "again").trace("lambda"), lam)


def test_paper_method_keeps_lambda_linear_and_ranks_by_the_draws(tmp_path):
    config = RunConfig.from_dict({**TINY, "method": "bayestune-paper"})
    run(config, tmp_path / "paper", progress=False)
    post = StreamingPosterior.load(tmp_path / "paper")
    assert post.estimate == "lambda" and "lambda_rb" not in post.mean
    lam = post.trace("lambda")
    assert (lam >= 1e-8).all()  # read through the floor
    assert (lam != config.lambda_init).any()


def test_grid_is_chosen_on_the_validation_split(tmp_path):
    config = RunConfig.from_dict({**TINY, "gamma": [0.0, 1.0], "validation_fraction": 0.3, "eval_every": 2})
    metrics = run(config, tmp_path / "grid", progress=False)
    points = metrics["grid"]
    assert [p["gamma"] for p in points] == [0.0, 1.0]
    scores = [p["validation_score"] for p in points]
    best = scores.index(max(scores))
    assert metrics["chosen"] == {"gamma": points[best]["gamma"], "n_hat": 1e9, "lr_lambda": 1e-2}
    chosen = tmp_path / "grid" / points[best]["directory"]
    assert metrics["validation_score"] == max(scores)
    assert torch.equal(Mask.load(tmp_path / "grid").index, Mask.load(chosen).index)
    assert (tmp_path / "grid" / "delta.safetensors").read_bytes() == (chosen / "delta.safetensors").read_bytes()
    assert metrics["seconds"]["grid"] > 0
    from bayestune_pyro.diagnostics.report import diagnose
    assert Path(diagnose(tmp_path / "grid")["report"]).is_file()  # diagnosed at the chosen point's settings


@pytest.mark.parametrize("values, message", [
    (dict(gamma=[1e-4, 1.0]), "validation"),
    (dict(gamma=[1e-4, 1.0], validation_fraction=0.1, method="sift"), "an option of .* not of method sift"),
    (dict(n_hat=[1e8, -1.0], validation_fraction=0.1), "n_hat: must be a positive number"),
    (dict(gibbs=True, method="bayestune-paper"), "gibbs"),
    (dict(lambda_estimator="median"), "lambda_estimator"),
])
def test_bad_stage1_options_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict({**TINY, **values})


def test_grid_values_come_from_comma_lists():
    config = RunConfig.from_dict({"gamma": "1e-4,1e-2,1", "n_hat": "1e9", "lr_lambda": [0.01, 0.3],
                                  "validation_fraction": 0.1})
    assert config.gamma == [1e-4, 1e-2, 1.0] and config.n_hat == 1e9 and config.lr_lambda == [0.01, 0.3]
    assert len(config.grid()) == 6
    with pytest.raises(ValueError, match="gamma: expected"):
        RunConfig.from_dict({"gamma": "1e-4,high"})


def test_none_is_null_only_where_null_is_allowed():
    """``--preconditioner none`` names plain SGLD; ``--clip-norm none`` unsets an optional number."""
    config = RunConfig.from_dict({"preconditioner": "none", "clip_norm": "none", "stage2_head_lr": "None"})
    assert config.preconditioner == "none" and config.clip_norm is None and config.stage2_head_lr is None


def test_a_bench_written_before_the_new_options_resumes_with_their_old_values(tmp_path):
    """A bench.yaml of an earlier version is one flat record without the options added since; they meant the
    behaviour of the code at the time (``LEGACY``)."""
    nested = RunConfig.from_dict(TINY).to_dict()
    flat = {k: v for k, v in nested.items() if k not in ("method", "engine")}
    flat.update({k: v for k, v in {**nested["method"], **nested["engine"]}.items() if k != "name"})
    old = {k: v for k, v in flat.items()
           if k not in ("task", "data_dir", "seed", "data_seed", "p", "threshold", "freeze_preconditioner",
                        "gibbs", "lambda_estimator", "precond_eps")}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump({**old, "inference": "sgld", "per_task": {}}))
    values = {k: v for k, v in TINY.items() if k != "method"}
    with pytest.raises(ValueError, match="bayestune cells with method.lambda_estimator=.draws. \\(now None\\)"):
        _check_protocol(protocol(values, {}, {}, ["bayestune"]), tmp_path, ["bayestune"])
    legacy = {**values, "precond_eps": 1e-8, "freeze_preconditioner": False, "lambda_estimator": "draws"}
    _check_protocol(protocol(legacy, {}, {}, ["bayestune"]), tmp_path, ["bayestune"])  # the same protocol


def test_a_coordinate_without_data_moves_on_the_prior_scale(tmp_path):
    """No loss depends on the embedding rows of unseen tokens. With the preconditioner bounded by ε = 1/(λ₀N̂),
    Langevin moves them by about λ₀ a step; with ε = 1e-8 the first noisy step threw them ~0.1 from θ̄."""
    from bayestune_pyro.run_setup import setup
    from bayestune_pyro.selection.peers import gradient_scores

    def no_data_drift(eps):
        config = RunConfig.from_dict({**TINY, "delta_moments": True, "precond_eps": eps})
        run(config, tmp_path / f"eps{eps}", progress=False)
        s = setup(config)
        batches = len(s.task.train) // config.batch_size + 1
        untouched = gradient_scores(s.lifted, s.train_batches(), s.nll, 4 * batches) == 0
        mean_abs = StreamingPosterior.load(tmp_path / f"eps{eps}").mean["delta"][0].abs()
        assert untouched.sum() > 1000
        return mean_abs[untouched].max().item()

    assert no_data_drift(None) < 20 * RunConfig.from_dict(TINY).lambda_init
    assert no_data_drift(1e-8) > 0.01



def test_diagnostics_judge_the_draws_that_lambda_hat_averages(tmp_path):
    from bayestune_pyro.diagnostics.convergence import assess
    from bayestune_pyro.diagnostics.inference_data import to_inference_data

    config = RunConfig.from_dict({**TINY, "n_tracked": 512})  # the data touch 3% of tiny-bert's coordinates
    run(config, tmp_path / "rb", progress=False)
    post = StreamingPosterior.load(tmp_path / "rb")
    idata = to_inference_data(post, config)
    rb = LambdaConditional(config.alpha, config.beta, dtype=torch.float64).mean(post.trace("delta").double().abs())
    assert torch.allclose(torch.from_numpy(idata.posterior["lambda_rb"].values), rb)
    # the RB draws average to the posterior's λ̂ of the tracked coordinates the data touched; the others' is α/β
    touched = post.touched[post.tracked_index]
    assert 0 < touched.sum() < touched.numel()
    assert np.array_equal(idata.posterior.coords["touched"].values, touched.numpy())
    hat = post.lambda_mean[post.tracked_index]
    assert torch.allclose(rb.mean((0, 1))[touched], hat[touched].double(), rtol=1e-3)
    assert torch.all(hat[~touched] == torch.tensor(config.alpha / config.beta, dtype=hat.dtype))
    convergence = assess(idata)
    assert convergence.variable == "lambda_rb"
    assert all(label in idata.posterior.coords["coordinate"].values for label in convergence.worst(3))
