"""The run configuration: one typed, validated record, read from YAML and overridden by CLI flags.

Every field carries its help text; ``cli.py`` builds its options from them, so ``--help``, ``config.yaml`` and
this file never disagree. ``validate()`` raises a one-line ``ValueError`` naming the field, the value and what
is allowed, before anything is written.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import TASKS
from .inference.posterior import ESTIMATORS
from .inference.runner import Schedule
from .inference.sgld import PRECONDITIONERS
from .finetune.lora import DEFAULT_TARGETS
from .methods import METHODS, POSTERIOR

ENGINES = ("sgld", "map", "vi", "map-svi")
GRID_FIELDS = ("gamma", "n_hat", "lr_lambda")  # stage-1 options that take a list, chosen on validation


def _f(default, help: str, **kw):
    meta = {"help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    # what to fine-tune, on what
    task: str = _f("bbc-news", "task name (bbc-news is the offline default; GLUE/SuperGLUE need --data-dir offline)")
    data_dir: str | None = _f(None, "directory with the task's distribution files (GLUE: train.tsv, dev.tsv)")
    backbone: str = _f("minilm-l6", "minilm-l6 (packaged), tiny-bert, hf:<hub id or dir>, timm:<name>")
    pretrained: bool = _f(True, "load pretrained weights (timm / hf); false = random initialisation")
    device: str = _f("cpu", "torch device: cpu, cuda, cuda:1, ...")
    seed: int = _f(0, "seed of a chain: head initialisation, data order, dropout and Langevin noise")
    data_seed: int = _f(0, "seed of the data: few-shot selection, --train-size subset (same for every chain)")
    max_length: int = _f(64, "tokens per example after truncation")
    batch_size: int = _f(16, "minibatch size |B| in both stages")
    eval_batch_size: int = _f(64, "batch size for evaluation")
    train_size: int | None = _f(None, "cap the training set at this many examples (seeded subset)")
    shots_per_class: int = _f(32, "bbc-news: training examples per class")
    validation_fraction: float = _f(0.0, "fraction of the training set held out for model selection: stage 2 "
                                    "restores the state with the best validation metric")
    include: list[str] = _f(["*"], "search space: glob patterns of covered parameter names", nargs="+")
    exclude: list[str] = _f([], "search space: glob patterns to leave out (the head is always out)", nargs="*")
    # the method
    method: str = _f("bayestune", "how coordinates are chosen and trained (see bayestune_pyro/methods.py): "
                     + ", ".join(METHODS), choices=METHODS)
    grad_batches: int = _f(8, "gradient, bitfit: minibatches whose |∇| are summed into the score")
    sift_batches: int = _f(1, "sift: minibatches whose |∇| are summed into the score")
    sift_modules: list[str] = _f(["*"], "sift: globs of the tensors it may choose from, e.g. '*attention*'",
                                 nargs="+")
    l1: float = _f(1e-4, "l1sp: strength of the L1 penalty towards θ̄ in its full fine-tuning stage (--steps)")
    dense_lr: float = _f(5e-5, "full, and l1sp's first stage: learning rate of dense AdamW fine-tuning")
    lora_targets: list[str] = _f(list(DEFAULT_TARGETS), "lora: globs of the weight matrices to adapt", nargs="+")
    lora_rank: int | None = _f(None, "lora: rank r (default: the rank whose parameter count is closest to ⌊p·d⌋)")
    # the model
    alpha: float = _f(0.01, "Gamma shape α of the prior on λ")
    beta: float = _f(100.0, "Gamma rate β of the prior on λ (prior mean α/β)")
    n_hat: float | list[float] = _f(1e9, "effective data size N̂ (likelihood weight); a list (1e8,1e10) is a grid "
                                    "chosen on validation, like --gamma")
    sigma: float = _f(1.0, "regression tasks: noise scale σ of the Normal likelihood")
    # stage 1: inference
    inference: str = _f("sgld", "sgld (sampling), map (the SGLD kernel with γ = 0), vi (SVI, AutoNormal guide), "
                        "map-svi (SVI, AutoDelta guide)", choices=ENGINES)
    chains: int = _f(1, "independent stage-1 chains (seeds seed, seed+1, …), run one after the other")
    vi_init_scale: float = _f(1e-4, "vi: initial standard deviation of the guide (unconstrained space)")
    steps: int = _f(300, "stage-1 steps in all (warm-up + burn-in + sampling)")
    warmup: int = _f(100, "warm-up steps: plain optimisation of θ and head, no prior, no noise")
    burnin: int = _f(100, "burn-in steps: SGLD, nothing collected")
    thin: int = _f(10, "collect every thin-th SGLD state in the sampling phase")
    lr: float = _f(1e-4, "stage-1 learning rate for θ (η = 2·lr/N̂)")
    lr_lambda: float | list[float] = _f(1e-2, "stage-1 learning rate for log λ; a list is a grid, like --gamma")
    head_lr: float = _f(1e-3, "learning rate of the head (Adam, both stages unless --stage2-head-lr)")
    lambda_init: float = _f(1e-4, "initial λ₀ of every coordinate")
    gamma: float | list[float] = _f(1.0, "noise discount γ (temperature γ²); 0 is MAP. A list (1e-4,1e-2,1) is a "
                                    "grid: every point runs stage 1 and 2, and the best validation score wins "
                                    "(needs --validation-fraction)")
    preconditioner: str = _f("rmsprop", "none (SGLD), rmsprop (pSGLD), adam (the original code; not a sampler)",
                             choices=PRECONDITIONERS)
    clip_norm: float | None = _f(None, "clip the stage-1 gradient of (θ, log λ) to this total norm")
    precond_eps: float | None = _f(None, "rmsprop: ε of G = 1/(√v + ε), the bound G ≤ 1/ε; default 1/(λ₀·N̂), the "
                                   "prior's gradient scale, so a coordinate without data moves on the prior's scale")
    freeze_preconditioner: bool = _f(True, "rmsprop: stop adapting the preconditioner G when sampling starts, so "
                                     "sampling is exact SGLD with a constant G")
    gibbs: bool = _f(False, "in burn-in and sampling, draw λ from its exact conditional λ | θ (GIG) after each "
                     "SGLD step on θ, instead of a Langevin step on log λ")
    lambda_estimator: str | None = _f(None, "λ̂ from the λ draws (draws) or the mean of E[λ | θ] over draws "
                                      "(rao-blackwell); default: rao-blackwell for sgld, draws (the λ path) for "
                                      "map and bayestune-paper", choices=ESTIMATORS)
    n_tracked: int = _f(256, "coordinates whose full traces are kept")
    delta_moments: bool = _f(False, "also keep the posterior mean and variance of θ − θ̄ for every coordinate")
    checkpoint_every: int = _f(100, "stage-1 checkpoint interval in steps")
    # mask
    p: float | None = _f(0.005, "fraction of covered coordinates to fine-tune in stage 2 (top-p by λ̂)")
    threshold: float | None = _f(None, "instead of p (takes precedence): fine-tune every coordinate with λ̂ > threshold")
    # stage 2
    stage2_steps: int = _f(300, "stage-2 steps")
    stage2_lr: float = _f(1e-3, "stage-2 learning rate of the masked coordinates (AdamW)")
    stage2_head_lr: float | None = _f(None, "stage-2 learning rate of the head (default: --head-lr)")
    weight_decay: float = _f(0.0, "stage-2 decoupled weight decay (masked coordinates and head only)")
    eval_every: int = _f(50, "with --validation-fraction: validate every this many stage-2 steps (and at the end)")

    def validate(self) -> "RunConfig":
        if self.task not in TASKS:
            raise ValueError(f"task: unknown value {self.task!r}; choose one of: {', '.join(TASKS)}")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise ValueError(f"data_dir: {self.data_dir!r} is not a directory")
        if self.method not in METHODS:
            raise ValueError(f"method: unknown value {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.method == "bayestune-map":
            self.inference = "map"
        if self.inference not in ENGINES:
            raise ValueError(f"inference: unknown value {self.inference!r}; choose one of: {', '.join(ENGINES)}")
        for name in ("chains", "max_length", "batch_size", "eval_batch_size", "shots_per_class", "n_tracked",
                     "checkpoint_every", "stage2_steps", "eval_every", "grad_batches", "sift_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"train_size: must be >= 1 or unset, got {self.train_size!r}")
        for name in ("alpha", "beta", "n_hat", "sigma", "lr", "lr_lambda", "head_lr", "lambda_init", "stage2_lr",
                     "vi_init_scale", "dense_lr"):
            for value in _values(getattr(self, name)):
                if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                    raise ValueError(f"{name}: must be a positive number, got {value!r}")
        for value in _values(self.gamma):
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"gamma: must be >= 0 (0 is MAP), got {value!r}")
        if self.precond_eps is not None and not (self.precond_eps > 0 and math.isfinite(self.precond_eps)):
            raise ValueError(f"precond_eps: must be a positive number or unset, got {self.precond_eps!r}")
        grid = self.gridded()
        if grid and self.method not in POSTERIOR:
            raise ValueError(f"{grid[0]}: a list is a grid over stage-1 posteriors; method {self.method!r} has none")
        if grid and not self.validation_fraction > 0:
            raise ValueError(f"{grid[0]}: a grid is chosen on the validation split; set --validation-fraction > 0")
        if self.lambda_estimator is not None and self.lambda_estimator not in ESTIMATORS:
            raise ValueError(f"lambda_estimator: unknown value {self.lambda_estimator!r}; "
                             f"choose one of: {', '.join(ESTIMATORS)}")
        if self.gibbs and (self.method == "bayestune-paper" or self.inference != "sgld"):
            raise ValueError(f"gibbs: the Gibbs step for λ is part of the sgld engine of bayestune, not of method "
                             f"{self.method!r} with inference {self.inference!r}")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner: unknown value {self.preconditioner!r}; "
                             f"choose one of: {', '.join(PRECONDITIONERS)}")
        if self.threshold is not None:
            self.p = None  # a threshold replaces the default budget
        if self.p is None and self.threshold is None:
            raise ValueError("p: unset, and no threshold either; give one of them")
        if self.p is not None and not 0 < self.p <= 1:
            raise ValueError(f"p: must be a fraction in (0, 1], got {self.p!r}")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"threshold: must be > 0, got {self.threshold!r}")
        if self.threshold is not None and self.method not in POSTERIOR:
            raise ValueError(f"threshold: only {' and '.join(POSTERIOR)} select by a λ̂ threshold; give --p for "
                             f"method {self.method!r}")
        if not 0 <= self.validation_fraction <= 0.5:
            raise ValueError(f"validation_fraction: must be in [0, 0.5], got {self.validation_fraction!r}")
        if self.l1 < 0:
            raise ValueError(f"l1: must be >= 0, got {self.l1!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank: must be >= 1 or unset, got {self.lora_rank!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        self.schedule()
        return self

    def schedule(self) -> Schedule:
        return Schedule(self.steps, self.warmup, self.burnin, self.thin)

    def estimator(self) -> str:
        """The λ̂ estimator: as set, else rao-blackwell when sampling and draws (the λ path) otherwise."""
        if self.lambda_estimator is not None:
            return self.lambda_estimator
        return "rao-blackwell" if self.inference == "sgld" and self.method == "bayestune" else "draws"

    def grid(self) -> list[dict]:
        """The grid points: one {field: value} per combination of the list-valued ``GRID_FIELDS``."""
        points = [{}]
        for name in GRID_FIELDS:
            points = [{**point, name: value} for point in points for value in _values(getattr(self, name))]
        return points

    def gridded(self) -> list[str]:
        """The ``GRID_FIELDS`` that hold a list."""
        return [name for name in GRID_FIELDS if isinstance(getattr(self, name), list)]

    def single(self, stage: str) -> None:
        """Refuse a grid where one stage 1 is meant."""
        if self.gridded():
            raise ValueError(f"{self.gridded()[0]}: {stage} runs one grid point; a list is run by `bayestune run`")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: coerce(k, types[k], v) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config: {str(path)!r} is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ValueError(f"config: {str(path)!r} must hold a mapping of field: value")
        return cls.from_dict({k.replace("-", "_"): v for k, v in values.items()}, source=f"config {path.name}")


def _values(value) -> list:
    return list(value) if isinstance(value, list) else [value]


def coerce(name: str, kind: str, value):
    """Convert a YAML or command-line value to the field's declared type, or say which field is wrong."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if "None" in kind:
            return None
        raise ValueError(f"{name}: must be set (a {kind}), got {value!r}")
    base = kind.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base == "float":
            return float(value)
        if base == "float | list[float]":
            items = value if isinstance(value, (list, tuple)) else str(value).split(",") if isinstance(value, str) \
                else [value]
            floats = [float(v) for v in items]
            return floats[0] if len(floats) == 1 else floats
        if base == "list[str]":
            return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        return str(value)
    except (TypeError, ValueError):
        article = "an" if base[0] in "aeiou" else "a"
        what = "a number or a comma-separated list of numbers" if "list[float]" in base else f"{article} {base}"
        raise ValueError(f"{name}: expected {what}, got {value!r}") from None
