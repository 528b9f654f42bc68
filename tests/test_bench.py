"""`bayestune bench`: the grid on GLUE fixtures, resuming without recomputation, protocol guard, Table 1 rendering."""
import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bayestune_pyro.bench.harness import cells, parse_list, read_records
from bayestune_pyro.bench.table import bootstrap_interval, render, summarise
from bayestune_pyro.cli import main

ROOT = Path(__file__).parent.parent
GLUE = ROOT / "tests" / "fixtures" / "glue"
TINY = ["--backbone", "tiny-bert", "--max-length", "24", "--batch-size", "4", "--steps", "6", "--warmup", "2",
        "--burnin", "2", "--thin", "2", "--stage2-steps", "3", "--eval-every", "2", "--n-tracked", "8",
        "--grad-batches", "1"]


def test_bench_runs_the_grid_resumes_and_guards_its_protocol(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--tasks", "rte,stsb", "--data-root", str(GLUE), "--methods", "bayestune,random,linear",
            "--seeds", "2", "--out", str(out), *TINY]
    assert main(args) == 0
    records = read_records(out / "cells.jsonl")
    assert len(records) == 2 * 2 * 3 and all(r["status"] == "ok" for r in records)
    assert {r["metric"] for r in records if r["task"] == "stsb"} == {"pearson_spearman"}
    for r in records:
        assert r["budget"] == int(0.005 * r["n_total"])
        assert r["n_updated"] == (0 if r["method"] == "linear" else r["budget"])
        assert r["seconds"] > 0 and r["peak_mb"] >= 0
    heavy = list(out.glob("cells/**/posterior.safetensors")) + list(out.glob("cells/**/delta.safetensors"))
    assert not heavy  # cell directories keep config, mask and metrics only
    table = (out / "results.md").read_text()
    assert "| method | rte (acc.) | stsb (Pearson/Spearman) | Avg | Rank |" in table
    for r in records:  # calibration on the classification task only
        assert ({"nll", "brier", "ece"} <= set(r["test"])) == (r["task"] == "rte")
    assert "| method | rte ECE | rte NLL |" in table.split("### Calibration")[1]
    assert json.loads(capsys.readouterr().out)["finished"] == 12

    before = (out / "cells.jsonl").read_text()
    assert main(args) == 0  # everything is done: nothing is recomputed
    assert (out / "cells.jsonl").read_text() == before
    wider = [a if a != "bayestune,random,linear" else "random,magnitude" for a in args]
    assert main(wider) == 0  # a new method joins the same bench: only its cells run
    added = read_records(out / "cells.jsonl")[len(records):]
    assert sorted((r["task"], r["method"], r["seed"]) for r in added) == sorted(
        (t, "magnitude", s) for t in ("rte", "stsb") for s in (0, 1))

    capsys.readouterr()
    assert main([*args, "--stage2-steps", "4"]) == 2
    assert "stage2_steps=3" in capsys.readouterr().err
    assert main([*args, "--lr-lambda", "0.02"]) == 2  # an option of bayestune's: its cells refuse it ...
    assert "bayestune cells with method.lr_lambda=0.01" in capsys.readouterr().err
    assert main([*wider, "--lr-lambda", "0.02"]) == 0  # ... and other methods' cells do not depend on it

    anatomy = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mask_anatomy.py"), str(out),
                              "--reference", "random"], capture_output=True, text=True, check=True).stdout
    header = [c.strip() for c in anatomy.splitlines()[0].strip("| ").split(" | ")]
    rows = [line.split(" | ") for line in anatomy.splitlines()[2:]]
    assert sorted((r[0].strip("| "), r[1]) for r in rows) == sorted(
        (t, m) for t in ("rte", "stsb") for m in ("bayestune", "random", "magnitude"))
    for row in rows:
        shares = [float(v) for v in row[2:-2]]
        overlap, no_data = float(row[-2]), float(row[-1].strip(" |"))
        assert sum(shares) == pytest.approx(1, abs=0.01) and 0 <= overlap <= 1
        embeddings = shares[header.index("embeddings") - 2]  # no-data coordinates: embedding rows of unused tokens
        assert no_data <= embeddings + 1e-3
        if row[1] == "random":
            assert overlap == 1 and no_data > 0.9 * embeddings > 0


