"""Do two commits give the same answers? Every method and engine on tiny-bert, metrics as one JSON line.

    python benchmarks/same_answers.py OUT > new.json
    git worktree add /tmp/old REV && PYTHONPATH=/tmp/old python benchmarks/same_answers.py OUT_OLD > old.json
    diff old.json new.json        # and cmp OUT/*/posterior.safetensors OUT_OLD/*/posterior.safetensors

Twelve runs of a few seconds each: BayesTune (sgld, Gibbs, vi, map-svi), its MAP and paper variants, and sift,
full, stochastic, lora, l1sp and gradient. Each line holds the test metrics, n_updated and the validation score.
Refactors are checked with it: they must leave every value bitwise unchanged.
"""
from __future__ import annotations

import argparse
import inspect
import json

from bayestune_pyro.config import RunConfig
from bayestune_pyro.pipeline import run

BASE = dict(backbone="tiny-bert", shots_per_class=4, max_length=24, batch_size=8, steps=10, warmup=2, burnin=2,
            thin=2, stage2_steps=6, n_tracked=8, validation_fraction=0.2, eval_every=2)
CASES = {"bayestune": {}, "map": {"method": "bayestune-map"}, "paper": {"method": "bayestune-paper"},
         "vi": {"inference": "vi"}, "mapsvi": {"inference": "map-svi"}, "gibbs": {"gibbs": True},
         "sift": {"method": "sift"}, "full": {"method": "full"}, "stochastic": {"method": "stochastic"},
         "lora": {"method": "lora"}, "l1sp": {"method": "l1sp"}, "gradient": {"method": "gradient", "grad_batches": 2}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory for the runs (one subdirectory per case)")
    args = parser.parse_args()
    # versions before the composed configuration read every option flat and had no strict switch
    lenient = {"strict": False} if "strict" in inspect.signature(RunConfig.from_dict).parameters else {}
    results = {}
    for name, change in CASES.items():
        metrics = run(RunConfig.from_dict({**BASE, **change}, **lenient), f"{args.out}/{name}", progress=False)
        results[name] = [metrics["test"], metrics["n_updated"], metrics.get("validation_score")]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
