"""The run configuration, composed of parts that each validate themselves on construction.

- the common parts, fields of :class:`RunConfig`: data, backbone, budget, stage-1 schedule, stage 2;
- the method (``method``) and its own options, an :class:`Options` subclass declared in its module in
  ``methods/``;
- for methods with a stage 1 (the posterior methods), the engine (``inference``) and its own options, declared in
  its module in ``engines/``;
- the search space (``search_space``, default ``subset``) and its options, declared in ``search_spaces/``. A
  space may change the defaults of other options (``Space.defaults``: the additive space's step sizes); a value
  given in a file or a flag always wins.

YAML nests the same way (``method: {name: sift, sift_batches: 1}``, ``engine: {name: sgld, gamma: 1.0}``,
``search_space: {name: subset, include: ["*"]}``). Flat keys and flags (``--sift-batches 1``, ``gamma: 1.0``) go
to the part that owns them; a key that belongs to another part is refused with a one-line error naming its owner
(files this package wrote itself are read leniently: such keys are dropped). Values are converted to the field's
declared type by pydantic, and every error is one line naming the field, the value and what is allowed.

This module imports only the task table and the registries; it never imports what the parts run.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pydantic
import yaml

from .data.tasks import HUB_ID_TASKS, TASKS
from .registry import ENGINES, METHODS, SEARCH_SPACES

ENSEMBLES = ("sgld", "deep")  # the kinds of finetune/ensemble.py


def option(default, help: str, **meta):
    """A configuration field with its help text (``--help``) and argparse hints (``nargs``, ``choices``)."""
    meta = {"help": help, **meta}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(name: str, hint, value):
    """``value`` (YAML or command line) as the declared type ``hint``, or a one-line error naming the field."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null") and type(None) in typing.get_args(hint):
        value = None  # "none" is null only where null is allowed (--preconditioner none is a value)
    if isinstance(value, str) and "," in value and typing.get_origin(hint) in (typing.Union, type(int | str)):
        value = [v.strip() for v in value.split(",")]  # a comma list for a field that takes one (a grid)
    if isinstance(value, str) and typing.get_origin(hint) is list:
        value = [value]
    try:
        result = pydantic.TypeAdapter(hint).validate_python(value)
    except pydantic.ValidationError:
        what = str(hint).replace("typing.", "").replace("NoneType", "None")
        if "list[float]" in what and "float" in what:
            what = "a number or a comma-separated list of numbers"
        raise ValueError(f"{name}: expected {what}, got {value!r}") from None
    return result[0] if isinstance(result, list) and len(result) == 1 and typing.get_origin(hint) is not list \
        else result


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def values_of(value) -> list:
    """A grid field's values: the list, or the single value."""
    return list(value) if isinstance(value, list) else [value]


def check_positive(owner, *names: str) -> None:
    """Every value of each named field (a list is a grid) is a finite number > 0."""
    for name in names:
        for value in values_of(getattr(owner, name)):
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: must be a positive number, got {value!r}")


def check_noise_discount(owner) -> None:
    """γ (or each γ of a grid) is a finite number >= 0; 0 is optimisation (MAP)."""
    for value in values_of(owner.gamma):
        if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
            raise ValueError(f"gamma: must be >= 0 (0 is MAP), got {value!r}")


BACKBONES = ("minilm-l6", "tiny-bert", "tiny-vit")  # by name; else hf:<hub id or dir>, timm:<name> or a directory
DEVICES = ("cpu", "cuda", "mps", "xpu")


def check_backbone(spec: str) -> None:
    """``spec`` names a backbone :func:`models.backbones.load_backbone` knows how to load (it may still fail to)."""
    prefix, _, rest = spec.partition(":")
    if not (spec in BACKBONES or (prefix in ("hf", "timm") and rest.strip()) or os.path.isdir(spec)):
        raise ValueError(f"backbone: unknown value {spec!r}; use {', '.join(BACKBONES)}, hf:<hub id or dir>, "
                         "timm:<name> or an existing checkpoint directory")


