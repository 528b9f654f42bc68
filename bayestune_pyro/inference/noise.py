"""Standard normal noise ξ ~ N(0, I) for the stochastic kernels, drawn in parallel streams on CPU.

On CPU torch's ``normal_`` runs one Mersenne-Twister stream on one thread: a draw over MiniLM's d = 22.7M
coordinates takes ~80 ms, 10% of a plain fine-tuning step, and a Langevin step needs two (θ and log λ). Here a
draw is cut into :data:`STREAMS` fixed chunks, each from its own generator seeded once from the caller's, and
the chunks run on a thread pool (``normal_`` releases the GIL): the same numbers on any number of threads, at
~1/threads of the time. On an accelerator one call of the device's generator is already parallel, so there is
one stream. The law of ξ is unchanged (independent streams of the same generator), only its sequence.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

STREAMS = 16  # fixed, so that a seed gives the same ξ on any machine; enough chunks to balance 2–16 threads
SERIAL_BELOW = 1 << 16  # smaller draws run the same chunks in the calling thread (a pool round trip costs more)


class GaussianNoise:
    """Draws ξ ~ N(0, I) into a caller-owned flat buffer; reproducible from the seeding generator."""

    _pool: ThreadPoolExecutor | None = None

    def __init__(self, generator: torch.Generator):
        device = generator.device
        if device.type == "cpu":
            seeds = torch.randint(0, 2**62, (STREAMS,), generator=generator).tolist()
            self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        else:
            self.generators = [generator]

    def normal_(self, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous tensor ``out`` with N(0, 1) draws and return it."""
        if len(self.generators) == 1:
            return out.normal_(generator=self.generators[0])
        jobs = list(zip(out.view(-1).tensor_split(len(self.generators)), self.generators))
        if out.numel() < SERIAL_BELOW or torch.get_num_threads() == 1:
            for chunk, g in jobs:
                chunk.normal_(generator=g)
        else:
            for future in [self.pool().submit(chunk.normal_, generator=g) for chunk, g in jobs]:
                future.result()
        return out

    @classmethod
    def pool(cls) -> ThreadPoolExecutor:
        if cls._pool is None:
            cls._pool = ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix="noise")
        return cls._pool

    def state_dict(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def load_state_dict(self, states: list[torch.Tensor] | None) -> None:
        if states is None:
            raise ValueError("checkpoint: written by a version with a single noise stream, which this one cannot "
                             "continue; delete it to start stage 1 over")
        if len(states) != len(self.generators):
            raise ValueError(f"noise: the checkpoint holds {len(states)} streams, this device draws "
                             f"{len(self.generators)}; resume on the device the run started on")
        for g, state in zip(self.generators, states):
            g.set_state(state)
