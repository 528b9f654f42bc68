"""Where each method of an additive-space bench spends its budget: shares of k per module factor, and stranded k.

    python benchmarks/module_anatomy.py benchmarks/results/glue-minilm-additive --p 0.1 [--seeds 0,1,2]

For every task and every method with a mask in ``BENCH/cells`` (at each seed given), it prints one row:
- the share of the k masked coordinates in each factor of the added modules (LoRA A and B, adapter down and up,
  prompt tokens and gate; the random factor of each pair first), and on the backbone if it is covered;
- ``stranded``: the share of k in random-factor coordinates whose zero partner has nothing chosen
  (``search_spaces.additive.stranded``). Those keep a zero gradient through stage 2: budget that cannot move.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from bayestune_pyro.registry import METHODS
from bayestune_pyro.search_spaces.additive import PREFIX, stranded
from bayestune_pyro.selection.masks import Mask

FACTORS = ["lora_A", "lora_B", "adapter_down", "adapter_up", "prompt_tokens", "prompt_gate", "backbone"]


def factor(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    return last[len(PREFIX):] if last.startswith(PREFIX) else "backbone"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="bench directory (holds cells/)")
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    args = parser.parse_args()
    print("| task | method | seed | k | " + " | ".join(FACTORS) + " | stranded |")
    print("|---" * (len(FACTORS) + 5) + "|")
    for task_dir in sorted(p for p in (args.bench / "cells").iterdir() if p.is_dir()):
        for method in METHODS.names():
            for seed in (int(s) for s in args.seeds.split(",")):
                cell = task_dir / method / f"p{args.p:g}-seed{seed}"
                if not (cell / "mask.json").exists():
                    continue
                mask = Mask.load(cell)
                shares = Counter()
                for name, count in mask.counts().items():
                    shares[factor(name)] += count
                lost = sum(int(cut.sum()) for cut in stranded(mask.layout.split(mask.dense())).values())
                print(f"| {task_dir.name} | {method} | {seed} | {mask.k:,} | "
                      + " | ".join(f"{shares[f] / mask.k:.3f}" for f in FACTORS) + f" | {lost / mask.k:.3f} |")


if __name__ == "__main__":
    main()
