"""Does it matter which chain's mask stage 2 trains? Masks cut from each chain of a multi-chain run, from the pooled
λ̂, and two controls, each fine-tuned with the run's own stage 2.

    python benchmarks/chain_masks.py runs/notebooks/runs/posterior_diagnostics --out /tmp/chain-masks

Masks (k = ⌊p·d⌋ each, p from the run's config):
- ``chain c``: the top k of chain c's own λ̂;
- ``pooled``: the top k of the pooled λ̂ (what the run trains);
- ``random in top m·k``: k coordinates drawn uniformly from the pooled top m·k (``--spread``, default 10): is any
  coordinate with a large λ̂ as good as the ones at the very top?
- ``random``: k coordinates drawn uniformly from all d (the floor).

It prints, per mask, its overlap with the pooled mask (Jaccard) and the test metric of its stage 2. Each mask's run
lives in ``OUT/<mask>/`` and is not repeated when its ``metrics.json`` exists.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from bayestune_pyro.config import RunConfig
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.io import read_json
from bayestune_pyro.pipeline import stage2
from bayestune_pyro.selection.masks import Mask, budget


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    both = torch.isin(a, b).sum().item()
    return both / (a.numel() + b.numel() - both)


def masks(posterior: StreamingPosterior, p: float, spread: int, seed: int) -> dict[str, torch.Tensor]:
    """The masks' sorted flat indices, by name."""
    layout, moment = posterior.layout, posterior.estimate
    k = budget(p, layout.d)
    g = torch.Generator().manual_seed(seed)
    pooled = posterior.pooled(moment)[0]
    out = {f"chain {c}": posterior.mean[moment][c].topk(k).indices for c in range(posterior.chains)}
    out["pooled"] = pooled.topk(k).indices
    wide = pooled.topk(spread * k).indices
    out[f"random in top {spread}k"] = wide[torch.randperm(wide.numel(), generator=g)[:k]]
    out["random"] = torch.randperm(layout.d, generator=g)[:k]
    return {name: index.sort().values for name, index in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished multi-chain run (posterior.safetensors, config.yaml)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--spread", type=int, default=10, help="the random-in-top control draws from the top m·k")
    args = parser.parse_args()
    config = RunConfig.from_yaml(args.run / "config.yaml")
    posterior = StreamingPosterior.load(args.run, backbone=config.backbone)
    if posterior.chains < 2:
        raise SystemExit(f"chain_masks: {args.run} has {posterior.chains} chain; run stage 1 with --chains 2")
    chosen = masks(posterior, config.budget_p(), args.spread, config.seed)
    rows = []
    for name, index in chosen.items():
        run_dir = args.out / name.replace(" ", "-")
        if not (run_dir / "metrics.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            Mask(index, posterior.layout, config.budget_p(), None, "bayestune", {"chosen_as": name},
                 config.backbone).save(run_dir)
            stage2(config, run_dir)
        metrics = read_json(run_dir / "metrics.json")
        rows.append((name, jaccard(index, chosen["pooled"]), metrics[f"test_{metrics['metric']}"]))
    print(f"| mask | Jaccard with pooled | test {read_json(args.out / 'pooled' / 'metrics.json')['metric']} |")
    print("|---|---:|---:|")
    for name, overlap, score in rows:
        print(f"| {name} | {overlap:.3f} | {score:.4f} |")


if __name__ == "__main__":
    main()
