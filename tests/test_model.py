"""The lifted backbone and the Pyro Gamma–Laplace model against hand-written densities."""
import math

import pytest
import torch

from bayestune_pyro.inference.potential import Potential
from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.models.gamma_laplace import GammaLaplaceModel
from bayestune_pyro.models.lifted import LiftedBackbone
from bayestune_pyro.search_spaces import SearchSpace
from bayestune_pyro.search_spaces.subset import Subset


def random_point(potential, seed):
    z = potential.init(1e-2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z["theta"].add_(0.02 * torch.randn(z["theta"].shape, generator=g))
        z["lambda"].add_(torch.randn(z["lambda"].shape, generator=g))
    return z


def hand_log_joint(model, z, batch):
    """log Gamma(λ|α,β) + log Laplace(θ|θ̄,λ) + log|dλ/dlogλ| + (N̂/|B|) Σ log softmax — written out."""
    a, b, n_hat = model.alpha, model.beta, model.n_hat
    u, theta = z["lambda"], z["theta"]
    lam = u.exp()
    log_gamma = a * math.log(b) - math.lgamma(a) + (a - 1) * torch.log(lam) - b * lam
    log_laplace = -torch.log(2 * lam) - (theta - model.lifted.theta_bar).abs() / lam
    logits = model.lifted(theta, batch)
    loglik = torch.log_softmax(logits, -1).gather(1, batch["labels"][:, None]).sum()
    return (log_gamma + log_laplace + u).sum() + n_hat / batch["labels"].numel() * loglik


@pytest.mark.parametrize("seed", [0, 1])
def test_trace_log_joint_and_gradient_match_hand_written_density(tiny_model, text_batch, seed):
    potential = Potential(tiny_model, fast=False)
    z = random_point(potential, seed)
    u_trace = potential.value(z, text_batch) * tiny_model.n_hat
    u_hand = -hand_log_joint(tiny_model, z, text_batch)
    assert torch.allclose(u_trace, u_hand, rtol=1e-5)
    g_trace = torch.autograd.grad(u_trace, list(z.values()))
    g_hand = torch.autograd.grad(u_hand, list(z.values()))
    for gt, gh in zip(g_trace, g_hand):
        assert torch.allclose(gt, gh, rtol=1e-4, atol=1e-4 * gh.abs().max().item())


def test_fast_gradient_agrees_with_the_trace_gradient(tiny_model, text_batch):
    """The fast path (θ bound to the network, closed-form prior gradient) against autograd through the trace."""
    exact = Potential(tiny_model, fast=False)
    z_exact = random_point(exact, 3)
    nll_exact, g_exact = exact.gradient(z_exact, text_batch)
    head_exact = [p.grad.clone() for p in tiny_model.lifted.head_parameters()]
    for p in tiny_model.lifted.head_parameters():
        p.grad = None
    fast = Potential(tiny_model, fast=True)
    z_fast = fast.init(1e-2)
    with torch.no_grad():
        for k in z_fast:
            z_fast[k].copy_(z_exact[k])
    for _ in range(2):  # twice: the persistent buffers must be reset, not accumulated, between steps
        for p in tiny_model.lifted.head_parameters():
            p.grad = None
        nll_fast, g_fast = fast.gradient(z_fast, text_batch)
    assert torch.allclose(nll_fast, nll_exact)
    for k in g_exact:
        assert torch.allclose(g_fast[k], g_exact[k], atol=1e-5 * g_exact[k].abs().max()), k
    for a, b in zip(head_exact, [p.grad for p in tiny_model.lifted.head_parameters()]):
        assert torch.allclose(a, b, atol=1e-6)
    fast.release()
    emb = tiny_model.lifted.model.bert.embeddings.word_embeddings.weight
    assert emb.data_ptr() == tiny_model.lifted.theta_bar.data_ptr() and emb.grad is None


def test_closed_form_log_prior_matches_trace(tiny_model, text_batch):
    potential = Potential(tiny_model)
    z = random_point(potential, 4)
    tr = potential.trace(z, text_batch)
    nll = potential._nll(tr)
    assert torch.allclose(potential.log_joint(z, nll), -tiny_model.n_hat * potential.value(z, text_batch), rtol=1e-5)


def test_lifted_forward_at_theta_bar_is_the_original_network(text_batch):
    backbone = load_backbone("tiny-bert", 3, seed=0)
    backbone.model.eval()
    inputs = {k: v for k, v in text_batch.items() if k != "labels"}
    before = backbone.model(**inputs).logits
    lifted = LiftedBackbone(backbone)
    assert torch.equal(lifted(lifted.theta_bar, text_batch), before)
    assert lifted.head_names == ["classifier.weight", "classifier.bias"]
    assert lifted.d == sum(p.numel() for n, p in backbone.model.named_parameters() if n not in lifted.head_names)
    # θ̄ is the storage of the module's own (frozen) parameters: no second copy of the backbone
    emb = backbone.model.bert.embeddings.word_embeddings.weight
    assert emb.data_ptr() == lifted.theta_bar.data_ptr() and not emb.requires_grad


def test_gradient_wrt_flat_theta_matches_module_gradients(text_batch):
    backbone = load_backbone("tiny-bert", 3, seed=0)
    backbone.model.eval()
    inputs = {k: v for k, v in text_batch.items() if k != "labels"}
    backbone.model(**inputs).logits.square().sum().backward()
    reference = {n: p.grad.clone() for n, p in backbone.model.named_parameters()}
    lifted = LiftedBackbone(backbone)
    theta = lifted.theta_bar.clone().requires_grad_(True)
    lifted(theta, text_batch).square().sum().backward()
    for name, g in lifted.layout.split(theta.grad).items():
        assert torch.allclose(g, reference[name], atol=1e-6), name


def test_search_space_patterns_and_errors():
    backbone = load_backbone("tiny-bert", 2, seed=0)
    lifted = LiftedBackbone(backbone, Subset(include=("*attention*",), exclude=("*LayerNorm*",)))
    assert all("attention" in n and "LayerNorm" not in n for n in lifted.layout.names)
    excluded = dict(backbone.model.named_parameters())["bert.embeddings.word_embeddings.weight"]
    assert not excluded.requires_grad
    with pytest.raises(ValueError, match="search_space"):
        LiftedBackbone(load_backbone("tiny-bert", 2), Subset(include=("nothing*",)))


class ZeroShift(SearchSpace):
    """An additive search space: a zero-initialised shift on the output of every attention query projection,
    and only the shifts covered."""

    def attach(self, model):
        for name, module in model.named_modules():
            if name.endswith("attention.self.query"):
                module.shift = torch.nn.Parameter(torch.zeros(module.out_features))
                module.register_forward_hook(lambda m, inputs, out: out + m.shift)

    def covered(self, names, head_names):
        return [n for n in names if n.endswith(".shift")]


def test_a_search_space_may_add_zero_initialised_modules_centred_at_zero(text_batch):
    plain = load_backbone("tiny-bert", 2, seed=0)
    lifted = LiftedBackbone(load_backbone("tiny-bert", 2, seed=0), ZeroShift())
    assert all(n.endswith("attention.self.query.shift") for n in lifted.layout.names) and lifted.d == 2 * 32
    assert torch.equal(lifted.theta_bar, torch.zeros(lifted.d))  # the prior centre θ̄ of an added module is 0
    plain.model.eval(), lifted.model.eval()
    args, kwargs = plain.inputs(text_batch)
    with torch.no_grad():
        before = plain.logits(plain.model(*args, **kwargs))
        assert torch.equal(lifted(lifted.theta_bar, text_batch), before)  # at θ̄ the network is unchanged
        assert not torch.allclose(lifted(torch.full((lifted.d,), 0.5), text_batch), before)
    assert all(not p.requires_grad for n, p in lifted.model.named_parameters() if n not in lifted.head_names)


def test_regression_likelihood_is_normal(tiny_lifted, text_batch):
    model = GammaLaplaceModel(tiny_lifted, likelihood="normal", sigma=0.5, n_hat=10.0)
    out = torch.randn(4, 1)
    y = torch.randn(4)
    expected = torch.distributions.Normal(out.squeeze(-1), 0.5).log_prob(y)
    assert torch.allclose(model.observation(out).log_prob(y), expected)


@pytest.mark.parametrize("field,value", [("alpha", 0.0), ("beta", -1.0), ("n_hat", float("inf"))])
def test_bad_hyperparameters_name_the_field(tiny_lifted, field, value):
    with pytest.raises(ValueError, match=field):
        GammaLaplaceModel(tiny_lifted, **{field: value})
