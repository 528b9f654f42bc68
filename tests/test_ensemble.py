"""Posterior ensembles of sparse deltas: the Bayesian stage 2 against NUTS's posterior predictive on a toy, the deep
ensemble's restarts, and the run's ensemble artifact against its reported predictive."""
import itertools
import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from test_pipeline import TINY_TEXT
from torch import nn

from bayestune_pyro.cli import main
from bayestune_pyro.config import RunConfig
from bayestune_pyro.data import TaskSpec
from bayestune_pyro.finetune.delta import SparseDelta, merge
from bayestune_pyro.finetune.ensemble import EnsembleConfig, deep_members, predictive, sgld_members
from bayestune_pyro.finetune.stage2 import SparseFineTuner, Stage2Config, fit
from bayestune_pyro.models.backbones import Backbone
from bayestune_pyro.models.lifted import LiftedBackbone
from bayestune_pyro.optim import GaussianSGLD
from bayestune_pyro.run_setup import setup

D, N, MASK, SD, HEAD_SD = 6, 100, [0, 1, 2, 4], 1.0, 1.5
BINARY = TaskSpec("toy", 2, "accuracy", ("0", "1"))


class TwoClass(nn.Module):
    """Logits (0, x·w + b): a logistic regression whose w is the backbone (θ̄ = 0) and b the head."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(D))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        eta = x @ self.w + self.b
        return torch.stack([torch.zeros_like(eta), eta], -1)


def toy_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.tensor([1.2, -0.8, 0.0, 0.5, 0.6, 0.0])
    y = torch.bernoulli(torch.sigmoid(x @ w + 0.3), generator=g).long()
    x_test = 1.5 * torch.randn(40, D, generator=g)
    return {"x": x, "labels": y}, {"x": x_test, "labels": torch.zeros(40, dtype=torch.long)}


def toy_tuner():
    lifted = LiftedBackbone(Backbone(TwoClass(), head_names=["b"], kind="tensor", source="toy"))
    loss = lambda out, labels: nn.functional.cross_entropy(out, labels)  # noqa: E731 — the mean NLL
    return SparseFineTuner(lifted, torch.tensor(MASK), loss, Stage2Config(steps=200, lr=0.05, head_lr=0.05))


def nuts_predictive(train, test):
    """NUTS on the same posterior, written plainly: w_mask ~ N(0, σ²), b ~ N(0, σ_h²), y ~ Bernoulli(σ(x·w + b))."""
    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(len(MASK)), SD).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, HEAD_SD))
        pyro.sample("y", dist.Bernoulli(logits=x[:, MASK] @ w + b).to_event(1), obs=y)

    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model, jit_compile=True, ignore_jit_warnings=True), num_samples=2000, warmup_steps=500,
                disable_progbar=True)
    mcmc.run(train["x"], train["labels"].float())
    draws = mcmc.get_samples()
    p1 = torch.sigmoid(draws["w"] @ test["x"][:, MASK].T + draws["b"][:, None]).mean(0)
    return p1, draws


def test_sgld_ensemble_matches_the_nuts_posterior_predictive():
    """From the point estimate, the Bayesian stage 2 (through the tuner, as the pipeline runs it) samples (δ, head)
    at N̂ = N: its mean predictive on 40 test points and its δ and head moments agree with NUTS's."""
    train, test = toy_data()
    tuner = toy_tuner()
    fit(tuner, itertools.repeat(train), tuner.config, progress=False)
    config = EnsembleConfig("sgld", size=1000, burnin=300, thin=8, lr=0.02, prior_sd=SD, head_prior_sd=HEAD_SD)
    states, info = sgld_members(tuner, itertools.repeat(train), config, n_train=N, seed=0, progress=False)
    assert info == {"n_hat": N, "prior_sd": SD, "head_prior_sd": HEAD_SD} and len(states) == 1000
    mean, _ = predictive(tuner, states, [test], BINARY, "cpu")
    reference, draws = nuts_predictive(train, test)
    assert mean.shape == (40, 2) and torch.allclose(mean.sum(1), torch.ones(40, dtype=torch.float64))
    assert (mean[:, 1] - reference.double()).abs().max() < 0.02
    assert (reference - 0.5).abs().max() > 0.3  # the test points span confident and uncertain predictions
    delta = torch.stack([s["delta"] for s in states])
    head = torch.stack([s["head.b"] for s in states])
    for ours, theirs in ((delta, draws["w"]), (head[:, None], draws["b"][:, None])):
        sd = theirs.std(0)
        assert ((ours.mean(0) - theirs.mean(0)).abs() / sd).max() < 0.15  # means within 0.15 posterior sd
        assert ((ours.std(0) / sd) - 1).abs().max() < 0.15


