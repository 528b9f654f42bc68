"""sift: the top-k |∇| of the first ``sift_batches`` minibatches within ``sift_modules``; stage 2 gathers each
tensor's gradient into the k-sized δ in backward hooks (SIFT's memory-efficient update)."""
from dataclasses import dataclass

from ..config import Options, check_at_least_one, option
from ..finetune.stage2 import SparseFineTuner
from ..selection import peers
from ..selection.masks import top_k
from . import Method, register


@dataclass
class SiftOptions(Options):
    sift_batches: int = option(1, "sift: minibatches whose |∇| are summed into the score")
    sift_modules: list[str] = option(["*"], "sift: globs of the tensors it may choose from, e.g. '*attention*'",
                                     nargs="+")

    def check(self):
        check_at_least_one(self, "sift_batches")


def select(s, options: SiftOptions):
    layout = s.lifted.layout
    scores = peers.gradient_scores(s.lifted, s.train_batches(), s.nll, options.sift_batches)
    scores = peers.restrict(scores, layout, tuple(options.sift_modules), s.k, "sift_modules")
    return top_k(scores, s.k, layout, "sift", batches=options.sift_batches, modules=options.sift_modules)


def tuner(s, options, mask):
    return SparseFineTuner(s.lifted, mask.index, s.nll, s.stage2_config(), backward="hooks")


register(Method("sift", "top-k |∇| of the first batches within sift_modules; sparse backward hooks", SiftOptions,
                select=select, tuner=tuner))
