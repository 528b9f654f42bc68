"""The parallel noise streams: reproducible on any number of threads, standard normal, and resumable."""
import pytest
import torch

from bayestune_pyro.inference import noise as noise_module
from bayestune_pyro.inference.noise import STREAMS, GaussianNoise


def draw(n: int, seed: int = 0) -> torch.Tensor:
    return GaussianNoise(torch.Generator().manual_seed(seed)).normal_(torch.empty(n))


def test_the_same_seed_gives_the_same_noise_on_any_number_of_threads(monkeypatch):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pooled = draw(200_000)
        torch.set_num_threads(1)
        serial = draw(200_000)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(noise_module, "SERIAL_BELOW", 10**9)  # the calling thread draws every chunk
    assert torch.equal(pooled, serial) and torch.equal(pooled, draw(200_000))
    assert not torch.equal(pooled, draw(200_000, seed=1))


def test_the_noise_is_standard_normal_and_its_streams_are_independent():
    xi = draw(STREAMS * 50_000).view(STREAMS, -1)  # one row per stream
    n = xi.numel()
    assert abs(xi.mean().item()) < 5 / n**0.5
    assert abs(xi.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs((xi**4).mean().item() - 3) < 5 * (96 / n) ** 0.5  # Var(ξ⁴) = 105 − 9
    corr = torch.corrcoef(xi)
    off_diagonal = corr[~torch.eye(STREAMS, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 5 / xi.shape[1] ** 0.5


def test_a_restored_state_continues_the_stream_and_a_missing_one_is_refused():
    noise = GaussianNoise(torch.Generator().manual_seed(3))
    noise.normal_(torch.empty(1000))
    state = noise.state_dict()
    expected = noise.normal_(torch.empty(1000)).clone()
    again = GaussianNoise(torch.Generator().manual_seed(99))
    again.load_state_dict(state)
    assert torch.equal(again.normal_(torch.empty(1000)), expected)
    with pytest.raises(ValueError, match="single noise stream"):
        again.load_state_dict(None)
