"""bitfit: the bias terms; every one when the budget allows (BitFit's natural p), else the top-k by Σ|∇|."""
from ..selection import peers
from . import Method, register
from .gradient import GradientOptions


def select(s, options: GradientOptions):
    return peers.bitfit_mask(s.lifted.layout, s.k, lambda: peers.gradient_scores(
        s.lifted, s.train_batches(), s.nll, options.grad_batches))


register(Method("bitfit", "bias terms (top-k by Σ|∇| if there are more than k)", GradientOptions, select=select))
