"""Fine-tuning methods, one module each; every module registers one or more :class:`Method`.

A method says how it selects coordinates (``select(setup, options) -> Mask``; none for methods that train
without a fixed mask) and which stage-2 tuner trains them (``tuner(setup, options, mask)``). The posterior
methods (``posterior=True``) select by sampling the BayesTune posterior in stage 1 with an engine
(``engines/``) and cutting the mask from λ̂. The budget is k = ⌊p·d⌋ covered backbone coordinates (the head is
always trained and never counted). Adding a method is adding one module here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import Options
from ..registry import METHODS


@dataclass
class NoOptions(Options):
    """A method without options of its own."""


def sparse_tuner(s, options, mask):
    """Stage 2 of every fixed-mask method: δ on the mask, trained with AdamW (``finetune.stage2``)."""
    from ..finetune.stage2 import SparseFineTuner

    return SparseFineTuner(s.lifted, mask.index, s.nll, s.stage2_config())


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for the docs and ``--help``
    options: type[Options] = NoOptions
    select: Callable | None = None  # (setup, options) -> Mask; None: no fixed mask (or a posterior method)
    tuner: Callable = sparse_tuner  # (setup, options, mask | None) -> finetune.stage2.Tuner
    posterior: bool = False  # stage 1 samples the BayesTune posterior; the mask is cut from λ̂
    engine: str | None = None  # a posterior method's fixed engine (None: chosen by --inference, default sgld)

    @property
    def masked(self) -> bool:
        """Stage 2 trains a fixed mask (written to mask.safetensors before stage 2)."""
        return self.posterior or self.select is not None

    def engine_for(self, inference: str | None) -> str | None:
        """The engine this method runs for a requested ``--inference`` (None: its default)."""
        if not self.posterior:
            if inference is not None:
                raise ValueError(f"inference: method {self.name!r} has no stage-1 engine; drop --inference "
                                 f"{inference}")
            return None
        if self.engine is not None:
            if inference not in (None, self.engine):
                raise ValueError(f"inference: method {self.name!r} runs engine {self.engine!r}; for {inference!r} "
                                 f"use --method bayestune --inference {inference}")
            return self.engine
        return inference or "sgld"


def register(method: Method) -> Method:
    return METHODS.add(method.name, method)
