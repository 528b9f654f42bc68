"""Cost of one stage-1 SGLD step relative to one plain fine-tuning step, measured in the same process.

    python benchmarks/step_cost.py [--steps 12] [--batch-size 16] [--max-length 64] [--threads 2]

Both variants use the offline-default backbone (MiniLM-L6) on bbc-news minibatches of the same size:
- plain:  forward + backward + torch.optim.Adam over every parameter (what a user would write);
- sgld:   forward + backward through the Pyro trace's likelihood site + closed-form prior gradient +
          a preconditioned SGLD update of (θ, log λ) with Langevin noise + Adam on the head.
Memory is the peak resident-set growth while one variant is set up and stepped 3 times, alone in a forked child
process (so no variant reuses pages another freed); time is the median over
steps taken round-robin across variants (after 2 untimed rounds). Prints one JSON line per variant with both
and their ratios to plain.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time

import torch

from bayestune_pyro.bench.memory import PeakMemory
from bayestune_pyro.data import infinite_batches, load_task, make_loader
from bayestune_pyro.inference.potential import Potential
from bayestune_pyro.inference.sgld import SGLD, SGLDConfig
from bayestune_pyro.models.backbones import load_backbone
from bayestune_pyro.models.gamma_laplace import GammaLaplaceModel
from bayestune_pyro.models.lifted import LiftedBackbone


def plain(batches):
    """A plain fine-tuning step: forward, backward, torch.optim.Adam over every parameter."""
    backbone = load_backbone("minilm-l6", 5)
    model = backbone.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step():
        batch = next(batches)
        loss = torch.nn.functional.cross_entropy(model(**backbone.inputs(batch)[1]).logits, batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def sgld(batches, preconditioner: str = "rmsprop", gamma: float = 1.0, jacobian: bool = True):
    """A stage-1 step: likelihood gradient, prior gradient, update of (θ, log λ) (γ = 0: MAP), head Adam."""
    lifted = LiftedBackbone(load_backbone("minilm-l6", 5))
    lifted.model.train()
    potential = Potential(GammaLaplaceModel(lifted), jacobian=jacobian)
    z = potential.init(1e-4)
    kernel = SGLD(SGLDConfig(preconditioner=preconditioner, gamma=gamma), z, torch.Generator().manual_seed(0),
                  workspace=potential.work)  # as the engines do: the prior's work buffers are free between steps
    head_opt = torch.optim.Adam(lifted.head_parameters(), lr=1e-3)
    lrs = {"theta": 1e-4, "lambda": 1e-2}

    def step():
        _, grads = potential.gradient(z, next(batches))
        kernel.step(z, grads, lrs)
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)

    return step


def _peak_growth(build, send) -> None:
    """Peak resident-memory growth of setting a variant up and taking 3 steps (run in a child process)."""
    with PeakMemory() as mem:
        step = build()
        for _ in range(3):
            step()
    send.send(mem.growth)


def measure(builders: dict, steps: int) -> None:
    """Print one JSON line per variant: median step seconds, peak MB, and both as ratios to ``plain_adam``."""
    results = {name: {} for name in builders}
    fork = multiprocessing.get_context("fork")
    for name, build in builders.items():  # memory: each variant alone in a fresh child (no reused pages)
        receive, send = fork.Pipe(duplex=False)
        child = fork.Process(target=_peak_growth, args=(build, send))
        child.start()
        results[name]["peak_mb"] = receive.recv() / 2**20
        child.join()
    stepper = {name: build() for name, build in builders.items()}
    times = {name: [] for name in builders}
    for round_ in range(steps + 2):  # time: variants interleaved, so drift hits all alike
        for name, step in stepper.items():
            start = time.perf_counter()
            step()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    for name in builders:
        results[name]["seconds"] = statistics.median(times[name])
    base = results["plain_adam"]
    for name, r in results.items():
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["memory_ratio"] = r["peak_mb"] / base["peak_mb"]
        print(json.dumps({"variant": name, **{k: round(v, 3) for k, v in r.items()}}), flush=True)


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def loader_for(args: argparse.Namespace):
    """bbc-news batches in which every example fills max_length tokens (so every variant sees the same cost)."""
    task = load_task("bbc-news")
    tokenizer = load_backbone("tiny-bert", 5).tokenizer
    return make_loader(task.train, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                       shuffle=True, drop_last=True)


def main():
    args = arguments(__doc__)
    loader = loader_for(args)
    builders = {"plain_adam": lambda: plain(infinite_batches(loader))}
    for pre in ("rmsprop", "none", "adam"):
        builders[f"sgld_{pre}"] = lambda pre=pre: sgld(infinite_batches(loader), pre)
    measure(builders, args.steps)


if __name__ == "__main__":
    main()
