"""What the exact λ̂ of untouched coordinates changes: one stage 1, two masks, two stage 2s.

    python benchmarks/untouched_ablation.py benchmarks/results/glue-minilm-posterior --task stsb --seed 1 \
        --n-hat 1e7 --data-root ../shared/data/glue --out runs/untouched/stsb-1

One grid point of a bench's ``bayestune`` cell (the bench's protocol, its ``--p``) runs stage 1 once. Its posterior
gives two masks: ``exact``, where coordinates the data never touched have their prior mean α/β as λ̂ (the default),
and ``sampled``, the chain's own Monte-Carlo estimate everywhere. Each mask is fine-tuned by the same stage 2 (same
seed, same batches). It prints, for each: how much of k sits on untouched coordinates, the masks' overlap, and the
validation and test scores. Stage 1 is skipped when ``OUT`` already holds its posterior.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from bayestune_pyro.bench.harness import Cell, cell_config
from bayestune_pyro.pipeline import load_posterior, stage1, stage2, write_config
from bayestune_pyro.selection.uncertainty import select

PROTOCOL_ONLY = ("per_task", "per_method", "methods")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", type=Path, help="a bench directory (its bench.yaml gives the protocol)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--n-hat", type=float, required=True, help="the grid point's N̂")
    parser.add_argument("--p", type=float, default=0.005)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    protocol = yaml.safe_load((args.bench / "bench.yaml").read_text())
    base = {k: v for k, v in protocol.items() if k not in PROTOCOL_ONLY}
    overrides = {**protocol.get("per_task", {}).get(args.task, {}), "n_hat": args.n_hat}
    config = cell_config(base, Cell(args.task, "bayestune", args.seed, args.p), args.data_root, overrides)
    exact_dir, sampled_dir = args.out / "exact", args.out / "sampled"
    if not (exact_dir / "posterior.json").exists():
        exact_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, exact_dir)
        stage1(config, exact_dir)
    posterior = load_posterior(exact_dir)
    masks = {"exact": select(posterior, config.p, None)}
    posterior.flat_prior = None  # the chain's own estimate everywhere
    masks["sampled"] = select(posterior, config.p, None)
    sampled_dir.mkdir(parents=True, exist_ok=True)
    for name in ("posterior.safetensors", "posterior.json"):
        shutil.copyfile(exact_dir / name, sampled_dir / name)
    rows = {}
    for name, directory in (("exact", exact_dir), ("sampled", sampled_dir)):
        mask = masks[name]
        mask.save(directory)
        metrics = stage2(config, directory)
        on_untouched = int((~posterior.touched[mask.index]).sum())
        rows[name] = {"k": mask.k, "k_on_untouched": on_untouched, "share_untouched": on_untouched / mask.k,
                      "validation": metrics.get("validation_score"), "test": metrics[f"test_{metrics['metric']}"]}
    a, b = (set(masks[n].index.tolist()) for n in ("exact", "sampled"))
    report = {"task": args.task, "seed": args.seed, "n_hat": args.n_hat, "p": config.p,
              "untouched": posterior.untouched, "d": posterior.d, "overlap": len(a & b) / max(len(a), 1), **rows}
    (args.out / "ablation.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
