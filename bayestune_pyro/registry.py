"""Registries of the plug-in parts: fine-tuning methods, stage-1 engines and search spaces.

A part registers itself when its module is imported; a registry imports every module of its package on first
use, so adding a method, an engine or a search space is adding one file to its package. This module imports
nothing else of the package, so the configuration can name parts without depending on what they run.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → part. ``kind`` names the option in error messages (``method``, ``inference``)."""

    def __init__(self, kind: str, package: str):
        self.kind, self.package = kind, package
        self._parts: dict[str, T] = {}
        self._loaded = False

    def add(self, name: str, part: T) -> T:
        if name in self._parts:
            raise ValueError(f"{self.kind}: {name!r} is registered twice")
        self._parts[name] = part
        return part

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            package = importlib.import_module(self.package)
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._parts)

    def values(self) -> list[T]:
        self._load()
        return list(self._parts.values())

    def get(self, name: str) -> T:
        self._load()
        if name not in self._parts:
            raise ValueError(f"{self.kind}: unknown value {name!r}; choose one of: {', '.join(self._parts)}")
        return self._parts[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._parts


METHODS: Registry = Registry("method", "bayestune_pyro.methods")
ENGINES: Registry = Registry("inference", "bayestune_pyro.engines")
SEARCH_SPACES: Registry = Registry("search_space", "bayestune_pyro.search_spaces")
