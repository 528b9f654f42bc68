"""Peer methods: exact budgets, frozen coordinates bitwise at θ̄, SIFT's hooks equal to plain backward, the
stochastic mask law, LoRA's rank matching, L1-SP's pull, and validation-based model selection."""
import dataclasses
import itertools
import math

import pytest
import torch

from bayestune_pyro.config import RunConfig
from bayestune_pyro.finetune.dense import DenseFineTuner
from bayestune_pyro.finetune.lora import LoRATuner, lora_targets, rank_for_budget
from bayestune_pyro.finetune.stage2 import SparseFineTuner, Stage2Config, Tuner, fit
from bayestune_pyro.finetune.stochastic import StochasticTuner
from bayestune_pyro.pipeline import run
from bayestune_pyro.registry import METHODS
from bayestune_pyro.run_setup import setup
from bayestune_pyro.selection import peers
from bayestune_pyro.selection.masks import Mask, budget
from bayestune_pyro.selection.stochastic import exponential_race

TINY = dict(backbone="tiny-bert", shots_per_class=4, max_length=24, batch_size=8, steps=8, warmup=2, burnin=2,
            thin=2, stage2_steps=4, n_tracked=8, grad_batches=2, stage2_lr=0.05, weight_decay=0.1, p=0.01)


def tiny_setup(**changes):
    return setup(RunConfig.from_dict({**TINY, **changes}, strict=False))  # TINY holds options of several methods


def select_mask(s):
    return METHODS.get(s.config.method).select(s, s.config.options)


def make_tuner(s, mask):
    return METHODS.get(s.config.method).tuner(s, s.config.options, mask)


def steps(tuner: Tuner, s, n: int = 3) -> None:
    """n training steps without dropout, so two tuners fed the same batches compute the same gradients."""
    batches = s.train_batches()
    s.lifted.model.eval()
    for _ in range(n):
        tuner.step(next(batches))


def covered_theta(s) -> torch.Tensor:
    """The covered parameters as the module holds them now, flat."""
    return torch.cat([p.detach().reshape(-1) for p in s.lifted.covered_parameters()])


@pytest.mark.parametrize("method", ["random", "magnitude", "gradient", "sift", "l1sp"])
def test_masked_methods_train_exactly_the_budget_and_nothing_else(method):
    s = tiny_setup(method=method)
    mask = select_mask(s)
    k = budget(s.config.p, s.lifted.d)
    assert mask.k == k and mask.index.unique().numel() == k and mask.method == method
    tuner = make_tuner(s, mask)
    assert tuner.n_updated == k
    steps(tuner, s)
    theta = tuner.work if tuner.backward == "hooks" else tuner.theta().detach()
    frozen = ~mask.dense()
    assert torch.equal(theta[frozen], s.lifted.theta_bar[frozen])  # weight decay 0.1 included
    assert (theta[mask.index] != s.lifted.theta_bar[mask.index]).any()  # (unused word embeddings stay put)


def test_sift_hooks_give_the_plain_backward_with_k_sized_gradients():
    a, b = tiny_setup(method="sift"), tiny_setup(method="sift")
    mask = select_mask(a)
    plain = SparseFineTuner(a.lifted, mask.index, a.nll, Stage2Config(lr=0.05, weight_decay=0.1))
    hooked = SparseFineTuner(b.lifted, mask.index, b.nll, Stage2Config(lr=0.05, weight_decay=0.1), backward="hooks")
    steps(plain, a), steps(hooked, b)
    assert torch.allclose(plain.delta, hooked.delta, atol=1e-6, rtol=1e-5)
    assert torch.allclose(plain.theta(), hooked.work, atol=1e-6)
    assert torch.allclose(covered_theta(b), hooked.work)  # the module runs with the working copy
    counts = mask.counts()
    for name, param in zip(b.lifted.layout.names, b.lifted.covered_parameters()):
        assert param.grad is None  # no tensor-sized gradient outlives its backward node
        assert param.requires_grad == (counts[name] > 0)
    frozen = ~mask.dense()
    assert torch.equal(hooked.work[frozen], b.lifted.theta_bar[frozen])


