"""The benchmark grid: every (seed, task, budget p, method) cell is one pipeline run, recorded as one JSONL line.

Protocol (the paper's, scaled to a CPU; every default below can be overridden like any run option):
the training set is capped at ``train_size`` examples and 10% of it is held out as the validation split;
stage 2 validates every ``eval_every`` steps and keeps the best state; the test set is the task's labelled
dev/val split, scored with the task's metric (MCC for CoLA, mean of Pearson and Spearman for STS-B, F1 for
MRPC/QQP, accuracy otherwise). Within a seed every method sees the same data, head initialisation and batches.
A task may get its own value of any run option (``--per-task rte.stage2_steps=300``: a bigger train-size cap
or step budget for a task that needs one); every method on that task gets it. A method may get its own too
(``--per-method bayestune.gamma=1e-4,1e-2,1``: a grid chosen on validation, see ``pipeline.run_grid``).

``OUT/cells.jsonl`` is appended after every cell, so an interrupted bench resumes where it stopped and a
finished cell is never recomputed; ``OUT/bench.yaml`` fixes the protocol (a different one is refused);
``OUT/results.md`` is re-rendered after every cell. One bench at a time runs in an ``OUT``: it holds an OS lock
(``flock``) on ``OUT/bench.lock``, which the OS releases when the process ends, however it ends. Cell directories
keep config, mask and metrics; the posterior and deltas are deleted once a cell is recorded (they are ~8 bytes per
coordinate).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from ..config import RunConfig, coerce, layered, merge, option_fields
from ..io import write_yaml
from ..registry import METHODS
from .memory import PeakMemory
from .table import render

BENCH_DEFAULTS = {"train_size": 1000, "validation_fraction": 0.1, "steps": 120, "warmup": 40, "burnin": 40,
                  "thin": 4, "stage2_steps": 150, "eval_every": 50, "eval_batch_size": 128}
GRID = ("task", "data_dir", "method", "seed", "data_seed", "p", "threshold")  # set per cell, not protocol
# what an option added later meant in a bench.yaml written before it: the behaviour of the code at the time
LEGACY = {"precond_eps": 1e-8, "freeze_preconditioner": False, "gibbs": False, "lambda_estimator": "draws"}
HEAVY = ("posterior.safetensors", "delta.safetensors", "stage1.ckpt", "trace.nc", "ensemble-*.safetensors")
LOCK = "bench.lock"


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    method: str
    seed: int
    p: float

    @property
    def key(self) -> tuple:
        return (self.task, self.method, self.seed, self.p)

    def directory(self, out: Path) -> Path:
        return out / "cells" / self.task / self.method / f"p{self.p:g}-seed{self.seed}"


def parse_list(field: str, text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    """A comma-separated list; ``all`` means every allowed value."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        if items == ["all"]:
            return list(allowed)
        for item in items:
            if item not in allowed:
                raise ValueError(f"{field}: unknown value {item!r}; choose from: all, {', '.join(allowed)}")
    if not items:
        raise ValueError(f"{field}: empty list")
    return items


def bench_values(args, defaults: dict) -> dict:
    """The bench's run options: ``defaults``, then --config, then flags; each cell keeps those its method has."""
    values = layered(defaults, getattr(args, "config", None),
                     {k: v for k, v in vars(args).items() if k not in GRID})
    RunConfig.from_dict(values, source="option", strict=False)  # every value valid before anything runs
    return values


def parse_overrides(option: str, items: list[str], keys: list[str]) -> dict[str, dict]:
    """``KEY.FIELD=VALUE`` items, KEY a benched task (``per_task``) or method (``per_method``) → {key: {field:
    value}}, each value converted to the option's type (a comma list for γ, N̂ or lr_λ is a grid)."""
    fields = {name: hint for name, (_, _, hint) in option_fields().items() if name not in GRID}
    what = option.removeprefix("per_")
    overrides: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, field = key.strip().partition(".")
        field = field.replace("-", "_")
        if not sep or not dot or not value.strip():
            raise ValueError(f"{option}: {item!r} is not {what.upper()}.FIELD=VALUE (e.g. "
                             f"{'rte.stage2_steps=300' if what == 'task' else 'bayestune.gamma=1e-4,1e-2,1'})")
        if name not in keys:
            raise ValueError(f"{option}: {what} {name!r} is not benched; choose from: {', '.join(keys)}")
        if field not in fields:
            raise ValueError(f"{option}: {field!r} is not a per-{what} run option; "
                             f"choose from: {', '.join(sorted(fields))}")
        overrides.setdefault(name, {})[field] = coerce(field, fields[field], value.strip())
    return overrides


