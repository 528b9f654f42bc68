"""Data parallelism for stage 1 under ``torchrun``: W ranks run one chain, each on 1/W of every minibatch.

    torchrun --nproc-per-node 2 -m bayestune_pyro stage1 --out runs/x ...

Every rank holds the whole chain (θ, λ, preconditioner, posterior) and stays identical to the others:
- all ranks start from the same state and draw the same Langevin noise (the kernel's generator has the run's seed);
- rank r takes the r-th of W contiguous, near-equal slices of each global minibatch;
- the likelihood's gradient (θ and head) and the minibatch loss are averaged over ranks weighted by slice size,
  one all-reduce per buffer, before the prior's gradient (computed alike on every rank) is added. That weighted
  mean of slice means is the global minibatch's mean, so W ranks take the steps one rank takes on the whole batch,
  up to the order of the floating-point sums (tested).
Only rank 0 writes files and shows progress. Backend: gloo on CPU, nccl on CUDA (each rank on its LOCAL_RANK GPU).
Dropout draws differ with W (each rank masks its own slice), so bitwise equality across W needs a network without
dropout.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def size() -> int:
    """W: the number of ranks (1 outside ``torchrun``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if size() > 1 else 0


def is_writer() -> bool:
    """Whether this rank writes files (rank 0)."""
    return rank() == 0


def init_from_env(device: str) -> None:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1), once; nothing outside ``torchrun``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def shard(batches: Iterator[dict]) -> Iterator[dict]:
    """This rank's slice of every global minibatch (the whole batch on one rank)."""
    w, r = size(), rank()
    for batch in batches:
        n = len(batch["labels"])
        if n < w:
            raise ValueError(f"batch_size: a minibatch of {n} cannot feed {w} ranks; use a batch size of at least "
                             f"the number of ranks")
        rows = torch.arange(n).tensor_split(w)[r]
        yield batch if w == 1 else {k: v[rows[0]:rows[-1] + 1] for k, v in batch.items()}


def average_(tensors: list[torch.Tensor], weight: int) -> None:
    """Replace each tensor by its mean over ranks weighted by ``weight`` (this rank's slice size), in place."""
    if size() == 1:
        return
    total = torch.tensor(float(weight), dtype=tensors[0].dtype, device=tensors[0].device)
    dist.all_reduce(total)
    for t in tensors:
        t.mul_(weight / total)
        dist.all_reduce(t)


def barrier() -> None:
    if size() > 1:
        dist.barrier()