def check_device(device: str) -> None:
    """``device`` is a torch device of a type runs go on (``cpu``, ``cuda:1``, ...); whether this machine has it is
    checked when a stage starts (``run_setup.check_available``)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device: {device!r} is not a torch device ({str(err).splitlines()[0][:80]})") from None
    if kind not in DEVICES:
        raise ValueError(f"device: {device!r} is not a device runs go on; use {', '.join(DEVICES)} (e.g. cuda:1)")


def check_at_least_one(owner, *names: str) -> None:
    for name in names:
        if getattr(owner, name) < 1:
            raise ValueError(f"{name}: must be >= 1, got {getattr(owner, name)!r}")


@dataclass
class Options:
    """Base of a method's or an engine's own options: typed fields made with :func:`option`.

    Subclasses check their values in :meth:`check` (called on construction) and list in ``GRID`` the fields
    that may hold a list of values, a grid chosen on validation (``pipeline.run_grid``).
    """

    GRID: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise a one-line ``ValueError`` for a bad value."""

    @classmethod
    def from_values(cls, values: dict, owner: str) -> Options:
        known, hints = fields_of(cls), _hints(cls)
        for name in values:
            if name not in known:
                raise ValueError(f"{name}: not an option of {owner}; its options: {', '.join(known) or 'none'}")
        return cls(**{k: coerce(k, hints[k], v) for k, v in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Schedule:
    """Step counts of the three stage-1 phases; sampling is what warm-up and burn-in leave of ``steps``."""

    steps: int
    warmup: int
    burnin: int
    thin: int

    def __post_init__(self):
        for name in ("steps", "thin"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "burnin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.sampling < self.thin:
            raise ValueError(
                f"burnin: warmup={self.warmup} + burnin={self.burnin} leaves {max(self.sampling, 0)} sampling steps "
                f"of steps={self.steps}, fewer than thin={self.thin}; need warmup + burnin + thin <= steps"
            )

    @property
    def sampling(self) -> int:
        return self.steps - self.warmup - self.burnin

    def phase(self, step: int) -> str:
        if step < self.warmup:
            return "warmup"
        return "burnin" if step < self.warmup + self.burnin else "sampling"

    def collects(self, step: int) -> bool:
        s = step - self.warmup - self.burnin + 1
        return s > 0 and s % self.thin == 0


@dataclass
class RunConfig:
    # data
    task: str = option("bbc-news", f"task name: {', '.join(TASKS)} (bbc-news is the offline default; GLUE/SuperGLUE "
                       "need --data-dir offline)")
    data_dir: str | None = option(None, "directory with the task's distribution files (GLUE: train.tsv, dev.tsv); "
                                  "image-folder: DIR with train/<class>/*.png and test/<class>/*.png (or val/); "
                                  "hf-images: a datasets directory (save_to_disk) or a hub dataset id")
    seed: int = option(0, "seed of a chain: head initialisation, data order, dropout and Langevin noise")
    data_seed: int = option(0, "seed of the data: few-shot selection, --train-size subset (same for every chain)")
    max_length: int = option(64, "tokens per example after truncation")
    batch_size: int = option(16, "minibatch size |B| in both stages")
    eval_batch_size: int = option(64, "batch size for evaluation")
    image_size: int | None = option(None, "image tasks: the side in pixels images are resized to (default: the "
                                    "backbone's input size, e.g. 224 for EfficientNet-Lite0; a ViT takes only its own)")
    train_size: int | None = option(None, "cap the training set at this many examples (seeded subset)")
    shots_per_class: int = option(32, "bbc-news: training examples per class")
    validation_fraction: float = option(0.0, "fraction of the training set held out for model selection: stage 2 "
                                        "restores the state with the best validation metric")
    sigma: float = option(1.0, "regression tasks: noise scale σ of the Normal likelihood")
    # backbone
    backbone: str = option("minilm-l6", "minilm-l6 (packaged), tiny-bert, tiny-vit, hf:<hub id or dir>, timm:<name>")
    pretrained: bool = option(True, "load pretrained weights (timm / hf); false = random initialisation")
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1, ...")
    # search space (its options live in its module)
    search_space: str = option("subset", "which coordinates carry the prior (one module each in "
                               "bayestune_pyro/search_spaces/); a space may bring its own defaults of other options, "
                               "e.g. additive's step sizes (`bayestune list` shows them)")
    # budget
    p: float | None = option(0.005, "fraction of covered coordinates to fine-tune in stage 2 (top-p by the "
                             "method's score)")
    threshold: float | None = option(None, "posterior methods, instead of p (takes precedence): fine-tune every "
                                     "coordinate with λ̂ > threshold")
    # the method and, for the posterior methods, the stage-1 engine (their options live in their own modules)
    method: str = option("bayestune", "how coordinates are chosen and trained (one module each in "
                         "bayestune_pyro/methods/)")
    inference: str | None = option(None, "posterior methods: the stage-1 engine (one module each in "
                                   "bayestune_pyro/engines/; default: the method's)")
    # stage-1 schedule (also l1sp's dense stage: --steps)
    steps: int = option(300, "stage-1 steps in all (warm-up + burn-in + sampling)")
    warmup: int = option(100, "warm-up steps: plain optimisation of θ and head, no prior, no noise")
    burnin: int = option(100, "burn-in steps: SGLD, nothing collected")
    thin: int = option(10, "collect every thin-th SGLD state in the sampling phase")
    head_lr: float = option(1e-3, "learning rate of the head (Adam, both stages unless --stage2-head-lr)")
    # stage 2
    stage2_steps: int = option(300, "stage-2 steps")
    stage2_lr: float = option(1e-3, "stage-2 learning rate of the masked coordinates (AdamW)")
    stage2_head_lr: float | None = option(None, "stage-2 learning rate of the head (default: --head-lr)")
    weight_decay: float = option(0.0, "stage-2 decoupled weight decay (masked coordinates and head only)")
    eval_every: int = option(50, "with --validation-fraction: validate every this many stage-2 steps (and at the "
                             "end)")
    # posterior ensemble of sparse deltas over the stage-2 mask (finetune/ensemble.py)
    ensemble: list[str] = option([], "after stage 2, ensembles of S deltas over its mask: sgld (the Bayesian stage "
                                 "2: SGLD draws of δ and the head) and/or deep (S − 1 refits); metrics.json reports "
                                 "each one's mean predictive next to the point estimate", nargs="+",
                                 choices=ENSEMBLES)
    ensemble_size: int = option(8, "ensemble members S (S·k numbers in ensemble.safetensors)")
    ensemble_burnin: int = option(100, "sgld ensemble: steps before the first member (the preconditioner adapts)")
    ensemble_thin: int = option(25, "sgld ensemble: steps between members")
    ensemble_lr: float = option(1e-4, "sgld ensemble: step size (η = 2·lr/N̂)")
    ensemble_gamma: float | list[float] = option(1.0, "sgld ensemble: noise discount γ (temperature γ²); a list "
                                                 "(0.1,0.3,1) is a grid: each γ samples an ensemble and the lowest "
                                                 "validation NLL (regression: best validation score) is kept")
    ensemble_n_hat: float | None = option(None, "sgld ensemble: effective data size N̂ (default: the training set "
                                          "size |D|)")
    ensemble_prior_scale: float | list[float] = option(1.0, "sgld ensemble: multiplies both prior scales σ_δ and "
                                                       "σ_h; a list (1,3,10) is a grid, like --ensemble-gamma (the "
                                                       "grid is every γ with every scale)")
    ensemble_prior_sd: float | None = option(None, "sgld ensemble: prior scale σ of δ ~ N(0, σ²) (default: the RMS "
                                             "of the point estimate's δ)")
    ensemble_head_prior_sd: float | None = option(None, "sgld ensemble: prior scale of the head (default: the RMS of "
                                                  "the point estimate's head)")
    # the parts' own options (None: their defaults)
    method_options: Options | None = field(default=None, repr=False)
    engine_options: Options | None = field(default=None, repr=False)
    search_space_options: Options | None = field(default=None, repr=False)

    COMMON: ClassVar[tuple[str, ...]] = ()  # set below: the common fields' names

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task: unknown value {self.task!r}; choose one of: {', '.join(TASKS)}")
        check_backbone(self.backbone)
        check_device(self.device)
        if self.data_dir is not None and self.task not in HUB_ID_TASKS and not Path(self.data_dir).is_dir():
            raise ValueError(f"data_dir: {self.data_dir!r} is not a directory")
        check_at_least_one(self, "max_length", "batch_size", "eval_batch_size", "shots_per_class", "stage2_steps",
                           "eval_every")
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"train_size: must be >= 1 or unset, got {self.train_size!r}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size: must be >= 1 or unset, got {self.image_size!r}")
        check_positive(self, "head_lr", "stage2_lr", "sigma")
        if self.stage2_head_lr is not None:
            check_positive(self, "stage2_head_lr")
        if not 0 <= self.validation_fraction <= 0.5:
            raise ValueError(f"validation_fraction: must be in [0, 0.5], got {self.validation_fraction!r}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay: must be a number >= 0, got {self.weight_decay!r}")
        self._check_ensemble()
        if self.p is None and self.threshold is None:
            raise ValueError("p: unset, and no threshold either; give one of them")
        if self.p is not None and not 0 < self.p <= 1:
            raise ValueError(f"p: must be a fraction in (0, 1], got {self.p!r}")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"threshold: must be > 0, got {self.threshold!r}")
        self.schedule()
        method = METHODS.get(self.method)
        if self.threshold is not None and not method.posterior:
            raise ValueError(f"threshold: only posterior methods select by a λ̂ threshold; give --p for method "
                             f"{self.method!r}")
        self.method_options = _options(method.options, self.method_options, f"method {self.method}")
        self.inference = method.engine_for(self.inference)
        engine = ENGINES.get(self.inference) if self.inference is not None else None
        options = engine.options if engine is not None else None
        if options is None and self.engine_options:
            raise ValueError(f"inference: method {self.method!r} has no stage-1 engine, so no engine options")
        self.engine_options = _options(options, self.engine_options, f"engine {self.inference}") if options else None
        self.search_space_options = _options(SEARCH_SPACES.get(self.search_space).options,
                                             self.search_space_options, f"search space {self.search_space}")
        grid = self.gridded()
        if grid and not self.validation_fraction > 0:
            raise ValueError(f"{grid[0]}: a grid is chosen on the validation split; set --validation-fraction > 0")

    def _check_ensemble(self) -> None:
        if not self.ensemble:
            return
        for kind in self.ensemble:
            if kind not in ENSEMBLES:
                raise ValueError(f"ensemble: unknown value {kind!r}; choose one or more of: {', '.join(ENSEMBLES)}")
        if len(set(self.ensemble)) < len(self.ensemble):
            raise ValueError(f"ensemble: {self.ensemble!r} names a kind twice")
        if not METHODS.get(self.method).masked:
            raise ValueError(f"ensemble: method {self.method!r} trains without a fixed mask; an ensemble of sparse "
                             "deltas needs a masked method")
        if self.ensemble_size < 2:
            raise ValueError(f"ensemble_size: must be an integer >= 2, got {self.ensemble_size!r}")
        check_at_least_one(self, "ensemble_thin")
        if self.ensemble_burnin < 0:
            raise ValueError(f"ensemble_burnin: must be an integer >= 0, got {self.ensemble_burnin!r}")
        check_positive(self, "ensemble_lr", "ensemble_gamma", "ensemble_prior_scale")
        for name in ("ensemble_gamma", "ensemble_prior_scale"):
            if isinstance(getattr(self, name), list) and "sgld" in self.ensemble and not self.validation_fraction > 0:
                raise ValueError(f"{name}: a grid is chosen on the validation split; set --validation-fraction > 0")
        for name in ("ensemble_n_hat", "ensemble_prior_sd", "ensemble_head_prior_sd"):
            if getattr(self, name) is not None:
                check_positive(self, name)

    # --- the parts

    @property
    def options(self) -> Options:
        """The method's own options."""
        return self.method_options

    def schedule(self) -> Schedule:
        return Schedule(self.steps, self.warmup, self.burnin, self.thin)

    def budget_p(self) -> float | None:
        """The top-p budget, or None when a threshold replaces it."""
        return None if self.threshold is not None else self.p

    def _parts(self) -> list[Options]:
        return [o for o in (self.method_options, self.engine_options, self.search_space_options) if o is not None]

    def __getattr__(self, name: str):
        """A part's option by its flat name (``config.gamma``), read-only."""
        if name.startswith("_") or name in PART_OPTIONS:
            raise AttributeError(name)
        for part in self._parts():
            if name in fields_of(type(part)):
                return getattr(part, name)
        raise AttributeError(f"{type(self).__name__!r} has no field or option {name!r}")

    # --- grids

    def grid(self) -> list[dict]:
        """The grid points: one {field: value} per combination of the list-valued grid fields."""
        points = [{}]
        for part in reversed(self._parts()):  # the engine's fields first: γ, then N̂ and lr_λ
            for name in type(part).GRID:
                points = [{**point, name: value} for point in points for value in values_of(getattr(part, name))]
        return points

    def gridded(self) -> list[str]:
        """The grid fields that hold a list."""
        return [n for part in self._parts() for n in type(part).GRID if isinstance(getattr(part, n), list)]

    def single(self, stage: str) -> None:
        """Refuse a grid where one stage 1 is meant."""
        if self.gridded():
            raise ValueError(f"{self.gridded()[0]}: {stage} runs one grid point; a list is run by `bayestune run`")

    # --- conversion

    def replace(self, **values) -> RunConfig:
        """A copy with fields or part options (flat names) changed, validated."""
        return RunConfig.from_dict(merge(self.to_dict(), values))

    def to_dict(self) -> dict:
        """Common fields flat, then ``method``, ``engine`` (if any) and ``search_space`` as ``{name, options}``."""
        names = {block: getattr(self, flat) for block, flat, _, _ in PARTS}
        out = {name: _plain(getattr(self, name)) for name in self.COMMON if name not in names and
               name != "inference"}
        for block, _, _, attribute in PARTS:
            if names[block] is not None:
                options = getattr(self, attribute)
                out[block] = {"name": names[block], **(options.to_dict() if options is not None else {})}
        return out

    def flat(self) -> dict:
        """Every field and option under its flat name (the method and engine by name): for tables and netCDF."""
        out = {name: _plain(getattr(self, name)) for name in self.COMMON}
        for part in self._parts():
            out.update(part.to_dict())
        return out

    @classmethod
    def from_dict(cls, values: dict, source: str = "config", strict: bool = True) -> RunConfig:
        """From nested or flat keys (see the module docstring); ``strict=False`` drops other parts' keys."""
        values = {k.replace("-", "_"): v for k, v in values.items()}
        names, blocks = {}, {}
        for block, flat, _, _ in PARTS:
            raw = values.pop(block, None)
            name = values.pop(flat, None) if flat != block else None
            if isinstance(raw, dict):
                raw = dict(raw)
                name = name or raw.pop("name", None)
                raw.pop("name", None)
            else:
                name, raw = name or raw, {}
            names[block], blocks[block] = name, raw
        method = coerce("method", str, names["method"] or "bayestune")
        spec = METHODS.get(method)
        try:
            inference = spec.engine_for(names["engine"])
        except ValueError:
            if strict:
                raise
            inference = spec.engine_for(None)
        space = coerce("search_space", str, names["search_space"] or "subset")
        chosen = {"method": (f"method {method}", spec.options),
                  "engine": (f"engine {inference}", ENGINES.get(inference).options if inference else None),
                  "search_space": (f"search space {space}", SEARCH_SPACES.get(space).options)}
        own = {block: fields_of(options) if options is not None else {} for block, (_, options) in chosen.items()}
        hints = _hints(cls)
        common, part_values = {}, {block: dict(blocks[block]) for block in chosen}
        for key, value in values.items():
            owner = next((block for block in chosen if key in own[block]), None)
            if key in cls.COMMON:
                common[key] = coerce(key, hints[key], value)
            elif owner is not None:
                part_values[owner][key] = value
            elif not strict and _owner(key) is not None:
                continue  # written by this package for another method or engine
            else:
                other = _owner(key)
                if other is None:
                    raise ValueError(f"{source}: unknown field {key!r}; known fields: {', '.join(_all_names())}")
                where = f"method {method}" + (f" with engine {inference}" if inference else "")
                raise ValueError(f"{key}: an option of {other}, not of {where}")
        if not strict:
            part_values = {block: {k: v for k, v in got.items() if k in own[block]}
                           for block, got in part_values.items()}
        space_options = chosen["search_space"][1].from_values(part_values["search_space"], chosen["search_space"][0])
        for key, value in SEARCH_SPACES.get(space).defaults(space_options).items():
            if key in cls.COMMON:
                common.setdefault(key, coerce(key, hints[key], value))
            for block in (b for b in chosen if key in own[b]):
                part_values[block].setdefault(key, value)
        options = {attribute: space_options if block == "search_space" else
                   chosen[block][1].from_values(part_values[block], chosen[block][0])
                   for block, _, _, attribute in PARTS if chosen[block][1] is not None}
        return cls(**common, method=method, inference=inference, search_space=space, **options)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, strict: bool = True) -> RunConfig:
        return cls.from_dict(read_yaml_mapping(path), source=f"config {Path(path).name}", strict=strict)


