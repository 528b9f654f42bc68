"""Shared fixtures: tiny random-initialised backbones, so the suite stays fast."""
import pytest
import torch

from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.models.gamma_laplace import GammaLaplaceModel
from bayestune_pyro.models.lifted import LiftedBackbone


@pytest.fixture
def tiny_lifted():
    return LiftedBackbone(load_backbone("tiny-bert", 3, seed=0))


@pytest.fixture
def text_batch(tiny_lifted):
    tok = tiny_lifted.backbone.tokenizer(["the cat sat", "a dog barked at the moon", "hello"], padding=True,
                                         return_tensors="pt")
    return {**tok, "labels": torch.tensor([0, 2, 1])}


@pytest.fixture
def tiny_model(tiny_lifted):
    tiny_lifted.model.eval()  # no dropout: deterministic densities
    return GammaLaplaceModel(tiny_lifted, alpha=0.5, beta=3.0, n_hat=500.0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention (up to 20× slower steps on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
