"""Search spaces, one module each: which backbone coordinates carry the Gamma–Laplace prior.

A :class:`SearchSpace` may first transform the network (``attach``: e.g. add zero-initialised modules), then
names the parameter tensors it covers (``covered``). The lifted backbone reads θ̄ from the covered tensors as
they are after ``attach``, so an added zero-initialised module has prior centre θ̄ = 0 and leaves the network's
function at θ̄ unchanged. The task head is never covered. A space may also change the defaults of other options
(``defaults``: e.g. larger step sizes for coordinates that start at 0); a value the user gives always wins.
Adding a search space is adding one module here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import Options
from ..registry import SEARCH_SPACES


class SearchSpace:
    """The interface: transform the network (optional), then name the covered tensors."""

    def attach(self, model: nn.Module) -> Callable[[], None]:
        """Add this space's modules to ``model`` (zero-initialised, so θ̄ = 0; a subset adds nothing), and return
        what removes them again."""
        return lambda: None

    def covered(self, names: list[str], head_names: list[str]) -> list[str]:
        """The covered parameter names, in ``names`` order, never one of ``head_names``."""
        raise NotImplementedError

    def added(self, name: str) -> bool:
        """Parameter ``name`` belongs to a module this space attached (a subset attaches none)."""
        return False


@dataclass(frozen=True)
class Space:
    name: str
    summary: str  # one line for the docs and ``--help``
    options: type[Options]
    build: Callable[[Options], SearchSpace]
    # its options -> {option: default} for common fields and other parts' options (applied where not given)
    defaults: Callable[[Options], dict] = lambda options: {}


def register(space: Space) -> Space:
    return SEARCH_SPACES.add(space.name, space)
