"""The compiled pSGLD update agrees with the eager passes, and falls back to them where it cannot compile."""
import pytest
import torch

from bayestune_pyro.inference import fused
from bayestune_pyro.inference.sgld import SGLD, SGLDConfig
from bayestune_pyro.models.gamma_laplace import prior_grad_

N = fused.FUSE_FROM  # the smallest site that takes the fused pass


def run(steps: int = 6, freeze_after: int = 3) -> tuple[dict, dict]:
    """Sites after a few adapting, then frozen, noisy steps (log λ without noise on the first, like warm-up)."""
    g = torch.Generator().manual_seed(0)
    sites = {"theta": torch.randn(N, generator=g), "lambda": torch.full((N,), -9.0)}
    kernel = SGLD(SGLDConfig(n_hat=1e4, eps=1e-6), sites, torch.Generator().manual_seed(1))
    for t in range(steps):
        if t == freeze_after:
            kernel.freeze()
        grads = {k: torch.randn(N, generator=g) * 0.1 for k in sites}
        kernel.step(sites, grads, {"theta": 1e-3, "lambda": 1e-2}, noise=t > 0)
    return sites, {k: s["v"] for k, s in kernel.state.items()}


def test_the_fused_update_matches_the_eager_passes(monkeypatch):
    fused_sites, fused_v = run()
    assert fused._rmsprop_langevin in fused._Compiled.functions and not fused._Compiled.failed  # it ran
    monkeypatch.setattr(fused, "FUSE_FROM", 10 * N)
    eager_sites, eager_v = run()
    for k in fused_sites:
        assert torch.allclose(fused_sites[k], eager_sites[k], rtol=1e-5, atol=1e-6), k
        assert torch.allclose(fused_v[k], eager_v[k], rtol=1e-5, atol=0), k


def test_without_a_compiler_the_eager_passes_run_after_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused._Compiled, "functions", {})
    monkeypatch.setattr(fused._Compiled, "failed", False)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        fallback_sites, _ = run()
    monkeypatch.setattr(fused, "FUSE_FROM", 10 * N)
    eager_sites, _ = run()
    assert all(torch.equal(fallback_sites[k], eager_sites[k]) for k in eager_sites)


@pytest.mark.parametrize("space, jacobian", [("log", True), ("log", False), ("linear", False)])
def test_the_fused_prior_gradient_matches_the_eager_passes(monkeypatch, space, jacobian):
    g = torch.Generator().manual_seed(2)
    theta_bar = torch.randn(N, generator=g)
    theta = theta_bar + 1e-3 * torch.randn(N, generator=g)
    z_lambda = -9.0 + torch.randn(N, generator=g) if space == "log" else 1e-4 * torch.rand(N, generator=g)
    work = tuple(torch.empty(N) for _ in range(3))

    def grads() -> tuple[torch.Tensor, torch.Tensor]:
        grad_theta, grad_lambda = torch.ones(N), torch.empty(N)  # ∇θ holds a likelihood part already
        prior_grad_(theta, theta_bar, z_lambda, grad_theta, grad_lambda, 1e-3, work, alpha=0.01, beta=100.0,
                    jacobian=jacobian, space=space)
        return grad_theta, grad_lambda

    fused_grads = grads()
    monkeypatch.setattr(fused, "FUSE_FROM", 10 * N)
    for a, b in zip(fused_grads, grads()):  # where the prior cancels the likelihood part, rounding is absolute
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
