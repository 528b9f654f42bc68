"""``results.md`` from the bench records: Table 1's shape — methods × tasks, mean ± std over seeds, average,
rank — and below it the per-seed paired differences to a reference method with bootstrap intervals, and the
calibration (ECE, NLL) of the classification tasks."""
from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict

import numpy as np

from ..io import atomic_path
from ..registry import METHODS

METRIC_NAMES = {"mcc": "MCC", "accuracy": "acc.", "f1": "F1", "pearson_spearman": "Pearson/Spearman"}
CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")  # a task scored by one of these is a classification task
CALIBRATION = {"ece": "ECE", "nll": "NLL"}  # keys of a record's ``test`` (cells recorded before them lack them)
RESAMPLES = 10_000


def _ok(record: dict) -> bool:
    """A usable cell: status ok and a finite score (a NaN score counts as failed, never averaged in)."""
    return record.get("status") == "ok" and math.isfinite(record.get("score", math.nan))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def bootstrap_interval(diffs: np.ndarray) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``diffs``: seeds resampled with replacement."""
    rng = np.random.default_rng(0)
    means = diffs[rng.integers(0, len(diffs), size=(RESAMPLES, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _paired(scores: dict, tasks: list[str], method: str, reference: str) -> dict[str, np.ndarray]:
    """Per task, and "Avg" over tasks, ``method`` − ``reference`` on the seeds both have (Avg: only seeds with
    every task), in seed order."""
    per_task = {t: {s: v - scores[(reference, t)][s] for s, v in scores.get((method, t), {}).items()
                    if s in scores.get((reference, t), {})} for t in tasks}
    full = sorted(set.intersection(*(set(d) for d in per_task.values())))
    columns = {t: np.array([d[s] for s in sorted(d)]) for t, d in per_task.items() if d}
    if full:
        columns["Avg"] = np.array([statistics.fmean(d[s] for d in per_task.values()) for s in full])
    return columns


def summarise(records: list[dict], tasks_order: list[str] | None = None, reference: str = "bayestune") -> dict:
    """Per budget p: per (method, task) the test scores (×100) by seed, the average over tasks, the rank, per
    method the paired differences to ``reference`` (none if it is absent), and per (method, task, key of
    ``CALIBRATION``) the calibration by seed, from the cells that carry it."""
    ok = [r for r in records if _ok(r)]
    tasks = [t for t in (tasks_order or []) if any(r["task"] == t for r in ok)]
    tasks += sorted({r["task"] for r in ok} - set(tasks))
    summary = {}
    for p in sorted({r["p"] for r in ok}):
        scores, info, calibration = defaultdict(dict), defaultdict(lambda: defaultdict(list)), defaultdict(dict)
        predictive = defaultdict(dict)
        for r in ok:
            if r["p"] == p:
                scores[(r["method"], r["task"])][r["seed"]] = 100 * r["score"]
                for key in CALIBRATION:
                    if key in r.get("test", {}):
                        calibration[(r["method"], r["task"], key)][r["seed"]] = r["test"][key]
                for key in ("n_updated", "seconds", "peak_mb"):
                    info[r["method"]][key].append(r[key])
                for variant, values in _predictives(r).items():
                    for key, value in values.items():
                        predictive[(r["method"], r["task"], variant, key)][r["seed"]] = value
        methods = [m for m in METHODS.names() if any((m, t) in scores for t in tasks)]
        averages = {m: statistics.fmean(statistics.fmean(scores[(m, t)].values()) for t in tasks)
                    for m in methods if all((m, t) in scores for t in tasks)}
        ranked = sorted(averages, key=averages.get, reverse=True)
        paired = {m: _paired(scores, tasks, m, reference) for m in methods
                  if m != reference and reference in methods}
        summary[p] = {"tasks": tasks, "methods": methods, "scores": dict(scores), "average": averages,
                      "rank": {m: ranked.index(m) + 1 for m in ranked}, "info": info,
                      "paired": {m: columns for m, columns in paired.items() if columns},
                      "calibration": dict(calibration), "predictive": dict(predictive)}
    return summary


def _predictives(record: dict) -> dict[str, dict[str, float]]:
    """A classification cell's predictive variants that can be compared: the point estimate, its temperature-scaled
    copy and each ensemble, with the metric (×100), ECE and NLL; none for a cell without temperature or ensembles."""
    if "temperature" not in record and "ensembles" not in record or "ece" not in record.get("test", {}):
        return {}
    metric = record["metric"]
    point = {"metric": 100 * record["test"][metric], **{k: record["test"][k] for k in CALIBRATION}}
    out = {"point": point}
    if "temperature" in record:  # the same predictions (argmax), rescaled confidences
        out["temperature-scaled"] = {"metric": point["metric"], **{k: record["temperature"][k] for k in CALIBRATION}}
    for kind, ensemble in record.get("ensembles", {}).items():
        out[f"{kind} ensemble"] = {"metric": 100 * ensemble["test"][metric],
                                   **{k: ensemble["test"][k] for k in CALIBRATION}}
    return out


def _header(first: str, tasks: list[str], metrics: dict[str, str], extra: list[str]) -> list[str]:
    """A table's header row (``first``, tasks with their metric, ``extra``) and its rule."""
    names = [first, *(f"{t} ({METRIC_NAMES.get(metrics[t], metrics[t])})" for t in tasks), *extra]
    return ["| " + " | ".join(names) + " |", "|---" * len(names) + "|"]