# each part: its YAML block, its flat name key, its registry and the RunConfig attribute holding its options
PARTS = (("method", "method", METHODS, "method_options"), ("engine", "inference", ENGINES, "engine_options"),
         ("search_space", "search_space", SEARCH_SPACES, "search_space_options"))
PART_OPTIONS = tuple(attribute for _, _, _, attribute in PARTS)
RunConfig.COMMON = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in PART_OPTIONS)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _options(cls: type[Options], given, owner: str) -> Options:
    if isinstance(given, cls):
        return given
    if given is None:
        return cls()
    if isinstance(given, dict):
        return cls.from_values(given, owner)
    raise ValueError(f"{owner}: options must be a mapping or {cls.__name__}, got {type(given).__name__}")


KINDS = (("method", METHODS), ("engine", ENGINES), ("search space", SEARCH_SPACES))


def _owner(key: str) -> str | None:
    """Which registered part has an option ``key`` (the first one, in registry order)."""
    owner = option_fields().get(key, ("run",))[0]
    return None if owner == "run" else owner


def option_fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Every option a flag or flat key can set: name → (owner, field, type), the common fields first, then the
    registered parts' options (a name several parts share is listed once, under the first)."""
    fields = {f.name: ("run", f, _hints(RunConfig)[f.name]) for f in dataclasses.fields(RunConfig)
              if f.name in RunConfig.COMMON}
    for kind, registry in KINDS:
        for name in registry.names():
            options = registry.get(name).options
            for f in dataclasses.fields(options) if options is not None else ():
                fields.setdefault(f.name, (f"{kind} {name}", f, _hints(options)[f.name]))
    return fields


