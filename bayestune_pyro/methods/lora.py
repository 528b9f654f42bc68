"""lora: y += (x·Aᵀ)·Bᵀ on the ``lora_targets`` linear layers (the additive space's LoRA module), the rank matched
to the budget k."""
from dataclasses import dataclass

from ..config import Options, option
from ..finetune.lora import DEFAULT_TARGETS, LoRATuner, lora_targets, rank_for_budget
from . import Method, register


@dataclass
class LoRAOptions(Options):
    lora_targets: list[str] = option(list(DEFAULT_TARGETS), "lora: globs of the linear layers to adapt", nargs="+")
    lora_rank: int | None = option(None, "lora: rank r (default: the rank whose parameter count is closest to "
                                   "⌊p·d⌋)")

    def check(self):
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank: must be >= 1 or unset, got {self.lora_rank!r}")


def tuner(s, options: LoRAOptions, mask):
    targets = lora_targets(s.lifted, tuple(options.lora_targets))
    rank = options.lora_rank or rank_for_budget(s.lifted, targets, s.k)
    return LoRATuner(s.lifted, s.nll, s.stage2_config(), rank, targets, seed=s.config.seed)


register(Method("lora", "LoRA, the rank matched to k on lora_targets", LoRAOptions, tuner=tuner))