def cells(tasks: list[str], methods: list[str], budgets: list[float], seeds: list[int]) -> list[Cell]:
    """Seed-major order, so a bench cut short still has every method on every task for its first seeds."""
    return [Cell(t, m, s, p) for s in seeds for t in tasks for p in budgets for m in methods]


def read_records(path: Path) -> list[dict]:
    """Records of cells.jsonl; a line cut by a crash mid-write is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _append(path: Path, record: dict) -> None:
    """Append one line; a last line cut by a crash mid-write is dropped first, or the record would join it."""
    with open(path, "a+b") as f:
        f.seek(0)
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def protocol(values: dict, per_task: dict[str, dict], per_method: dict[str, dict], methods: list[str]) -> dict:
    """What every cell shares (the common options and ``per_task``), plus each method's own configuration: its
    options, its engine's and any common option it overrides. A method's change leaves other methods' cells valid."""
    common = RunConfig.from_dict(values, strict=False).to_dict()
    record = {k: v for k, v in common.items() if k in RunConfig.COMMON and k not in GRID + ("inference",)}
    record["per_task"] = per_task
    record["methods"] = {}
    for method in methods:
        overrides = per_method.get(method, {})
        config = RunConfig.from_dict(merge(values, {**overrides, "method": method}), strict=False).to_dict()
        own = {k: config[k] for k in ("method", "engine") if k in config}
        own.update({k: v for k, v in overrides.items() if k in RunConfig.COMMON})
        record["methods"][method] = own
    return record


def _check_protocol(new: dict, out: Path, methods: list[str]) -> None:
    path = out / "bench.yaml"
    if not path.exists():
        write_yaml(path, new)
        return
    old = yaml.safe_load(path.read_text()) or {}
    if "methods" not in old:  # a bench.yaml written before methods had their own configurations: all flat
        old = {**LEGACY, **old}
        flat = {k: v for k, v in old.items() if k not in ("per_task", "per_method")}
        old = protocol(flat, old.get("per_task", {}), old.get("per_method", {}), methods)
    for key in new:
        if key != "methods" and old.get(key) != new[key]:
            raise ValueError(f"out: {str(out)!r} holds a bench with {key}={old.get(key)!r} (now {new[key]!r}); "
                             "choose another --out or pass the same options")
    for method, own in new["methods"].items():
        if method in old["methods"] and old["methods"][method] != own:
            changed = _first_difference(old["methods"][method], own)
            raise ValueError(f"out: {str(out)!r} holds {method} cells with {changed}; choose another --out or pass "
                             "the same options")
    if any(m not in old["methods"] for m in new["methods"]) and "methods" in (yaml.safe_load(path.read_text()) or {}):
        write_yaml(path, {**old, "methods": {**old["methods"], **new["methods"]}})


def _first_difference(old: dict, new: dict) -> str:
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and a != b:
            return f"{key}.{_first_difference(a, b)}"
        if a != b:
            return f"{key}={a!r} (now {b!r})"
    return "the same options"