def test_bitfit_takes_every_bias_or_the_top_k_biases():
    s = tiny_setup(method="bitfit")
    natural = sum(n for name, n in zip(s.lifted.layout.names, s.lifted.layout.numels) if name.endswith(".bias"))
    mask = select_mask(s)  # the budget (⌊0.01·d⌋) exceeds the number of biases: all of them, natural p
    assert mask.k == natural and mask.info["natural_p"] == pytest.approx(natural / s.lifted.d)
    assert all(n.endswith(".bias") for n, c in mask.counts().items() if c)
    small = s.config.replace(p=0.5 * natural / s.lifted.d)
    s.config = small
    mask = select_mask(s)
    assert mask.k == budget(small.p, s.lifted.d) < natural
    assert all(n.endswith(".bias") for n, c in mask.counts().items() if c)


def test_gradient_scores_sum_the_absolute_gradients_of_each_batch():
    s = tiny_setup()
    scores = peers.gradient_scores(s.lifted, s.train_batches(), s.nll, 2)
    batches, expected = s.train_batches(), torch.zeros(s.lifted.d)
    s.lifted.model.eval()
    for _ in range(2):
        theta = s.lifted.theta_bar.clone().requires_grad_()
        batch = next(batches)
        (grad,) = torch.autograd.grad(s.nll(s.lifted(theta, batch), batch["labels"]), theta)
        expected += grad.abs()
    assert torch.allclose(scores, expected, atol=1e-7, rtol=1e-5)
    assert all(not p.requires_grad and p.grad is None for p in s.lifted.covered_parameters())  # θ̄ restored


def test_sift_stays_inside_its_modules_and_says_when_they_are_too_small():
    s = tiny_setup(method="sift", sift_modules=["*attention*"], p=0.005)
    mask = select_mask(s)
    assert all("attention" in n for n, c in mask.counts().items() if c)
    s.config = s.config.replace(sift_modules=["*LayerNorm.bias"])
    with pytest.raises(ValueError, match="sift_modules"):
        select_mask(s)


def test_exponential_race_draws_without_replacement_in_proportion_to_the_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    n = 20000
    firsts = torch.stack([exponential_race(w, 1, g) for _ in range(n)]).flatten()
    assert torch.allclose(torch.bincount(firsts, minlength=5) / n, w / w.sum(), atol=0.012)
    pairs = torch.stack([exponential_race(w, 2, g) for _ in range(n)])
    inclusion = torch.bincount(pairs.flatten(), minlength=5) / n
    exact = torch.zeros(5)  # successive sampling: P(i in pair) = Σ_j P(i then j) + P(j then i)
    for i, j in itertools.permutations(range(4), 2):
        p = w[i] / w.sum() * w[j] / (w.sum() - w[i])
        exact[i] += p
        exact[j] += p
    assert torch.allclose(inclusion, exact, atol=0.015)
    assert inclusion[4] == 0


def test_stochastic_tuning_moves_at_most_k_coordinates_per_step():
    s = tiny_setup(method="stochastic")
    k = budget(s.config.p, s.lifted.d)
    tuner = make_tuner(s, None)
    assert isinstance(tuner, StochasticTuner) and tuner.n_updated == k
    batches = s.train_batches()
    s.lifted.model.eval()
    for _ in range(3):
        before = tuner.theta.clone()
        tuner.step(next(batches))
        assert 0 < int((tuner.theta != before).sum()) <= k
    assert k < tuner.n_changed() <= 3 * k
    # μ: mean |input| of every covered linear layer, one per input feature
    mu = tuner.masks.mu
    shapes = dict(zip(s.lifted.layout.names, s.lifted.layout.shapes))
    assert mu and all(v.shape == (shapes[n][1],) for n, v in mu.items())


