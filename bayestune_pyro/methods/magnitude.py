"""magnitude: the top-k |θ̄| (magnitude pruning kept the other way round)."""
from ..selection import peers
from ..selection.masks import top_k
from . import Method, register


def select(s, options):
    if all(s.lifted.space.added(n) for n in s.lifted.layout.names):
        raise ValueError("method: magnitude ranks pretrained weights by |θ̄|, and the search space covers only added "
                         "modules (θ̄ = their initialisation); add --additive-backbone or choose another method")
    return top_k(peers.magnitude_scores(s.lifted), s.k, s.lifted.layout, "magnitude")


register(Method("magnitude", "top-k |θ̄|", select=select))
