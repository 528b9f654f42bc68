"""Coordinates the data never touch keep their prior: their λ̂ is α/β exactly, not a chain's noise."""
import pytest
import torch

from bayestune_pyro.config import RunConfig
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.inference.potential import Potential
from bayestune_pyro.models.lifted import Layout
from bayestune_pyro.optim import BayesTuneSGLD
from bayestune_pyro.pipeline import stage1

LAYOUT = Layout.of([("w", torch.Size([4, 5])), ("b", torch.Size([6]))])
ALPHA, BETA = 0.01, 100.0


def _posterior(flat_prior, chains=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    post = StreamingPosterior(LAYOUT, chains=chains, n_tracked=3, estimator="rao-blackwell", flat_prior=flat_prior)
    for c in range(chains):
        for _ in range(5):
            lam = torch.rand(LAYOUT.d, generator=g)
            post.update(c, lam, lam, {"loss": lam.sum(), "log_joint": lam.sum()}, lam_rb=2 * lam)
    return post


def test_untouched_coordinates_get_the_prior_moments_and_the_file_keeps_them(tmp_path):
    post = _posterior((ALPHA, BETA))
    raw_mean, raw_var = post.pooled("lambda_rb")
    touched = torch.arange(LAYOUT.d) % 3 != 0
    post.add_touched(touched)
    mean, var = post.pooled("lambda_rb")
    assert torch.equal(mean[touched], raw_mean[touched]) and torch.equal(var[touched], raw_var[touched])
    assert torch.all(mean[~touched] == ALPHA / BETA) and torch.all(var[~touched] == ALPHA / BETA**2)
    assert torch.equal(post.lambda_mean, mean) and post.untouched == int((~touched).sum())
    assert torch.equal(post.pooled("lambda")[0][~touched], torch.full(((~touched).sum(),), ALPHA / BETA))
    post.save(tmp_path)
    back = StreamingPosterior.load(tmp_path)
    assert back.flat_prior == (ALPHA, BETA) and torch.equal(back.touched, touched)
    assert torch.equal(back.lambda_mean, post.lambda_mean)


def test_without_a_flat_prior_or_a_record_of_touches_the_estimate_is_the_chains():
    point = _posterior(None)
    raw = point.lambda_mean.clone()
    point.add_touched(torch.zeros(LAYOUT.d, dtype=torch.bool))  # a point estimate (MAP): its own mode stands
    assert torch.equal(point.lambda_mean, raw)
    unrecorded = _posterior((ALPHA, BETA))
    assert unrecorded.untouched is None and torch.equal(unrecorded.lambda_mean, raw)


def test_chains_merge_their_touches_and_must_share_the_prior():
    a, b = _posterior((ALPHA, BETA)), _posterior((ALPHA, BETA), seed=1)
    a.add_touched(torch.arange(LAYOUT.d) < 10)
    b.add_touched(torch.arange(LAYOUT.d) >= 20)
    merged = StreamingPosterior.concatenate([a, b])
    assert merged.untouched == 10 and torch.all(merged.lambda_mean[10:20] == ALPHA / BETA)
    with pytest.raises(ValueError, match="flat_prior"):
        StreamingPosterior.concatenate([a, _posterior((ALPHA, 2 * BETA))])


def test_the_likelihood_touches_exactly_the_embedding_rows_of_the_tokens_in_the_batch(tiny_model, text_batch):
    potential = Potential(tiny_model)
    z = potential.init(1e-4)
    potential.gradient(z, text_batch)
    rows = tiny_model.lifted.layout.split(potential.touched)
    words = next(v for k, v in rows.items() if k.endswith("word_embeddings.weight"))
    tokens = torch.unique(text_batch["input_ids"][text_batch["attention_mask"].bool()])  # [PAD]'s row is frozen
    assert torch.equal(words.any(1).nonzero().view(-1), tokens)
    positions = next(v for k, v in rows.items() if k.endswith("position_embeddings.weight"))
    assert positions.any(1).nonzero().view(-1).tolist() == list(range(text_batch["input_ids"].shape[1]))
    assert potential.touched.sum() < potential.touched.numel()  # the check is not vacuous
    potential.release()


@pytest.mark.parametrize("engine,exact", [("sgld", True), ("map", False)])
def test_a_sampler_reports_the_prior_mean_where_the_data_never_reached(tmp_path, engine, exact):
    config = RunConfig.from_dict(dict(backbone="tiny-bert", shots_per_class=4, max_length=24, steps=10, warmup=2,
                                      burnin=2, thin=2, n_tracked=8, inference=engine))
    post = stage1(config, tmp_path, progress=False)
    assert 0 < post.untouched < post.d
    raw = post.mean[post.estimate][0]  # the chain's own Monte-Carlo (or, for MAP, point) estimate
    untouched = post.lambda_mean[~post.touched]
    if exact:  # the chain's own estimate there was noise; the reported one is the prior mean
        assert not torch.all(raw[~post.touched] == config.alpha / config.beta)
        assert torch.all(untouched == config.alpha / config.beta)
    else:
        assert torch.equal(post.lambda_mean, raw)


def test_the_optimizer_reports_the_prior_mean_for_coordinates_without_gradient():
    theta = torch.nn.Parameter(torch.zeros(50))
    optimizer = BayesTuneSGLD([theta], n_hat=1e3, alpha=ALPHA, beta=BETA, lr=1e-3, seed=0)
    for _ in range(4):
        theta.grad = torch.zeros_like(theta)
        theta.grad[:20] = 1.0  # the likelihood reaches the first 20 coordinates only
        optimizer.step()
    hat = optimizer.lambda_hat()[theta]
    assert torch.all(hat[20:] == ALPHA / BETA) and not torch.any(hat[:20] == ALPHA / BETA)
    mode = BayesTuneSGLD([theta], n_hat=1e3, gamma=0.0, alpha=ALPHA, beta=BETA, lambda_init=0.5)
    theta.grad = torch.zeros_like(theta)
    mode.step()
    assert torch.all(mode.lambda_hat()[theta] != ALPHA / BETA)

