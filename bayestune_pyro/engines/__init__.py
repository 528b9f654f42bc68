"""Stage-1 engines, one module each; every module registers one or more :class:`Engine`.

An engine builds the :class:`~bayestune_pyro.inference.driver.Kernel` that the one driver
(``inference.driver.run_chain``) steps, and says what its states are: draws of a sampler at temperature γ²
(R-hat and ESS then describe mixing), a point estimate (temperature 0), a variational fit, or a heuristic
(neither: no temperature).
Adding an engine is adding one module here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Options
from ..registry import ENGINES

KINDS = ("sampler", "point", "variational", "heuristic")


@dataclass(frozen=True)
class Engine:
    name: str
    summary: str  # one line for the docs and ``--help``
    kernel: Callable  # (setup, method options, engine options, seed) -> Kernel
    options: type[Options] | None = None
    kind: str = "sampler"  # sampler (draws at temperature γ²), point (an optimum), variational, heuristic
    lambda_space: str = "log"  # the parameterisation of λ its states use (the Gibbs step needs "log")
    data_parallel: bool = True  # its gradient comes from the fast Potential, which averages it over torchrun's ranks

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: unknown value {self.kind!r}; choose one of: {', '.join(KINDS)}")

    @property
    def sampler(self) -> bool:
        return self.kind == "sampler"

    def temperature(self, options: Options | None) -> float:
        """γ² of a sampler, 0 for a point estimate, NaN (undefined) otherwise."""
        if self.kind == "sampler":
            return float(options.gamma) ** 2
        return 0.0 if self.kind == "point" else math.nan


def register(engine: Engine) -> Engine:
    return ENGINES.add(engine.name, engine)