def _all_names() -> list[str]:
    return sorted(option_fields())


def merge(base: dict, changes: dict) -> dict:
    """``base`` (nested as :meth:`RunConfig.to_dict` writes it, or flat) updated by ``changes`` (flat or nested).

    A new method name starts that method's options (and engine) from the defaults; so does a new engine name. When
    ``changes`` change the search space's defaults (``Space.defaults``: another space, or ``additive_backbone``), a
    value of ``base`` that was the old space's default gives way to the new one; a value ``changes`` give is kept.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    changes = {k.replace("-", "_"): v for k, v in changes.items()}
    for key, value in sorted(changes.items(), key=lambda kv: kv[0] != "method"):  # a new method first
        if key not in ("method", "engine", "inference", "search_space"):
            out[key] = value
            continue
        block = "engine" if key == "inference" else key
        new = dict(value) if isinstance(value, dict) else {"name": value}
        old = out.get(block) if isinstance(out.get(block), dict) else {"name": out.get(block)}
        if block == "engine" and "inference" in out:
            old = {**old, "name": out.pop("inference")}
        if "name" not in new or new["name"] == old.get("name"):
            out[block] = {**old, **new}
        else:
            out[block] = new
            if block == "method":
                out.pop("engine", None)
                out.pop("inference", None)
    return _without_old_space_defaults(base, changes, out)


def _without_old_space_defaults(base: dict, changes: dict, out: dict) -> dict:
    """``out`` without the values ``base`` holds only as its search space's defaults (the space's own, or the plain
    option defaults where it brings none) when the space of ``out`` defaults them otherwise."""
    try:
        old, new = RunConfig.from_dict(base, strict=False), RunConfig.from_dict(out, strict=False)
    except ValueError:  # an invalid base or result: RunConfig.from_dict reports it where it is read
        return out

    def default(config: RunConfig, key: str):
        brought = SEARCH_SPACES.get(config.search_space).defaults(config.search_space_options)
        plain = RunConfig.from_dict({"method": config.method, "inference": config.inference}, strict=False)
        return brought.get(key, getattr(plain, key, None))

    keys = {*SEARCH_SPACES.get(old.search_space).defaults(old.search_space_options),
            *SEARCH_SPACES.get(new.search_space).defaults(new.search_space_options)}
    given = {*changes, *(k for v in changes.values() if isinstance(v, dict) for k in v)}
    for key in keys - given:
        if getattr(old, key, None) == default(old, key) != default(new, key):
            out.pop(key, None)
            for block in (v for v in out.values() if isinstance(v, dict)):
                block.pop(key, None)
    return out


def layered(base: dict, config_file: str | None, flags: dict) -> dict:
    """``base`` (defaults of the command, or a run's config.yaml), then ``--config FILE``, then the flags given:
    each overrides the one before; the result is what :meth:`RunConfig.from_dict` reads."""
    values = merge(base, read_yaml_mapping(config_file)) if config_file else dict(base)
    return merge(values, {k: v for k, v in flags.items() if k in option_fields()})


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"config: {str(path)!r} is not valid UTF-8 YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"config: {str(path)!r} must hold a mapping of field: value")
    for key in values:
        if not isinstance(key, str):
            raise ValueError(f"config: {str(path)!r} has the key {key!r}, not a field name")
    return values
