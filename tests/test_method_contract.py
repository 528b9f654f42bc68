"""The contract every registered method keeps, checked over the registry (a new method is checked by adding it),
on the backbone's own coordinates (``subset``) and on added modules only (``additive``):

- the mask holds exactly the budget k = ⌊p·d⌋ distinct coordinates (BitFit: its natural p when below it; linear: 0);
- ``n_updated`` agrees with what training *measurably* did: the coordinates of the θ the network runs with that
  left θ̄ lie inside what the tuner may train, and, for masked methods, n_updated is the mask's size;
- every other coordinate stays bitwise at θ̄ (weight decay on);
- ``release()`` gives the module back θ̄: frozen, unbound, without gradients.
"""
import math

import pytest
import torch

from bayestune_pyro import pipeline
from bayestune_pyro.config import RunConfig
from bayestune_pyro.registry import METHODS
from bayestune_pyro.run_setup import setup

TINY = dict(backbone="tiny-bert", shots_per_class=4, max_length=24, batch_size=8, steps=8, warmup=2, burnin=2,
            thin=2, stage2_steps=3, n_tracked=8, grad_batches=2, stage2_lr=0.05, weight_decay=0.1, p=0.01)


# methods whose premise the additive space (only added, zero-or-random-initialised modules) does not meet
UNFIT_FOR_ADDED_MODULES = {"bitfit": "bitfit needs bias terms", "lora": "lora_targets: .* match no covered",
                           "magnitude": "magnitude ranks pretrained weights"}


def network_theta(s, tuner, batch) -> torch.Tensor:
    """The flat covered θ the network computes with in ``tuner.forward``, spied on the way in."""
    lifted, seen = s.lifted, {}
    forward_with = lifted.forward_with

    def spy(params, batch):
        seen.update(params)
        return forward_with(params, batch)

    lifted.forward_with = spy
    try:
        with torch.no_grad():
            tuner.forward(batch)
    finally:
        del lifted.forward_with
    named = dict(lifted.model.named_parameters())
    return torch.cat([seen.get(n, named[n]).detach().reshape(-1) for n in lifted.layout.names])


@pytest.mark.parametrize("space", ["subset", "additive"])
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_keeps_the_contract(name, space, tmp_path):
    method = METHODS.get(name)
    config = RunConfig.from_dict({**TINY, "method": name, "search_space": space, "additive_width": 4}, strict=False)
    s = setup(config)
    if space == "additive" and name in UNFIT_FOR_ADDED_MODULES:  # a one-line error, not a meaningless mask
        with pytest.raises(ValueError, match=UNFIT_FOR_ADDED_MODULES[name]):
            method.tuner(s, config.options, method.select(s, config.options) if method.select else None)
        return
    d, k = s.lifted.d, math.floor(config.p * s.lifted.d)
    mask = None
    if method.posterior:
        pipeline.stage1(config, tmp_path, progress=False)
        mask = pipeline.export(tmp_path, config.p)
    elif method.select is not None:
        mask = method.select(s, config.options)
    if mask is not None:
        biases = sum(n for t, n in zip(s.lifted.layout.names, s.lifted.layout.numels) if t.endswith(".bias"))
        expected = {"linear": 0, "bitfit": min(k, biases)}.get(name, k)
        assert mask.index.unique().numel() == mask.k == expected
    tuner = method.tuner(s, config.options, mask)
    batches = s.train_batches()
    s.lifted.model.eval()
    for _ in range(3):
        tuner.step(next(batches))
    theta = network_theta(s, tuner, next(batches))
    moved = theta != s.lifted.theta_bar
    if mask is not None:
        assert tuner.n_updated == mask.k
        allowed = mask.dense()
    elif name == "stochastic":
        assert tuner.n_updated == k and int(moved.sum()) <= 3 * k  # k fresh coordinates per step
        allowed = torch.ones(d, dtype=torch.bool)
    elif name == "lora":  # the backbone stays θ̄; n_updated counts the factors A, B, and B moved
        assert tuner.n_updated == sum(t.numel() for t in tuner.trained().values())
        assert any(b.abs().sum() > 0 for _, b in tuner.factors.values())
        allowed = torch.zeros(d, dtype=torch.bool)
    else:
        assert tuner.n_updated == d
        allowed = torch.ones(d, dtype=torch.bool)
    assert torch.equal(theta[~allowed], s.lifted.theta_bar[~allowed])
    assert name in ("linear", "lora") or moved.any()
    tuner.release()
    assert s.lifted.bound is None
    for p, view in zip(s.lifted.covered_parameters(), s.lifted.layout.split(s.lifted.theta_bar).values()):
        assert p.data_ptr() == view.data_ptr() and not p.requires_grad and p.grad is None
    assert torch.equal(network_theta(s, _Plain(s), next(batches)), s.lifted.theta_bar)


class _Plain:
    """A forward through the module as it is (after release: θ̄)."""

    def __init__(self, s):
        self.s = s

    def forward(self, batch):
        args, kwargs = self.s.lifted.backbone.inputs(batch)
        return self.s.lifted.model(*args, **kwargs)
