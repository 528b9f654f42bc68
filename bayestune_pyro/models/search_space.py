"""The search space: which backbone coordinates carry the Gamma–Laplace prior (and so can enter the mask)."""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class SearchSpace:
    """Parameter tensors covered by θ, chosen by glob patterns on their names (``*`` matches dots too).

    By default every backbone parameter is covered; the task head never is (it is learned without a prior).
    Example: ``SearchSpace(include=("*attention*",), exclude=("*LayerNorm*",))``.
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