def _seeds(s: dict) -> int:
    """The most seeds any cell has."""
    return max((len(v) for v in s["scores"].values()), default=0)


def _spread(values: list[float], seeds: int, digits: int = 2) -> str:
    """``mean ± std`` (no spread from one value; ``–`` for none), ``(n=…)`` below ``seeds`` values."""
    if not values:
        return "–"
    mean, std = _mean_std(values)
    text = f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"
    return text + (f" (n={len(values)})" if len(values) < seeds else "")


def _main_table(s: dict, metrics: dict[str, str]) -> list[str]:
    """Mean ± std per task, average, rank, n_updated, s/cell and peak MB per method."""
    seeds = _seeds(s)
    lines = _header("method", s["tasks"], metrics, ["Avg", "Rank", "n_updated", "s/cell", "peak MB"])
    for m in s["methods"]:
        cells = [_spread(list(s["scores"].get((m, t), {}).values()), seeds) for t in s["tasks"]]
        avg = f"{s['average'][m]:.2f}" if m in s["average"] else "–"
        rank = str(s["rank"][m]) if m in s["rank"] else "–"
        info = s["info"][m]
        updated = sorted(set(info["n_updated"]))
        updated_text = f"{updated[0]:,}" if len(updated) == 1 else f"{updated[0]:,}–{updated[-1]:,}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} | {rank} | {updated_text} | "
                     f"{statistics.fmean(info['seconds']):.0f} | {statistics.fmean(info['peak_mb']):.0f} |")
    return lines


def _difference(diffs: np.ndarray | None, seeds: int) -> str:
    """``+mean [low, high]``, bold if the interval excludes 0; ``(n=…)`` below ``seeds`` paired seeds."""
    if diffs is None:
        return "–"
    n = f" (n={len(diffs)})" if len(diffs) < seeds else ""
    if len(diffs) == 1:
        return f"{diffs[0]:+z.2f} [–]{n}"
    low, high = bootstrap_interval(diffs)
    text = f"{diffs.mean():+z.2f} [{low:+z.2f}, {high:+z.2f}]"  # z: no "-0.00" from rounding
    return (f"**{text}**" if low > 0 or high < 0 else text) + n


