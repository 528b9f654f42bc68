"""Search space ``subset``: existing parameter tensors chosen by glob patterns on their names."""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..config import Options, option
from . import SearchSpace, Space, register


@dataclass(frozen=True)
class Subset(SearchSpace):
    """Parameter tensors covered by θ, chosen by glob patterns on their names (``*`` matches dots too).

    By default every backbone parameter is covered; the task head never is (it is learned without a prior).
    Example: ``Subset(include=("*attention*",), exclude=("*LayerNorm*",))``.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def covered(self, names: list[str], head_names: list[str]) -> list[str]:
        head = set(head_names)
        chosen = [
            n for n in names
            if n not in head
            and any(fnmatchcase(n, p) for p in self.include)
            and not any(fnmatchcase(n, p) for p in self.exclude)
        ]
        if not chosen:
            raise ValueError(
                f"search_space: include={list(self.include)} exclude={list(self.exclude)} covers no backbone "
                "parameter; patterns are globs on names such as 'bert.encoder.layer.0.attention.self.query.weight'"
            )
        return chosen


@dataclass
class SubsetOptions(Options):
    include: list[str] = option(["*"], "search space: glob patterns of covered parameter names", nargs="+")
    exclude: list[str] = option([], "search space: glob patterns to leave out (the head is always out)", nargs="*")

    def check(self):
        if not self.include or not all(self.include):
            raise ValueError(f"include: needs at least one pattern, and no empty one, got {self.include!r}")


register(Space("subset", "existing parameter tensors chosen by include/exclude globs", SubsetOptions,
               lambda o: Subset(tuple(o.include), tuple(o.exclude))))
