"""sift: the top-k |∇| of the first ``sift_batches`` minibatches within ``sift_modules``; stage 2 as every masked
method's, whose backward hooks are SIFT's memory-efficient update."""
from dataclasses import dataclass

from ..config import Options, check_at_least_one, option
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


register(Method("sift", "top-k |∇| of the first batches within sift_modules", SiftOptions, select=select))