def test_sgld_ensemble_leaves_the_tuner_at_its_point_estimate():
    train, _ = toy_data()
    tuner = toy_tuner()
    fit(tuner, itertools.repeat(train), tuner.config, progress=False)
    point = tuner.state()
    states, info = sgld_members(tuner, itertools.repeat(train), EnsembleConfig("sgld", size=3, burnin=2, thin=2),
                                n_train=N, seed=0, progress=False)
    assert info["prior_sd"] == pytest.approx(point["delta"].square().mean().sqrt().item())  # empirical Bayes
    assert all(not torch.equal(s["delta"], point["delta"]) for s in states)
    assert all(torch.equal(v, tuner.state()[k]) for k, v in point.items())
    assert isinstance(tuner.opt, torch.optim.AdamW) and not tuner.opt.state  # fresh optimizers


def test_deep_members_restart_from_zero_with_fresh_heads_and_optimizers():
    """With one stage-2 step, each refit is exactly one AdamW step from δ = 0 (|δ| = lr wherever the gradient is
    nonzero): neither δ nor the moments carry over from the point estimate."""
    train, _ = toy_data()
    tuner = toy_tuner()
    fit(tuner, itertools.repeat(train), tuner.config, progress=False)
    point = tuner.state()
    one = Stage2Config(steps=1, lr=0.05, head_lr=0.05)
    states = deep_members(tuner, lambda seed: itertools.repeat(train), one, None, size=3, seed=7, progress=False)
    assert len(states) == 3 and torch.equal(states[0]["delta"], point["delta"])
    for state in states[1:]:
        assert torch.allclose(state["delta"].abs(), torch.full((len(MASK),), 0.05), rtol=1e-5)
    assert torch.equal(tuner.state()["delta"], point["delta"])


class DropoutTwoClass(TwoClass):
    """TwoClass with dropout on the inputs, so training draws from the global generator."""

    def forward(self, x):
        return super().forward(nn.functional.dropout(x, 0.5, self.training))


def test_deep_members_do_not_depend_on_what_drew_from_the_global_generator_before():
    """Each refit seeds its dropout: the same members whether or not something (an evaluation loader, another
    ensemble) drew random numbers first."""
    train, _ = toy_data()
    runs = []
    for draws_before in (0, 5):
        lifted = LiftedBackbone(Backbone(DropoutTwoClass(), head_names=["b"], kind="tensor", source="toy"))
        loss = lambda out, labels: nn.functional.cross_entropy(out, labels)  # noqa: E731
        tuner = SparseFineTuner(lifted, torch.tensor(MASK), loss, Stage2Config(steps=20, lr=0.05, head_lr=0.05))
        torch.rand(draws_before)
        states = deep_members(tuner, lambda seed: itertools.repeat(train), tuner.config, None, size=3, seed=7,
                              progress=False)
        runs.append(states)
    for a, b in zip(*runs):
        assert torch.equal(a["delta"], b["delta"])
    assert not torch.equal(runs[0][1]["delta"], runs[0][2]["delta"])  # the members differ from each other


def test_gaussian_sgld_samples_the_prior_without_data():
    """No likelihood (zero gradients): plain SGLD on N(0, σ²) at temperature γ² has variance γ²σ² in equilibrium."""
    p = nn.Parameter(torch.zeros(20_000))
    opt = GaussianSGLD([p], lr=0.05, n_hat=10.0, prior_sd=0.3, gamma=0.5, preconditioner="none", seed=0)
    for _ in range(400):  # relaxation time σ²N̂/lr ≈ 18 steps
        p.grad = torch.zeros_like(p)
        opt.step()
    # the discretised chain's stationary variance is γ²σ²/(1 − lr/(2σ²N̂)), 1.4% above γ²σ² here
    assert p.detach().var().item() == pytest.approx(0.25 * 0.09 / (1 - 0.05 / (2 * 0.09 * 10)), rel=0.03)


