"""Streaming moments against batch statistics; masks: exact budget, deterministic ties, files."""
import math

import pytest
import torch

from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.models.lifted import Layout
from bayestune_pyro.selection import masks
from bayestune_pyro.selection.masks import Mask, above_threshold, top_k, top_p

LAYOUT = Layout.of([("a.weight", torch.Size([30, 10])), ("a.bias", torch.Size([30])), ("b.weight", torch.Size([70]))])


def test_welford_moments_match_batch_statistics_and_pool_across_chains(tmp_path):
    g = torch.Generator().manual_seed(0)
    post = StreamingPosterior(LAYOUT, chains=2, n_tracked=7, track_delta_moments=True)
    draws = {0: torch.rand(9, LAYOUT.d, generator=g), 1: 3 + torch.rand(5, LAYOUT.d, generator=g)}
    for c, xs in draws.items():
        for x in xs:
            post.update(c, x, -x, {"loss": x.mean(), "log_joint": x.sum()})
    for c, xs in draws.items():
        assert torch.allclose(post.mean["lambda"][c], xs.mean(0), atol=1e-6)
        assert torch.allclose(post.m2["lambda"][c] / (len(xs) - 1), xs.var(0), atol=1e-5)
    everything = torch.cat([draws[0], draws[1]])
    mean, var = post.pooled("lambda")
    assert torch.allclose(mean, everything.mean(0), atol=1e-5)
    assert torch.allclose(var, everything.var(0), atol=1e-4)
    assert torch.allclose(post.pooled("delta")[0], -everything.mean(0), atol=1e-5)
    assert post.trace("lambda").shape == (2, 5, 7)  # cut to the shortest chain
    assert torch.equal(post.trace("lambda")[0, :, 0], draws[0][:5, post.tracked_index[0]])
    post.save(tmp_path, {"seconds": 1.5})
    back = StreamingPosterior.load(tmp_path)
    assert back.counts == [9, 5] and back.layout == LAYOUT and back.meta["seconds"] == 1.5
    assert torch.equal(back.lambda_mean, post.lambda_mean)
    assert torch.equal(back.trace("loss"), post.trace("loss"))


def test_posterior_without_samples_says_so():
    with pytest.raises(ValueError, match="no samples"):
        _ = StreamingPosterior(LAYOUT).lambda_mean


@pytest.mark.parametrize("p", [0.001, 0.01, 0.37, 1.0])
def test_top_p_holds_exactly_floor_p_d(p):
    scores = torch.rand(LAYOUT.d, generator=torch.Generator().manual_seed(1))
    mask = top_p(scores, p, LAYOUT)
    assert mask.k == math.floor(p * LAYOUT.d)
    if mask.k:
        assert scores[mask.index].min() >= scores[~mask.dense()].max() if mask.k < LAYOUT.d else True
    assert torch.equal(mask.index, mask.index.sort().values)


def test_ties_are_broken_towards_the_lower_index():
    scores = torch.zeros(LAYOUT.d)
    scores[[5, 50, 350]] = 2.0  # three winners, then a sea of ties
    mask = top_p(scores, 10 / LAYOUT.d, LAYOUT)
    assert mask.index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 50, 350]
    assert torch.equal(top_p(scores, 10 / LAYOUT.d, LAYOUT).index, mask.index)


def test_threshold_and_counts_and_files(tmp_path):
    scores = torch.arange(LAYOUT.d, dtype=torch.float32)
    mask = above_threshold(scores, 299.5, LAYOUT)
    assert mask.k == LAYOUT.d - 300 and mask.counts() == {"a.weight": 0, "a.bias": 30, "b.weight": 70}
    mask.save(tmp_path)
    back = Mask.load(tmp_path)
    assert torch.equal(back.index, mask.index) and back.threshold == 299.5 and back.layout == LAYOUT


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan")])
def test_bad_fraction_is_named(p):
    with pytest.raises(ValueError, match="^p: "):
        top_p(torch.rand(LAYOUT.d), p, LAYOUT)


@pytest.mark.parametrize("kind", ["uniform", "ties", "ascending", "descending", "infinite", "aliased"])
def test_top_k_equals_the_stable_sort_definition(kind, monkeypatch):
    """The candidate search gives exactly the stable-sort mask, also when its strided guess misses ("aliased": the
    sample sees only the large scores on its stride, so the guess keeps too few and the exact cut takes over)."""
    monkeypatch.setattr(masks, "SAMPLE", 100)  # stride 50 over d = 5000
    g = torch.Generator().manual_seed(3)
    d = 5000
    scores = {"uniform": torch.rand(d, generator=g), "ties": torch.randint(0, 4, (d,), generator=g).float(),
              "ascending": torch.arange(d).float(), "descending": -torch.arange(d).float(),
              "infinite": torch.where(torch.rand(d, generator=g) < 0.1, float("inf"), torch.rand(d, generator=g)),
              "aliased": torch.where(torch.arange(d) % 50 == 0, 2.0, torch.rand(d, generator=g))}[kind]
    layout = Layout.of([("w", torch.Size([d]))])
    for k in [0, 1, 7, 499, 500, 2500, 4999, 5000]:
        expect = torch.sort(scores, descending=True, stable=True).indices[:k].sort().values
        assert torch.equal(top_k(scores, k, layout, "t").index, expect), k


def test_nan_scores_are_refused():
    scores = torch.rand(LAYOUT.d)
    scores[3] = float("nan")
    with pytest.raises(ValueError, match="^scores: 1 of 400 are NaN"):
        top_p(scores, 0.1, LAYOUT)