def test_lora_rank_matches_the_budget_and_the_backbone_stays_frozen():
    s = tiny_setup(method="lora")
    k = budget(s.config.p, s.lifted.d)
    targets = lora_targets(s.lifted)
    assert targets and all(n.endswith(("query", "value")) for n in targets)
    per_rank = sum(sum(shape) for n, shape in zip(s.lifted.layout.names, s.lifted.layout.shapes)
                   if n.removesuffix(".weight") in targets)
    rank = rank_for_budget(s.lifted, targets, k)
    assert abs(rank * per_rank - k) <= per_rank / 2
    tuner = make_tuner(s, None)
    assert isinstance(tuner, LoRATuner) and tuner.n_updated == rank * per_rank
    batch = next(s.train_batches())
    s.lifted.model.eval()
    with torch.no_grad():  # B = 0: LoRA starts exactly at the pretrained network
        pretrained = tuner.forward(batch)
        tuner.release()
        assert torch.equal(pretrained, tuner.forward(batch))
    tuner = make_tuner(s, None)
    steps(tuner, s)
    assert torch.equal(covered_theta(s), s.lifted.theta_bar)
    assert any(b.abs().sum() > 0 for _, b in tuner.factors.values())
    tuner.release()  # the module is gone: its factors and its hooks
    modules = dict(s.lifted.model.named_modules())
    assert not any(".bt_" in n for n, _ in s.lifted.model.named_parameters())
    assert not any(modules[n]._forward_hooks for n in targets)


def test_full_and_linear_are_the_dense_and_empty_ends():
    s = tiny_setup(method="full")
    tuner = make_tuner(s, None)
    assert isinstance(tuner, DenseFineTuner) and tuner.n_updated == s.lifted.d
    s = tiny_setup(method="linear")
    mask = select_mask(s)
    assert mask.k == 0 and make_tuner(s, mask).n_updated == 0


def test_l1_to_theta_bar_pulls_back_and_leaves_theta_bar_alone():
    s = tiny_setup()
    zero_loss = lambda out, labels: 0.0 * out.sum()  # noqa: E731 — only the penalty acts
    tuner = DenseFineTuner(s.lifted, zero_loss, Stage2Config(lr=1e-3), l1=1.0)
    steps(tuner, s, 2)
    assert torch.equal(tuner.theta, s.lifted.theta_bar)  # sign(0) = 0: nothing moves at θ̄
    with torch.no_grad():
        tuner.theta.add_(0.01)
    steps(tuner, s, 2)
    assert ((tuner.theta - s.lifted.theta_bar).abs() < 0.01).all()  # every coordinate moved back towards θ̄
    tuner.release()
    theta, bar = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, -2.0, 0.0])
    assert torch.allclose(peers.relative_change_scores(theta, bar),
                          torch.tensor([0.5 / (0.5 + 1e-3), 0.0, 0.5 / 1e-3]))


def test_fit_restores_the_state_with_the_best_validation_score():
    s = tiny_setup()
    mask = select_mask(dataclasses.replace(s, config=s.config.replace(method="random")))
    tuner = SparseFineTuner(s.lifted, mask.index, s.nll, Stage2Config(steps=6, lr=0.05, eval_every=2))
    scores, seen = iter([0.2, 0.9, 0.4]), []

    def validate(forward):
        seen.append(tuner.delta.detach().clone())
        return next(scores)

    result = fit(tuner, s.train_batches(), tuner.config, validate, progress=False)
    assert result["best_step"] == 4 and result["validation"] == [(2, 0.2), (4, 0.9), (6, 0.4)]
    assert torch.equal(tuner.delta, seen[1]) and not torch.equal(seen[1], seen[2])


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_runs_through_the_pipeline(tmp_path, method):
    config = RunConfig.from_dict({**TINY, "method": method, "validation_fraction": 0.2, "eval_every": 2}, strict=False)
    metrics = run(config, tmp_path / method, progress=False)
    k = math.floor(config.p * metrics["n_total"])
    assert metrics["method"] == method and metrics["budget"] == k and "validation_best_step" in metrics
    expected = {"full": metrics["n_total"], "linear": 0}.get(method, k)
    if method == "bitfit":  # fewer biases than the budget: every bias, BitFit's natural p
        layout = Mask.load(tmp_path / method).layout
        expected = sum(n for name, n in zip(layout.names, layout.numels) if name.endswith(".bias"))
        assert expected < k
    if method == "lora":
        assert abs(metrics["n_updated"] - k) < 0.05 * k
    else:
        assert metrics["n_updated"] == expected
    assert (tmp_path / method / "delta.safetensors").exists() == (method not in ("stochastic", "full", "lora"))
