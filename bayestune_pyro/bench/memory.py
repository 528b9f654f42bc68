"""Peak memory of a block of work: CUDA's allocator peak on a GPU, resident-set growth on the CPU."""
from __future__ import annotations

import gc
import threading
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.growth``: peak bytes above the level at entry.

    On the CPU the resident set is sampled every ``interval`` seconds in a thread (so a spike shorter than
    that can be missed); on CUDA the allocator's own peak counter is used.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.001):
        self.device, self.interval = torch.device(device), interval

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()
        self.growth = self.peak - self.base