def run_bench(base: dict, tasks: list[str], methods: list[str], budgets: list[float], seeds: list[int],
              data_root: str | None, out: str | os.PathLike, progress: bool = True,
              per_task: dict[str, dict] | None = None, per_method: dict[str, dict] | None = None) -> list[dict]:
    """Run every missing cell of the grid. ``base``: run options (flat, as :func:`bench_values` returns; each cell
    keeps those of its method and engine); ``per_task`` / ``per_method``: options for one task's or one method's
    cells, as :func:`parse_overrides` returns (a task's win); returns all records of ``OUT/cells.jsonl``."""
    per_task, per_method = per_task or {}, per_method or {}
    for method in methods:
        METHODS.get(method)  # a one-line error for an unknown method
    out = Path(out)
    jsonl = out / "cells.jsonl"
    grid = cells(tasks, methods, budgets, seeds)
    # every cell is validated before the first one runs
    configs = [cell_config(base, c, data_root, {**per_method.get(c.method, {}), **per_task.get(c.task, {})})
               for c in grid]
    for method, overrides in per_method.items():  # an option the method does not have would be dropped silently
        config = next(c for cell, c in zip(grid, configs) if cell.method == method)
        for field in overrides:
            if field not in config.flat():
                raise ValueError(f"per_method: {field!r} is not an option of method {method!r} (nor a run option)")
    from ..data import load_task  # heavy imports after validation
    from ..run_setup import check_available

    for device in {c.device for c in configs}:
        check_available(device)
    for config in {c.task: c for c in configs}.values():  # every task's files readable before the first cell
        load_task(config.task, config.data_dir, seed=0)
    out.mkdir(parents=True, exist_ok=True)  # only now: bad input leaves no bench directory behind
    with _lock(out):
        _check_protocol(protocol(base, per_task, per_method, methods), out, methods)
        done = {(r["task"], r["method"], r["seed"], r["p"]) for r in read_records(jsonl)}  # under the lock
        todo = [(cell, config) for cell, config in zip(grid, configs) if cell.key not in done]
        bar = tqdm(todo, desc="bench", disable=not progress, dynamic_ncols=True)
        for cell, config in bar:
            bar.set_postfix(task=cell.task, method=cell.method, seed=cell.seed)
            _append(jsonl, _run_cell(cell, config, out))
            render(read_records(jsonl), out / "results.md", tasks_order=tasks)
        records = read_records(jsonl)
        render(records, out / "results.md", tasks_order=tasks)
    return records


@contextmanager
def _lock(out: Path):
    """Hold ``OUT/bench.lock`` (``flock``: released by the OS when this process ends, even by kill -9), or refuse."""
    with open(out / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            raise ValueError(f"out: {str(out)!r} is in use by another bench (pid {pid}); wait for it to finish or "
                             "choose another --out") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def _run_cell(cell: Cell, config: RunConfig, out: Path) -> dict:
    """Run one cell from scratch in its directory (an unfinished one starts again) and return its record."""
    from .. import pipeline

    directory = cell.directory(out)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    record = {"task": cell.task, "method": cell.method, "seed": cell.seed, "p": cell.p}
    start = time.perf_counter()
    try:
        with PeakMemory(config.device) as mem:
            metrics = pipeline.run(config, directory, progress=False)
    except FloatingPointError as err:  # a diverged cell is reported, not averaged in; anything else stops
        record.update(status="failed", error=f"{type(err).__name__}: {str(err).splitlines()[0]}",
                      seconds=time.perf_counter() - start)
        (directory / "error.txt").write_text(traceback.format_exc())
    else:
        record.update(status="ok", metric=metrics["metric"], score=metrics[f"test_{metrics['metric']}"],
                      test=metrics["test"], validation_score=metrics.get("validation_score"),
                      n_updated=metrics["n_updated"], budget=metrics["budget"], n_total=metrics["n_total"],
                      seconds=time.perf_counter() - start, peak_mb=mem.growth / 2**20)
        for key in ("n_changed", "chosen", "grid", "temperature"):  # grid: each point's validation score, the winner
            if key in metrics:
                record[key] = metrics[key]
        if "ensembles" in metrics:  # their scores, without the reliability tables
            record["ensembles"] = {kind: {k: v for k, v in e.items() if k != "reliability"}
                                   for kind, e in metrics["ensembles"].items()}
    for name in HEAVY:  # also in the points of a grid (RUN/grid/*/)
        for path in directory.rglob(name):
            path.unlink()
    return record


def cell_config(base: dict, cell: Cell, data_root: str | None, overrides: dict) -> RunConfig:
    cell_values = {**overrides, "method": cell.method, "task": cell.task, "seed": cell.seed, "data_seed": cell.seed,
                   "p": cell.p, "threshold": None}
    if data_root is not None:
        cell_values["data_dir"] = data_root
    return RunConfig.from_dict(merge(base, cell_values), strict=False)
