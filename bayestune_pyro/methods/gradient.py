"""gradient (Fu et al.'s SAM): the top-k Σ|∇θ L| at θ̄ over ``grad_batches`` minibatches."""
from dataclasses import dataclass

from ..config import Options, check_at_least_one, option
from ..selection import peers
from ..selection.masks import top_k
from . import Method, register


@dataclass
class GradientOptions(Options):
    grad_batches: int = option(8, "gradient, bitfit: minibatches whose |∇| are summed into the score")

    def check(self):
        check_at_least_one(self, "grad_batches")


def select(s, options: GradientOptions):
    scores = peers.gradient_scores(s.lifted, s.train_batches(), s.nll, options.grad_batches)
    return top_k(scores, s.k, s.lifted.layout, "gradient", batches=options.grad_batches)


register(Method("gradient", "top-k Σ|∇| over grad_batches minibatches (SAM)", GradientOptions, select=select))
