"""One stage-1 chain of the logistic toy on W gloo ranks (``inference.distributed``), for the test that W ranks take
the steps one rank takes on the whole minibatch. The toy has no dropout, so the ranks' only difference from one
process is the order of the floating-point sums."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..config import Schedule
from ..engines.sgld import SGLDOptions, sgld_kernel
from ..inference import distributed
from ..inference.driver import run_chain
from ..inference.posterior import StreamingPosterior
from ..methods.bayestune import BayesTuneOptions
from ..models.backbones import Backbone
from ..models.gamma_laplace import GammaLaplaceModel
from ..models.lifted import LiftedBackbone
from .toy import Logistic, logistic_data

N, D, BATCH = 200, 12, 40


def batches(seed: int = 0):
    """The same global minibatches on every rank: BATCH of the N points, drawn anew each step."""
    data, g = logistic_data(n=N, d=D), torch.Generator().manual_seed(seed)
    while True:
        rows = torch.randperm(N, generator=g)[:BATCH]
        yield {k: v[rows] for k, v in data.items()}


def chain(rank: int, world: int, init_file: str, out: str, steps: int = 60) -> None:
    """Run the chain as rank ``rank`` of ``world`` (one process when ``world`` is 1); rank 0 saves θ, log λ, the head
    and λ̂ to ``out``."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    lifted = LiftedBackbone(Backbone(Logistic(1, D), head_names=["b"], kind="tensor", source="toy"))
    model = GammaLaplaceModel(lifted, alpha=2.0, beta=20.0, n_hat=float(N))
    setup = SimpleNamespace(lifted=lifted, model=model, config=SimpleNamespace(head_lr=1e-2))
    options = BayesTuneOptions(n_hat=float(N), lr=1e-3, lr_lambda=1e-2, lambda_init=0.1)
    kernel = sgld_kernel(setup, options, SGLDOptions(), seed=0)
    posterior = StreamingPosterior(lifted.layout, chains=1, n_tracked=4, estimator="rao-blackwell", seed=0)
    run_chain(kernel, distributed.shard(batches()), Schedule(steps, steps // 4, steps // 4, 2), posterior,
              engine="sgld", progress=False)
    if distributed.is_writer():
        save_file({"theta": kernel.z["theta"].contiguous(), "log_lambda": kernel.z["lambda"].contiguous(),
                   "head": lifted.head_parameters()[0].detach().contiguous(),
                   "lambda_hat": posterior.lambda_mean.contiguous()}, out)
    if world > 1:
        dist.destroy_process_group()