def _paired_table(s: dict, metrics: dict[str, str], reference: str) -> list[str]:
    """The paired differences to ``reference`` with their explanation; none without a paired method."""
    if not s["paired"]:
        return []
    seeds = max(len(d) for columns in s["paired"].values() for d in columns.values())
    lines = [f"### Paired differences to {reference}", "",
             f"100 × (method − {reference}) per seed, on the seeds both have (a seed fixes the data subset, head "
             f"initialisation and batch order); positive = better than {reference}. Mean over seeds with a 95% "
             f"percentile bootstrap interval (seeds resampled with replacement, {RESAMPLES:,} resamples); bold: the "
             "interval excludes 0. Avg: per seed the mean over tasks, on the seeds with every task. With few "
             "seeds (e.g. 3) a percentile bootstrap interval is optimistic (too narrow); the mean ± std table above "
             "remains.",
             "", *_header("comparison", s["tasks"], metrics, ["Avg"])]
    for m, columns in s["paired"].items():
        cells = [_difference(columns.get(c), seeds) for c in [*s["tasks"], "Avg"]]
        lines.append(f"| {m} − {reference} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _calibration_table(s: dict, metrics: dict[str, str]) -> list[str]:
    """ECE and NLL per classification task and method; none if no cell at this p carries them."""
    tasks = [t for t in s["tasks"] if metrics[t] in CLASSIFICATION_METRICS]
    if not s["calibration"] or not tasks:
        return []
    seeds = _seeds(s)
    names = ["method", *(f"{t} {label}" for t in tasks for label in CALIBRATION.values())]
    lines = ["### Calibration", "",
             "On the test split of each classification task: ECE (top-1, 15 equal-width confidence bins) and NLL "
             "(mean negative log-likelihood of the softmax), both lower = better; mean ± sample std over the seeds "
             "whose cells record them (n as above). –: no such cell (e.g. recorded before calibration was measured).",
             "", "| " + " | ".join(names) + " |", "|---" * len(names) + "|"]
    for m in s["methods"]:
        cells = [_spread(list(s["calibration"].get((m, t, key), {}).values()), seeds, digits=3)
                 for t in tasks for key in CALIBRATION]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _predictive_table(s: dict, metrics: dict[str, str]) -> list[str]:
    """Per method with such cells: the point estimate, temperature scaling and the ensembles side by side."""
    if not s["predictive"]:
        return []
    tasks = [t for t in s["tasks"] if any(key[1] == t for key in s["predictive"])]
    seeds = _seeds(s)
    names = ["method", "predictive", *(f"{t} {label}" for t in tasks
                                       for label in (METRIC_NAMES.get(metrics[t], metrics[t]), *CALIBRATION.values()))]
    lines = ["### Predictive uncertainty", "",
             "The point estimate; the same network with its temperature fitted on the validation split; and the "
             "mean predictive of each ensemble of S sparse deltas over the method's mask (sgld: SGLD draws of δ and "
             "the head at N̂ = |D|; deep: the point estimate and S − 1 refits; both store S·k numbers). Test metric "
             "×100 (higher = better), ECE and NLL (lower = better), mean ± std over seeds.",
             "", "| " + " | ".join(names) + " |", "|---" * len(names) + "|"]
    variants = list(dict.fromkeys(key[2] for key in s["predictive"]))
    for m in s["methods"]:
        for variant in variants:
            cells = [_spread(list(s["predictive"].get((m, t, variant, key), {}).values()), seeds,
                             digits=2 if key == "metric" else 3) for t in tasks for key in ("metric", *CALIBRATION)]
            if any(c != "–" for c in cells):
                lines.append(f"| {m} | {variant} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _failed(records: list[dict]) -> list[str]:
    """The cells that failed or scored NaN, one line each."""
    failed = [r for r in records if not _ok(r)]
    lines = [f"- {r['task']} / {r['method']} / seed {r['seed']} / p {r['p']:g}: "
             + r.get("error", f"non-finite score {r.get('score')}") for r in failed]
    return ["## Failed cells", "", *lines, ""] if lines else []


def render(records: list[dict], path: str | os.PathLike, tasks_order: list[str] | None = None,
           reference: str = "bayestune") -> str:
    """Write (atomically) and return the markdown tables."""
    metrics = {r["task"]: r["metric"] for r in records if _ok(r)}
    lines = ["# Benchmark results", "",
             "Test score ×100 on each task's dev set (metric in the header), mean ± sample std over seeds (n = "
             "seeds when fewer than the most any cell has; a single seed shows no spread); Avg is the mean over "
             "tasks, Rank orders the averages (1 = best). "
             "n_updated is the number of backbone coordinates stage 2 trains (the head aside; stochastic: per "
             "step); s/cell and peak MB are per cell (selection + stage 2 + evaluation), means over cells.", ""]
    for p, s in summarise(records, tasks_order, reference).items():
        lines += [f"## p = {p:g}", "", *_main_table(s, metrics), "", *_paired_table(s, metrics, reference),
                  *_calibration_table(s, metrics), *_predictive_table(s, metrics)]
    lines += _failed(records)
    text = "\n".join(lines)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return text
