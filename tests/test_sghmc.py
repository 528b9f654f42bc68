"""The SGHMC engine: friction 1 is the SGLD step bitwise; smaller friction samples a Gaussian with the tempered
closed-form moments; ``--inference sghmc`` runs through the pipeline and resumes."""
import pytest
import torch

from bayestune_pyro.config import RunConfig
from bayestune_pyro.engines.sghmc import SGHMC
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.inference.sgld import SGLD, SGLDConfig
from bayestune_pyro.pipeline import run
from bayestune_pyro.registry import ENGINES


@pytest.mark.parametrize("preconditioner", ["none", "rmsprop"])
def test_friction_one_is_the_sgld_step(preconditioner):
    config = SGLDConfig(n_hat=50.0, gamma=0.7, preconditioner=preconditioner, eps=1e-3)
    z0 = torch.randn(300, generator=torch.Generator().manual_seed(0))
    a, b = z0.clone(), z0.clone()
    sgld = SGLD(config, {"z": a}, torch.Generator().manual_seed(1))
    sghmc = SGHMC(config, {"z": b}, torch.Generator().manual_seed(1), friction=1.0)
    for _ in range(5):
        sgld.step({"z": a}, {"z": a.sin()}, {"z": 1e-2})
        sghmc.step({"z": b}, {"z": b.sin()}, {"z": 1e-2})
    assert torch.allclose(a, b, rtol=0, atol=1e-6)  # the same step up to float rounding of the sum order


@pytest.mark.parametrize("preconditioner", ["none", "rmsprop"])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_samples_a_gaussian_posterior_with_the_right_moments(preconditioner, gamma):
    """U(z) = Σ (z − μ)² / (2 s²): mean μ and variance γ²·s², with momentum (friction 0.2)."""
    d, n_hat, s = 2000, 100.0, 0.3
    mu = torch.linspace(-1, 1, d)
    z = mu + gamma * s * torch.randn(d, generator=torch.Generator().manual_seed(0))
    kernel = SGHMC(SGLDConfig(n_hat=n_hat, gamma=gamma, preconditioner=preconditioner), {"z": z},
                   torch.Generator().manual_seed(1), friction=0.2)
    # η·∂²U per step = 0.002: a small step, so the discretisation bias of the variance is well below 5%
    lr = 0.002 * s**2 * n_hat if preconditioner == "none" else 0.002 * gamma * s
    draws = []
    for t in range(6000):
        kernel.step({"z": z}, {"z": (z - mu) / s**2 / n_hat}, {"z": lr})
        if t >= 1000 and t % 10 == 0:
            draws.append(z.clone())
    draws = torch.stack(draws)
    assert (draws.mean(0) - mu).mean().abs() < 0.01 * s
    assert draws.var(0).mean().item() == pytest.approx(gamma**2 * s**2, rel=0.05)


def test_sghmc_options_are_checked():
    with pytest.raises(ValueError, match="friction: must be in"):
        RunConfig.from_dict({"inference": "sghmc", "friction": 0.0})
    with pytest.raises(ValueError, match="preconditioner: sghmc takes none or rmsprop"):
        RunConfig.from_dict({"inference": "sghmc", "preconditioner": "adam"})
    with pytest.raises(ValueError, match="friction: an option of engine sghmc, not of method bayestune with engine"):
        RunConfig.from_dict({"friction": 0.5})


def test_inference_sghmc_runs_through_the_pipeline(tmp_path):
    config = RunConfig.from_dict(dict(backbone="tiny-bert", shots_per_class=4, max_length=24, steps=12, warmup=2,
                                      burnin=4, thin=2, n_tracked=8, stage2_steps=2, inference="sghmc", gamma=0.5))
    assert ENGINES.get("sghmc").temperature(config.engine_options) == 0.25
    metrics = run(config, tmp_path, progress=False)
    post = StreamingPosterior.load(tmp_path)
    assert post.meta["inference"] == "sghmc" and post.counts == [3] and post.estimator == "rao-blackwell"
    assert torch.isfinite(post.lambda_mean).all() and metrics["n_updated"] > 0
