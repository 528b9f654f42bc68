"""Where each method of a bench spends its budget: module shares, overlaps, and coordinates no data can move.

    python benchmarks/mask_anatomy.py benchmarks/results/glue-minilm --seed 0

For every task and every method with a fixed mask in ``BENCH/cells``, it prints:
- the share of the k masked coordinates per module type (embeddings, query, …, other = pooler);
- the overlap |A ∩ B| / k with the reference method's mask (``--reference``, default bayestune-map); two random
  masks overlap by p on average;
- ``no-data``: the share of k in rows of the input-embedding matrix whose token never occurs in the training split.
  No example's loss depends on those coordinates, so their gradient is exactly 0 in both stages: a mask that picks
  them spends budget on coordinates that cannot move.
"""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from bayestune_pyro.config import RunConfig
from bayestune_pyro.diagnostics.modules import MODULE_TYPES, OTHER, module_type
from bayestune_pyro.registry import METHODS
from bayestune_pyro.run_setup import setup
from bayestune_pyro.selection.masks import Mask

TYPES = [kind for kind, _ in MODULE_TYPES] + [OTHER]


def unseen_rows(s) -> tuple[str, torch.Tensor]:
    """Name of the input-embedding matrix and a bool per row: True if its token is absent from the training split."""
    model, tokenizer, config = s.lifted.model, s.lifted.backbone.tokenizer, s.config
    weight = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is weight)
    unseen = torch.ones(weight.shape[0], dtype=torch.bool)
    for e in s.task.train:
        unseen[tokenizer(e.text_a, e.text_b, truncation=True, max_length=config.max_length)["input_ids"]] = False
    return name, unseen


def no_data_count(mask: Mask, name: str, unseen: torch.Tensor) -> int:
    layout = mask.layout
    i = layout.names.index(name)
    offset, width = layout.offsets[i], layout.shapes[i][1]
    local = mask.index[(mask.index >= offset) & (mask.index < offset + layout.numels[i])] - offset
    return int(unseen[local // width].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="bench directory (holds cells/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--p", type=float, default=0.005)
    parser.add_argument("--reference", default="bayestune-map", help="method whose mask the overlaps refer to")
    args = parser.parse_args()
    cell = f"p{args.p:g}-seed{args.seed}"
    header = "| task | method | " + " | ".join(TYPES) + f" | ∩ {args.reference} | no-data |"
    print(header + "\n" + "|---" * (len(TYPES) + 4) + "|")
    for task_dir in sorted(p for p in (args.bench / "cells").iterdir() if p.is_dir()):
        masks = {m: Mask.load(task_dir / m / cell) for m in METHODS.names()
                 if (task_dir / m / cell / "mask.json").exists() and m != "linear"}
        if not masks:
            continue
        config = RunConfig.from_yaml(task_dir / next(iter(masks)) / cell / "config.yaml", strict=False)
        config = config.replace(**config.grid()[0])  # the data and tokenizer are the same at every grid point
        name, unseen = unseen_rows(setup(config))
        reference = masks[args.reference].index if args.reference in masks else None
        for method, mask in masks.items():
            shares = Counter()
            for tensor, count in mask.counts().items():
                shares[module_type(tensor)] += count
            overlap = "–" if reference is None else f"{int(torch.isin(mask.index, reference).sum()) / mask.k:.3f}"
            print(f"| {task_dir.name} | {method} | " + " | ".join(f"{shares[t] / mask.k:.3f}" for t in TYPES)
                  + f" | {overlap} | {no_data_count(mask, name, unseen) / mask.k:.3f} |")


if __name__ == "__main__":
    main()
