"""``results.md`` from the bench records: Table 1's shape — methods × tasks, mean ± std over seeds, average, rank."""
from __future__ import annotations

import os
import statistics
from collections import defaultdict

from ..io import atomic_path
from ..methods import METHODS

METRIC_NAMES = {"mcc": "MCC", "accuracy": "acc.", "f1": "F1", "pearson_spearman": "Pearson/Spearman"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def summarise(records: list[dict], tasks_order: list[str] | None = None) -> dict:
    """Per budget p: per (method, task) the test scores (×100) over seeds, the average over tasks and the rank."""
    ok = [r for r in records if r.get("status") == "ok"]
    tasks = [t for t in (tasks_order or []) if any(r["task"] == t for r in ok)]
    tasks += sorted({r["task"] for r in ok} - set(tasks))
    summary = {}
    for p in sorted({r["p"] for r in ok}):
        scores, info = defaultdict(list), defaultdict(lambda: defaultdict(list))
        for r in ok:
            if r["p"] == p:
                scores[(r["method"], r["task"])].append(100 * r["score"])
                for key in ("n_updated", "seconds", "peak_mb"):
                    info[r["method"]][key].append(r[key])
        methods = [m for m in METHODS if any((m, t) in scores for t in tasks)]
        averages = {m: statistics.fmean(statistics.fmean(scores[(m, t)]) for t in tasks)
                    for m in methods if all((m, t) in scores for t in tasks)}
        ranked = sorted(averages, key=averages.get, reverse=True)
        summary[p] = {"tasks": tasks, "methods": methods, "scores": dict(scores), "average": averages,
                      "rank": {m: ranked.index(m) + 1 for m in ranked}, "info": info}
    return summary


def render(records: list[dict], path: str | os.PathLike, tasks_order: list[str] | None = None) -> str:
    """Write (atomically) and return the markdown tables."""
    metrics = {r["task"]: r["metric"] for r in records if r.get("status") == "ok"}
    lines = ["# Benchmark results", "",
             "Test score ×100 on each task's dev set (metric in the header), mean ± sample std over seeds (n = "
             "seeds when fewer than the most any cell has; a single seed shows no spread); Avg is the mean over tasks, Rank orders the averages (1 = best). "
             "n_updated is the number of backbone coordinates stage 2 trains (the head aside; stochastic: per "
             "step); s/cell and peak MB are per cell (selection + stage 2 + evaluation), means over cells.", ""]
    for p, s in summarise(records, tasks_order).items():
        seeds = max((len(v) for v in s["scores"].values()), default=0)
        lines += [f"## p = {p:g}", "",
                  "| method | " + " | ".join(f"{t} ({METRIC_NAMES.get(metrics[t], metrics[t])})" for t in s["tasks"])
                  + " | Avg | Rank | n_updated | s/cell | peak MB |",
                  "|---" * (len(s["tasks"]) + 6) + "|"]
        for m in s["methods"]:
            cells = []
            for t in s["tasks"]:
                values = s["scores"].get((m, t))
                if not values:
                    cells.append("–")
                    continue
                mean, std = _mean_std(values)
                text = f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"  # no spread from one seed
                cells.append(text + (f" (n={len(values)})" if len(values) < seeds else ""))
            avg = f"{s['average'][m]:.2f}" if m in s["average"] else "–"
            rank = str(s["rank"][m]) if m in s["rank"] else "–"
            info = s["info"][m]
            updated = sorted(set(info["n_updated"]))
            updated_text = f"{updated[0]:,}" if len(updated) == 1 else f"{updated[0]:,}–{updated[-1]:,}"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} | {rank} | {updated_text} | "
                         f"{statistics.fmean(info['seconds']):.0f} | {statistics.fmean(info['peak_mb']):.0f} |")
        lines.append("")
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- {r['task']} / {r['method']} / seed {r['seed']} / p {r['p']:g}: {r['error']}" for r in failed]
        lines.append("")
    text = "\n".join(lines)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return text