@pytest.mark.parametrize("args,field", [
    (["--tasks", "cola,imagenet"], "tasks:"),
    (["--tasks", "rte", "--methods", "bayestune,adapter"], "methods:"),
    (["--tasks", "rte", "--p", "0.005,2"], "p:"),
    (["--tasks", "rte", "--seeds", "0"], "seeds:"),
    (["--tasks", "rte", "--data-root", "/nonexistent"], "data_root:"),
    (["--tasks", "rte", "--per-task", "rte.stage2_steps"], "per_task:"),
    (["--tasks", "rte", "--per-task", "cola.stage2_steps=10"], "per_task:"),
    (["--tasks", "rte", "--per-task", "rte.seed=1"], "per_task:"),
    (["--tasks", "rte", "--per-task", "rte.stage2_steps=many"], "stage2_steps:"),
])
def test_bad_bench_options_are_one_line_errors(tmp_path, capsys, args, field):
    assert main(["bench", "--out", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bayestune: error: " + field) and "\n" not in err


def test_per_task_options_reach_only_their_task_and_are_part_of_the_protocol(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--tasks", "rte,stsb", "--data-root", str(GLUE), "--methods", "random", "--seeds", "1",
            "--out", str(out), *TINY, "--per-task", "stsb.stage2_steps=5", "--per-task", "stsb.train-size=6"]
    assert main(args) == 0
    configs = {t: yaml.safe_load((out / "cells" / t / "random" / "p0.005-seed0" / "config.yaml").read_text())
               for t in ("rte", "stsb")}
    assert (configs["rte"]["stage2_steps"], configs["stsb"]["stage2_steps"]) == (3, 5)
    assert configs["stsb"]["train_size"] == 6 and configs["rte"]["train_size"] == 1000
    assert yaml.safe_load((out / "bench.yaml").read_text())["per_task"] == {"stsb": {"stage2_steps": 5,
                                                                                   "train_size": 6}}
    capsys.readouterr()
    assert main([a if a != "stsb.stage2_steps=5" else "stsb.stage2_steps=7" for a in args]) == 2
    assert "per_task=" in capsys.readouterr().err


def test_grid_is_seed_major_and_lists_expand_all():
    grid = cells(["a", "b"], ["m1", "m2"], [0.01], [0, 1])
    assert [(c.seed, c.task, c.method) for c in grid[:4]] == [(0, "a", "m1"), (0, "a", "m2"), (0, "b", "m1"),
                                                            (0, "b", "m2")]
    assert parse_list("methods", "all", ("x", "y")) == ["x", "y"]


def test_a_line_cut_by_a_crash_is_ignored(tmp_path):
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps({"task": "rte"}) + "\n" + '{"task": "st')
    assert read_records(path) == [{"task": "rte"}]


def test_results_table_has_mean_std_average_and_rank(tmp_path):
    def rec(method, task, seed, score):
        return {"task": task, "method": method, "seed": seed, "p": 0.005, "status": "ok", "score": score,
                "metric": {"rte": "accuracy", "cola": "mcc"}[task], "n_updated": 10, "seconds": 2.0, "peak_mb": 5.0}

    records = [rec("random", "rte", 0, 0.5), rec("random", "rte", 1, 0.7), rec("random", "cola", 0, 0.1),
               rec("random", "cola", 1, 0.1), rec("bayestune", "rte", 0, 0.6), rec("bayestune", "rte", 1, 0.6),
               rec("bayestune", "cola", 0, 0.3), rec("bayestune", "cola", 1, 0.2), rec("sift", "rte", 0, 0.9),
               {"task": "cola", "method": "sift", "seed": 0, "p": 0.005, "status": "failed",
                "error": "FloatingPointError: stage 2: loss became NaN/inf"}]
    text = render(records, tmp_path / "results.md", tasks_order=["rte", "cola"])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["random"].startswith("| random | 60.00 ± 14.14 | 10.00 ± 0.00 | 35.00 | 2 |")
    assert rows["bayestune"].startswith("| bayestune | 60.00 ± 0.00 | 25.00 ± 7.07 | 42.50 | 1 |")
    assert rows["sift"].startswith("| sift | 90.00 (n=1) | – | – | – |")  # no average without every task
    assert "cola / sift / seed 0 / p 0.005: FloatingPointError" in text


def test_calibration_table_shows_cells_recorded_without_calibration_as_missing(tmp_path):
    def rec(method, task, seed, score, ece=None, nll=None):
        record = {"task": task, "method": method, "seed": seed, "p": 0.005, "status": "ok", "score": score,
                  "metric": {"rte": "accuracy", "stsb": "pearson_spearman"}[task], "n_updated": 10, "seconds": 2.0,
                  "peak_mb": 5.0, "test": {"accuracy": score}}
        if ece is not None:  # a cell recorded before calibration was measured has no such keys
            record["test"].update(ece=ece, nll=nll, brier=0.5)
        return record

    old = [rec("random", "rte", s, 0.6) for s in range(3)] + [rec("random", "stsb", s, 0.8) for s in range(3)]
    text = render(old, tmp_path / "old.md", tasks_order=["rte", "stsb"])
    assert "Calibration" not in text and "| random | 60.00 ± 0.00 | 80.00 ± 0.00 |" in text  # old benches: as before
    new = [rec("bayestune", "rte", 0, 0.7, 0.10, 0.60), rec("bayestune", "rte", 1, 0.7, 0.20, 0.70),
           rec("bayestune", "rte", 2, 0.7, 0.30, 0.80)]
    new += [rec("bayestune", "stsb", s, 0.8) for s in range(3)]
    mixed = [*old, *new, rec("sift", "rte", 0, 0.5, 0.05, 0.4), rec("sift", "rte", 1, 0.5), rec("sift", "rte", 2, 0.5)]
    section = render(mixed, tmp_path / "mixed.md", tasks_order=["rte", "stsb"]).split("### Calibration")[1]
    rows = _rows(section)
    assert rows["method"] == "| method | rte ECE | rte NLL |"  # the regression task has no calibration columns
    assert rows["bayestune"] == "| bayestune | 0.200 ± 0.100 | 0.700 ± 0.100 |"
    assert rows["random"] == "| random | – | – |"  # missing, not 0
    assert rows["sift"] == "| sift | 0.050 (n=1) | 0.400 (n=1) |"


@pytest.mark.parametrize("suite,tasks", [
    ("glue", "cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte,wnli"),
    ("superglue", "boolq,cb,superglue-rte,wic"),
])
def test_bench_reads_every_glue_and_superglue_task_in_its_distribution_layout(tmp_path, suite, tasks):
    out = tmp_path / suite
    args = ["bench", "--tasks", tasks, "--data-root", str(GLUE.parent / suite), "--methods", "linear",
            "--seeds", "1", "--out", str(out), *TINY]
    assert main(args) == 0
    records = read_records(out / "cells.jsonl")
    assert [r["task"] for r in records] == tasks.split(",") and all(r["status"] == "ok" for r in records)
    expected = {"cola": "mcc", "stsb": "pearson_spearman", "mrpc": "f1", "qqp": "f1"}
    assert all(r["metric"] == expected.get(r["task"], "accuracy") for r in records)


def _record(method, task, seed, score):
    return {"task": task, "method": method, "seed": seed, "p": 0.005, "status": "ok", "score": score,
            "metric": {"rte": "accuracy", "cola": "mcc"}[task], "n_updated": 10, "seconds": 2.0, "peak_mb": 5.0}


def _rows(text):
    return {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}


def test_paired_differences_to_the_reference_pair_by_seed_with_bootstrap_intervals(tmp_path):
    reference = {("rte", 0): 0.60, ("rte", 1): 0.62, ("rte", 2): 0.58, ("cola", 0): 0.30, ("cola", 1): 0.25,
                 ("cola", 2): 0.35}
    offsets = {"random": {0: 2, 1: 2, 2: 2}, "magnitude": {0: -1, 1: 0, 2: 4}}
    records = [_record("bayestune", t, s, v) for (t, s), v in reference.items()]
    records += [_record(m, t, s, v + offsets[m][s] / 100) for m in offsets for (t, s), v in reference.items()]
    # sift: rte on every seed, cola on seeds 0-1 only; Avg pairs seeds 0-1 (per seed (-2 + 0)/2 and (-4 + 2)/2)
    records += [_record("sift", "rte", s, reference[("rte", s)] + d / 100) for s, d in ((0, -2), (1, -4), (2, 30))]
    records += [_record("sift", "cola", s, reference[("cola", s)] + d / 100) for s, d in ((0, 0), (1, 2))]
    records += [_record("linear", "rte", 0, 0.55), _record("lora", "rte", 7, 0.9)]  # lora: no seed in common
    text = render(records, tmp_path / "results.md", tasks_order=["rte", "cola"])
    assert render(records, tmp_path / "again.md", tasks_order=["rte", "cola"]) == text  # deterministic
    section = text.split("### Paired differences to bayestune")[1]
    assert "| comparison | rte (acc.) | cola (MCC) | Avg |" in section and "positive = better than bayestune" in section
    rows = _rows(section)
    exact = "**+2.00 [+2.00, +2.00]**"  # +2 on every seed: no spread, and 0 excluded
    assert rows["random − bayestune"] == "| random − bayestune | " + " | ".join([exact] * 3) + " |"
    assert rows["sift − bayestune"] == ("| sift − bayestune | +8.00 [-4.00, +30.00] | +1.00 [+0.00, +2.00] (n=2) | "
                                        "**-1.00 [-1.00, -1.00]** (n=2) |")
    assert rows["linear − bayestune"] == "| linear − bayestune | -5.00 [–] (n=1) | – | – |"
    assert "lora − bayestune" not in rows and "| lora | 90.00 (n=1) |" in text  # skipped here, kept above
    assert "bayestune − bayestune" not in rows

    # magnitude: differences -1, 0, +4 on every task. Of the 27 equally likely resamples, the all-min and all-max
    # ones each carry 1/27 > 2.5%, so ~370 of 10,000 draws sit on each end and the percentiles land exactly on them.
    diffs = [-1, 0, 4]
    means = [statistics.fmean(c) for c in itertools.product(diffs, repeat=3)]
    assert means.count(min(means)) / len(means) > 0.025 and means.count(max(means)) / len(means) > 0.025
    entry = f"+1.00 [{min(means):+.2f}, {max(means):+.2f}]"
    assert rows["magnitude − bayestune"] == "| magnitude − bayestune | " + " | ".join([entry] * 3) + " |"
    low, high = bootstrap_interval(np.array(diffs, dtype=float))
    assert min(diffs) <= low <= statistics.fmean(diffs) <= high <= max(diffs)

    by_seed = summarise(records, ["rte", "cola"])[0.005]["paired"]
    assert set(by_seed) == {"random", "magnitude", "sift", "linear"}
    assert by_seed["sift"]["Avg"] == pytest.approx([-1, -1])
    assert "Paired differences to random" in render(records, tmp_path / "r.md", reference="random")
    assert "Paired differences" not in render(records, tmp_path / "b.md", reference="bitfit")  # absent reference


def test_bootstrap_interval_is_about_mean_plus_minus_1_96_standard_errors_with_many_seeds():
    diffs = np.random.default_rng(1).normal(3.0, 2.0, size=40)
    low, high = bootstrap_interval(diffs)
    se = diffs.std() / math.sqrt(len(diffs))  # the bootstrap's standard error of the mean (plug-in std)
    assert low == pytest.approx(diffs.mean() - 1.96 * se, abs=0.15 * se)
    assert high == pytest.approx(diffs.mean() + 1.96 * se, abs=0.15 * se)
    assert bootstrap_interval(diffs) == (low, high)


def test_a_nan_score_is_a_failed_cell_not_averaged_in(tmp_path):
    records = [_record("bayestune", "rte", s, 0.6) for s in range(3)]
    records += [_record("random", "rte", 0, 0.5), _record("random", "rte", 1, 0.7),
                _record("random", "rte", 2, float("nan"))]
    summary = summarise(records)[0.005]
    assert summary["scores"][("random", "rte")] == pytest.approx({0: 50, 1: 70})
    assert list(summary["paired"]["random"]["rte"]) == pytest.approx([-10, 10])
    text = render(records, tmp_path / "results.md")
    rows = _rows(text)
    assert rows["random"].startswith("| random | 60.00 ± 14.14 (n=2) | 60.00 | 2 |")  # a tie ranks by order
    entry = "+0.00 [-10.00, +10.00]"  # two paired seeds, the most of any entry here: no (n=…)
    assert rows["random − bayestune"] == f"| random − bayestune | {entry} | {entry} |"
    assert "- rte / random / seed 2 / p 0.005: non-finite score nan" in text.split("## Failed cells")[1]
    assert "nan" not in text.split("## Failed cells")[0].lower()


def test_a_per_method_grid_is_chosen_on_validation_and_recorded(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--tasks", "bbc-news", "--methods", "bayestune,random", "--seeds", "1", "--out", str(out),
            "--shots-per-class", "4", "--validation-fraction", "0.3", "--per-method", "bayestune.n_hat=1e6,1e9", *TINY]
    assert main(args) == 0
    records = {r["method"]: r for r in read_records(out / "cells.jsonl")}
    grid = records["bayestune"]["grid"]
    assert [p["n_hat"] for p in grid] == [1e6, 1e9]
    best = max(grid, key=lambda p: p["validation_score"])
    assert records["bayestune"]["chosen"]["n_hat"] == best["n_hat"]
    assert records["bayestune"]["validation_score"] == best["validation_score"]
    assert "grid" not in records["random"]
    methods = yaml.safe_load((out / "bench.yaml").read_text())["methods"]
    assert methods["bayestune"]["method"]["n_hat"] == [1e6, 1e9] and methods["random"] == {"method": {"name": "random"}}
    assert not list(out.glob("cells/**/posterior.safetensors"))  # heavy files of every grid point are gone
    capsys.readouterr()
    assert main([*args[:-len(TINY)], "--per-method", "bayestune.n_hat=1e7", *TINY]) == 2
    assert "bayestune cells with method.n_hat=[1000000.0, 1000000000.0]" in capsys.readouterr().err


def test_predictive_table_sets_point_temperature_and_ensembles_side_by_side(tmp_path):
    """Cells with temperature scaling and ensembles get a row per predictive; cells without them (and regression
    tasks) add no rows."""
    def rec(seed, ensembles=True):
        record = {**_record("random", "rte", seed, 0.60 + seed / 100),
                  "test": {"accuracy": 0.60 + seed / 100, "ece": 0.20, "nll": 0.70, "brier": 0.5},
                  "temperature": {"T": 1.5, "ece": 0.05 + seed / 100, "nll": 0.65, "brier": 0.45}}
        if ensembles:
            record["ensembles"] = {"sgld": {"size": 4, "test": {"accuracy": 0.62, "ece": 0.10, "nll": 0.66}},
                                   "deep": {"size": 4, "test": {"accuracy": 0.64, "ece": 0.08, "nll": 0.60}}}
        return record

    records = [rec(0), rec(1), rec(2, ensembles=False), _record("bitfit", "rte", 0, 0.5)]
    section = render(records, tmp_path / "r.md").split("### Predictive uncertainty")[1]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0] == "| method | predictive | rte acc. | rte ECE | rte NLL |"
    assert lines[1:] == ["| random | point | 61.00 ± 1.00 | 0.200 ± 0.000 | 0.700 ± 0.000 |",
                         "| random | temperature-scaled | 61.00 ± 1.00 | 0.060 ± 0.010 | 0.650 ± 0.000 |",
                         "| random | sgld ensemble | 62.00 ± 0.00 (n=2) | 0.100 ± 0.000 (n=2) | 0.660 ± 0.000 (n=2) |",
                         "| random | deep ensemble | 64.00 ± 0.00 (n=2) | 0.080 ± 0.000 (n=2) | 0.600 ± 0.000 (n=2) |"]
    assert "Predictive uncertainty" not in render([_record("bitfit", "rte", 0, 0.5)], tmp_path / "b.md")
