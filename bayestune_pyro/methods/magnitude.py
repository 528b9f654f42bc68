"""magnitude: the top-k |θ̄| (magnitude pruning kept the other way round)."""
from ..selection import peers
from ..selection.masks import top_k
from . import Method, register


def select(s, options):
    return top_k(peers.magnitude_scores(s.lifted), s.k, s.lifted.layout, "magnitude")


register(Method("magnitude", "top-k |θ̄|", select=select))
