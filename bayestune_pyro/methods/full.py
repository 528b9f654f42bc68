"""full: dense AdamW fine-tuning of every covered coordinate at ``dense_lr``."""
import dataclasses
from dataclasses import dataclass

from ..config import Options, check_positive, option
from ..finetune.dense import DenseFineTuner
from . import Method, register


@dataclass
class FullOptions(Options):
    dense_lr: float = option(5e-5, "full: learning rate of dense AdamW fine-tuning")

    def check(self):
        check_positive(self, "dense_lr")


def tuner(s, options: FullOptions, mask):
    return DenseFineTuner(s.lifted, s.nll, dataclasses.replace(s.stage2_config(), lr=options.dense_lr))


register(Method("full", "every coordinate (AdamW at dense_lr)", FullOptions, tuner=tuner))
