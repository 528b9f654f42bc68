"""Why the stage-1 hot path avoids d-sized allocations: the cost of one pass over d floats, three ways.

    python benchmarks/memory_traffic.py [--d 22713216] [--repeats 20] [--threads 2]

d defaults to MiniLM-L6's covered size. Prints one JSON line per operation with its median milliseconds:
- fresh:    ``x + 1.0`` into a new tensor (allocation, page faults on first touch, one pass);
- in_place: ``x.add_(1.0)`` on an existing tensor (one pass, no allocation);
- normal:   ``buffer.normal_()`` into an existing tensor (one Gaussian draw per coordinate, as SGLD's noise).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=22_713_216)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, buffer = torch.zeros(args.d), torch.empty(args.d)
    for name, fn in (("fresh", lambda: x + 1.0), ("in_place", lambda: x.add_(1.0)), ("normal", buffer.normal_)):
        print(json.dumps({"op": name, "d": args.d, "mb": round(4 * args.d / 2**20, 1),
                          "median_ms": round(median_ms(fn, args.repeats), 2)}), flush=True)


if __name__ == "__main__":
    main()
