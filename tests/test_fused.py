"""The compiled passes (pSGLD update, prior gradient, E[λ | θ], Welford) agree with the eager ones, and fall back to
them where they cannot compile."""
import pytest
import torch

from bayestune_pyro.inference import fused
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.inference.sgld import SGLD, SGLDConfig
from bayestune_pyro.models.gamma_laplace import prior_grad_
from bayestune_pyro.models.lambda_conditional import LambdaConditional
from bayestune_pyro.models.lifted import Layout

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


@pytest.mark.parametrize("alpha", [0.01, 1.0, 2.5])
@pytest.mark.parametrize("in_place", [False, True])
def test_the_fused_conditional_mean_matches_the_eager_passes(monkeypatch, alpha, in_place):
    """E[λ | |Δ|] over the whole table and beyond both ends, 0, inf and NaN included, out aliased or not."""
    g = torch.Generator().manual_seed(4)
    abs_delta = torch.exp(torch.empty(N).uniform_(-110.0, 30.0, generator=g))
    abs_delta[:4] = torch.tensor([0.0, float("inf"), float("nan"), 1e-45])
    conditional = LambdaConditional(alpha, 100.0)
    buffer = abs_delta.clone()
    fast = conditional.mean(buffer, out=buffer if in_place else None)
    assert fused._gig_mean in fused._Compiled.functions and not fused._Compiled.failed
    monkeypatch.setattr(fused, "FUSE_FROM", 10 * N)
    slow = conditional.mean(abs_delta)
    assert torch.isnan(fast[2]) and torch.isnan(slow[2])
    normal = slow.abs() >= torch.finfo(slow.dtype).tiny  # the rest is 0 or subnormal (α < 1 at tiny |Δ|)
    assert torch.allclose(fast[normal], slow[normal], rtol=3e-5, atol=0)  # each is within 1e-5 of the truth
    keep = ~normal & ~torch.isnan(slow)
    assert torch.allclose(fast[keep], slow[keep], rtol=0, atol=1e-42)  # subnormal: a few units of 1.4e-45


def test_the_fused_welford_update_matches_the_eager_passes(monkeypatch):
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(N, generator=g) * 3 + 1 for _ in range(5)]

    def moments() -> tuple[torch.Tensor, torch.Tensor]:
        post = StreamingPosterior(Layout.of([("w", torch.Size([N]))]), n_tracked=2)
        for x in draws:
            post.update(0, x, x, {"loss": x[0], "log_joint": x[0]})
        return post.mean["lambda"][0], post.m2["lambda"][0]

    fast = moments()
    assert fused._welford in fused._Compiled.functions and not fused._Compiled.failed
    monkeypatch.setattr(fused, "FUSE_FROM", 10 * N)
    slow = moments()
    stacked = torch.stack(draws)
    assert torch.allclose(fast[0], slow[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(fast[1], slow[1], rtol=1e-4, atol=1e-5)
    assert torch.allclose(fast[1] / 4, stacked.var(0), rtol=1e-4, atol=1e-5)
