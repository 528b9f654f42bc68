"""l1sp: L1-to-θ̄ dense fine-tuning for ``--steps`` steps, then the top-k relative change |θ − θ̄| / (|θ̄| + ε)."""
import math
from dataclasses import dataclass

from ..config import Options, check_positive, option
from ..finetune.dense import DenseFineTuner
from ..finetune.stage2 import Stage2Config, fit
from ..selection import peers
from ..selection.masks import top_k
from . import Method, register


@dataclass
class L1SPOptions(Options):
    l1: float = option(1e-4, "l1sp: strength of the L1 penalty towards θ̄ in its full fine-tuning stage (--steps)")
    dense_lr: float = option(5e-5, "l1sp: learning rate of its dense AdamW fine-tuning stage")

    def check(self):
        check_positive(self, "dense_lr")
        if not 0 <= self.l1 < math.inf:
            raise ValueError(f"l1: must be a number >= 0, got {self.l1!r}")


def select(s, options: L1SPOptions):
    config, lifted = s.config, s.lifted
    dense = DenseFineTuner(lifted, s.nll, Stage2Config(config.steps, options.dense_lr, config.head_lr,
                                                       log_every=max(1, config.steps // 10)), l1=options.l1)
    try:
        fit(dense, s.train_batches(), dense.config, progress=False)
        scores = peers.relative_change_scores(dense.theta, lifted.theta_bar)
    finally:
        dense.release()
    return top_k(scores, s.k, lifted.layout, "l1sp", l1=options.l1, steps=config.steps)


register(Method("l1sp", "L1-to-θ̄ full fine-tuning, then top-k relative change", L1SPOptions, select=select))
