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
``OUT/results.md`` is re-rendered after every cell. Cell directories keep config, mask and metrics; the
posterior and deltas are deleted once a cell is recorded (they are ~8 bytes per coordinate).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import traceback
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from ..config import RunConfig, coerce
from ..io import write_yaml
from ..methods import METHODS
from .memory import PeakMemory
from .table import render

BENCH_DEFAULTS = {"train_size": 1000, "validation_fraction": 0.1, "steps": 120, "warmup": 40, "burnin": 40,
                  "thin": 4, "stage2_steps": 150, "eval_every": 50, "eval_batch_size": 128}
GRID = ("task", "data_dir", "method", "seed", "data_seed", "p", "threshold")  # set per cell, not protocol
# what an option added later meant in a bench.yaml written before it: the behaviour of the code at the time
LEGACY = {"precond_eps": 1e-8, "freeze_preconditioner": False, "gibbs": False, "lambda_estimator": "draws", "per_method": {}}
HEAVY = ("posterior.safetensors", "delta.safetensors", "stage1.ckpt", "trace.nc")


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


def parse_overrides(option: str, items: list[str], keys: list[str]) -> dict[str, dict]:
    """``KEY.FIELD=VALUE`` items, KEY a benched task (``per_task``) or method (``per_method``) → {key: {field:
    value}}, each value converted to the run option's type (a comma list for γ, N̂ or lr_λ is a grid)."""
    types = {f.name: f.type for f in dataclasses.fields(RunConfig) if f.name not in GRID}
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
        if field not in types:
            raise ValueError(f"{option}: {field!r} is not a per-{what} run option; "
                             f"choose from: {', '.join(sorted(types))}")
        overrides.setdefault(name, {})[field] = coerce(field, types[field], value.strip())
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
    with open(path, "a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _check_protocol(base: RunConfig, per_task: dict[str, dict], per_method: dict[str, dict], out: Path) -> None:
    protocol = {k: v for k, v in base.to_dict().items() if k not in GRID}
    protocol.update(per_task=per_task, per_method=per_method)
    path = out / "bench.yaml"
    if path.exists():
        old = {**LEGACY, **(yaml.safe_load(path.read_text()) or {})}
        changed = [k for k in protocol if old.get(k) != protocol[k]]
        if changed:
            k = changed[0]
            raise ValueError(f"out: {str(out)!r} holds a bench with {k}={old.get(k)!r} (now {protocol[k]!r}); "
                             "choose another --out or pass the same options")
    else:
        write_yaml(path, protocol)


def run_bench(base: RunConfig, tasks: list[str], methods: list[str], budgets: list[float], seeds: list[int],
              data_root: str | None, out: str | os.PathLike, progress: bool = True,
              per_task: dict[str, dict] | None = None, per_method: dict[str, dict] | None = None) -> list[dict]:
    """Run every missing cell of the grid (``per_task`` / ``per_method``: run options for one task's or one
    method's cells, as :func:`parse_overrides` returns; a task's win); returns all records of ``OUT/cells.jsonl``."""
    per_task, per_method = per_task or {}, per_method or {}
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"methods: unknown value {method!r}; choose from: {', '.join(METHODS)}")
    out = Path(out)
    jsonl = out / "cells.jsonl"
    done = {(r["task"], r["method"], r["seed"], r["p"]) for r in read_records(jsonl)}
    todo = [c for c in cells(tasks, methods, budgets, seeds) if c.key not in done]
    # every cell is validated before the first one runs
    configs = [_cell_config(base, c, data_root, {**per_method.get(c.method, {}), **per_task.get(c.task, {})})
               for c in todo]
    from .. import pipeline  # heavy imports after validation
    from ..data import load_task

    for config in {c.task: c for c in configs}.values():  # every task's files readable before the first cell
        load_task(config.task, config.data_dir, seed=0)
    out.mkdir(parents=True, exist_ok=True)  # only now: bad input leaves no bench directory behind
    _check_protocol(base, per_task, per_method, out)
    bar = tqdm(list(zip(todo, configs)), desc="bench", disable=not progress, dynamic_ncols=True)
    for cell, config in bar:
        bar.set_postfix(task=cell.task, method=cell.method, seed=cell.seed)
        directory = cell.directory(out)
        shutil.rmtree(directory, ignore_errors=True)  # an unfinished cell starts again
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
            for key in ("n_changed", "chosen", "grid"):  # grid: every point's validation score, and the winner
                if key in metrics:
                    record[key] = metrics[key]
        for name in HEAVY:  # also in the points of a grid (RUN/grid/*/)
            for path in directory.rglob(name):
                path.unlink()
        _append(jsonl, record)
        render(read_records(jsonl), out / "results.md", tasks_order=tasks)
    records = read_records(jsonl)
    render(records, out / "results.md", tasks_order=tasks)
    return records


def _cell_config(base: RunConfig, cell: Cell, data_root: str | None, overrides: dict) -> RunConfig:
    values = {**base.to_dict(), **overrides, "task": cell.task, "method": cell.method, "seed": cell.seed,
              "data_seed": cell.seed, "p": cell.p, "threshold": None,
              "data_dir": data_root if data_root is not None else base.data_dir}
    return RunConfig.from_dict(values).validate()
