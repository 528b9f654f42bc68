"""random: k uniformly random coordinates (seeded by the run's seed)."""
from ..selection import peers
from ..selection.masks import top_k
from . import Method, register


def select(s, options):
    lifted = s.lifted
    return top_k(peers.random_scores(lifted.d, s.config.seed, lifted.theta_bar.device), s.k, lifted.layout,
                 "random")


register(Method("random", "k uniformly random coordinates", select=select))
