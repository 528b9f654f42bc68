"""The SGLD kernel against known answers: gradient steps, noise variance, Adam, and a Gaussian posterior."""
import math

import pytest
import torch

from bayestune_pyro.config import Schedule
from bayestune_pyro.inference.potential import Potential
from bayestune_pyro.inference.sgld import SGLD, SGLDConfig


def test_gamma_zero_plain_step_is_a_gradient_step_on_the_potential(tiny_model, text_batch):
    potential = Potential(tiny_model)
    z = potential.init(1e-2)
    with torch.no_grad():
        z["theta"].add_(0.01 * torch.randn(z["theta"].shape, generator=torch.Generator().manual_seed(0)))
    lrs = {"theta": 1e-3, "lambda": 1e-2}
    start = {k: v.clone() for k, v in z.items()}
    probe = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    expected = torch.autograd.grad(Potential(tiny_model, fast=False).value(probe, text_batch), list(probe.values()))
    _, grads = potential.gradient(z, text_batch)
    SGLD(SGLDConfig(n_hat=tiny_model.n_hat, gamma=0.0, preconditioner="none"), z,
         torch.Generator().manual_seed(0)).step(z, grads, lrs)
    for (k, lr), g in zip(lrs.items(), expected):
        assert torch.allclose(z[k], start[k] - lr * g, atol=1e-7), k
    potential.release()


def _noise_only_step(config, lr, d=400_000, seed=0):
    z = torch.zeros(d)
    kernel = SGLD(config, {"z": z}, torch.Generator().manual_seed(seed))
    kernel.step({"z": z}, {"z": torch.zeros(d)}, {"z": lr})
    return z


@pytest.mark.parametrize("gamma", [1.0, 0.5])
@pytest.mark.parametrize("n_hat", [1e3, 1e6])
def test_injected_noise_has_the_formula_variance(gamma, n_hat):
    lr = 1e-3
    step = _noise_only_step(SGLDConfig(n_hat=n_hat, gamma=gamma, preconditioner="none"), lr)
    expected = gamma**2 * 2 * lr / n_hat  # γ²·η with η = 2·lr/N̂
    assert step.mean().abs() < 5 * math.sqrt(expected / step.numel())
    assert step.var().item() == pytest.approx(expected, rel=0.01)


def test_rmsprop_noise_is_scaled_by_the_preconditioner():
    # zero gradient: v = 0, G = 1/ε, so the noise variance is γ²·2·lr·G/N̂
    cfg = SGLDConfig(n_hat=1e6, gamma=1.0, preconditioner="rmsprop", eps=1e-2)
    step = _noise_only_step(cfg, lr=1e-3)
    assert step.var().item() == pytest.approx(2 * 1e-3 * (1 / 1e-2) / 1e6, rel=0.01)


def test_adam_mode_without_noise_is_torch_adam():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1000, generator=g)
    ours = torch.zeros(1000)
    ref = torch.zeros(1000, requires_grad=True)
    kernel = SGLD(SGLDConfig(preconditioner="adam", gamma=0.0), {"z": ours}, torch.Generator())
    adam = torch.optim.Adam([ref], lr=1e-2)
    for _ in range(20):
        ref.grad = (ref.detach() - target) ** 3
        kernel.step({"z": ours}, {"z": (ours - target) ** 3}, {"z": 1e-2})
        adam.step()
    assert torch.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("preconditioner", ["none", "rmsprop"])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_samples_a_gaussian_posterior_with_the_right_moments(preconditioner, gamma):
    """U(z) = Σ (z − μ)² / (2 s²): SGLD must give mean μ and variance γ²·s² (tempered by T = γ²)."""
    d, n_hat, s = 2000, 100.0, 0.3
    mu = torch.linspace(-1, 1, d)
    z = mu + s * torch.randn(d, generator=torch.Generator().manual_seed(0))
    kernel = SGLD(SGLDConfig(n_hat=n_hat, gamma=gamma, preconditioner=preconditioner), {"z": z},
                  torch.Generator().manual_seed(1))
    # relaxation per step h = lr·G/(s²·N̂) = 0.02, so the discretisation bias of the variance is ≈ h/2 = 1%;
    # pSGLD at stationarity has G = 1/rms(ĝ) = s·N̂/γ
    lr = 0.02 * s**2 * n_hat if preconditioner == "none" else 0.02 * gamma * s
    draws = []
    for t in range(4000):
        kernel.step({"z": z}, {"z": (z - mu) / s**2 / n_hat}, {"z": lr})  # ĝ = ∇(U/N̂)
        if t >= 300 and t % 5 == 0:
            draws.append(z.clone())
    draws = torch.stack(draws)
    assert (draws.mean(0) - mu).mean().abs() < 0.01 * s  # no systematic bias of the mean
    assert draws.var(0).mean().item() == pytest.approx(gamma**2 * s**2, rel=0.05)


def test_clipping_bounds_the_drift():
    z = torch.zeros(100)
    SGLD(SGLDConfig(gamma=0.0, preconditioner="none", clip_norm=1.0), {"z": z}, torch.Generator()).step(
        {"z": z}, {"z": torch.full((100,), 10.0)}, {"z": 1.0})
    assert torch.linalg.vector_norm(z).item() == pytest.approx(1.0, rel=1e-4)


def test_schedule_phases_and_errors():
    s = Schedule(steps=10, warmup=2, burnin=3, thin=2)
    assert [s.phase(i) for i in (0, 2, 5)] == ["warmup", "burnin", "sampling"]
    assert [i for i in range(10) if s.collects(i)] == [6, 8]
    with pytest.raises(ValueError, match="burnin"):
        Schedule(steps=10, warmup=5, burnin=6, thin=1)
    with pytest.raises(ValueError, match="preconditioner"):
        SGLDConfig(preconditioner="sgd")