def test_run_writes_ensembles_whose_members_give_the_reported_predictive(tmp_path):
    """``--ensemble sgld deep``: metrics.json scores each ensemble next to the point estimate and its
    temperature-scaled copy; ensemble-<kind>.safetensors holds S members of the mask's k coordinates, and merging
    each member and averaging their softmax gives exactly the reported ensemble NLL and accuracy."""
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY_TEXT, "--p", "0.01", "--validation-fraction", "0.25",
                 "--ensemble", "sgld", "deep", "--ensemble-size", "3", "--ensemble-burnin", "2",
                 "--ensemble-thin", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["temperature"]["T"] > 0 and {"nll", "brier", "ece"} <= set(metrics["temperature"])
    s = setup(RunConfig.from_yaml(out / "config.yaml"))
    assert set(metrics["ensembles"]) == {"sgld", "deep"}
    for kind, ensemble in metrics["ensembles"].items():
        assert ensemble["size"] == 3 and "validation_score" in ensemble
        assert {"accuracy", "nll", "brier", "ece"} <= set(ensemble["test"])
        assert sum(ensemble["reliability"]["count"]) == metrics["n_test"]
        path = out / f"ensemble-{kind}.safetensors"
        members = SparseDelta.load(path)
        assert members.members == 3 and members.n_updated == metrics["n_updated"]
        with pytest.raises(ValueError, match="is an ensemble of 3 deltas"):
            merge(path)
        probs, labels = 0, None
        for m in range(3):
            model = merge(path, member=m).model.eval()
            with torch.no_grad():
                outputs, labels = zip(*[(model(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"])
                                        for b in s.test_loader()])
            probs = probs + torch.cat(outputs).double().softmax(-1)
        probs, labels = probs / 3, torch.cat(labels)
        assert nn.functional.nll_loss(probs.log(), labels).item() == pytest.approx(ensemble["test"]["nll"], rel=1e-5)
        assert (probs.argmax(1) == labels).double().mean().item() == pytest.approx(ensemble["test"]["accuracy"])
    point, deep = SparseDelta.load(out / "delta.safetensors"), SparseDelta.load(out / "ensemble-deep.safetensors")
    assert all(torch.equal(point.updates[n][1], v[0]) for n, (_, v) in deep.updates.items())  # member 0: the point


def test_sgld_grid_keeps_the_lowest_validation_nll(tmp_path):
    """``--ensemble-gamma 0.1,1 --ensemble-prior-scale 1,10`` samples one ensemble per (γ, scale), records every
    validation NLL, keeps the lowest, and the kept ensemble is the one a run at that single point samples (same
    test scores, same members)."""
    common = [*TINY_TEXT, "--p", "0.01", "--validation-fraction", "0.25", "--ensemble", "sgld", "--ensemble-size",
              "2", "--ensemble-burnin", "2", "--ensemble-thin", "2", "--ensemble-lr", "3e-2"]
    assert main(["run", "--out", str(tmp_path / "grid"), *common, "--ensemble-gamma", "0.1,1",
                 "--ensemble-prior-scale", "1,10"]) == 0
    ensemble = json.loads((tmp_path / "grid" / "metrics.json").read_text())["ensembles"]["sgld"]
    nll = {(point["gamma"], point["prior_scale"]): point["validation"]["nll"] for point in ensemble["grid"]}
    assert set(nll) == {(0.1, 1.0), (0.1, 10.0), (1.0, 1.0), (1.0, 10.0)} and len(set(nll.values())) == 4
    chosen = min(nll, key=nll.get)
    assert (ensemble["gamma"], ensemble["prior_scale"]) == chosen and ensemble["validation"]["nll"] == nll[chosen]
    assert main(["run", "--out", str(tmp_path / "one"), *common, "--ensemble-gamma", str(chosen[0]),
                 "--ensemble-prior-scale", str(chosen[1])]) == 0
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())["ensembles"]["sgld"]
    assert "grid" not in single and single["test"] == ensemble["test"]
    assert single["prior_sd"] == ensemble["prior_sd"]
    grid_members = SparseDelta.load(tmp_path / "grid" / "ensemble-sgld.safetensors").updates
    one_members = SparseDelta.load(tmp_path / "one" / "ensemble-sgld.safetensors").updates
    assert all(torch.equal(grid_members[n][1], one_members[n][1]) for n in one_members)


@pytest.mark.parametrize("name", ["gamma", "prior-scale"])
def test_an_ensemble_grid_needs_a_validation_split(capsys, name):
    assert main(["run", "--out", "unused", "--backbone", "tiny-bert", "--ensemble", "sgld", f"--ensemble-{name}",
                 "0.1,1", "--validation-fraction", "0"]) == 2
    field = "ensemble_" + name.replace("-", "_")
    assert f"{field}: a grid is chosen on the validation split" in capsys.readouterr().err


def test_an_ensemble_needs_a_masked_method(capsys):
    assert main(["run", "--out", "unused", "--backbone", "tiny-bert", "--method", "full", "--ensemble", "sgld"]) == 2
    assert "ensemble: method 'full' trains without a fixed mask" in capsys.readouterr().err


def test_nuts_reference_is_not_the_prior():
    """The data move the posterior: NUTS's predictive differs from the prior predictive (a check on the check)."""
    train, test = toy_data()
    reference, _ = nuts_predictive(train, test)
    g = torch.Generator().manual_seed(1)
    w, b = SD * torch.randn(4000, len(MASK), generator=g), HEAD_SD * torch.randn(4000, generator=g)
    prior = torch.sigmoid(w @ test["x"][:, MASK].T + b[:, None]).mean(0)
    assert (reference - prior).abs().max() > 0.2
    assert np.isfinite(reference.numpy()).all()
