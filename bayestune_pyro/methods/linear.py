"""linear: no backbone coordinate (k = 0); stage 2 trains the head only."""
from ..selection.masks import top_k
from . import Method, register


def select(s, options):
    return top_k(s.lifted.theta_bar, 0, s.lifted.layout, "linear")


register(Method("linear", "the head only (k = 0)", select=select))
