"""Fuzzing (hypothesis, derandomized): malformed configs, YAML files and flags through every subcommand, and damaged
or foreign artifacts through every command that reads them.

Every case must end in exactly one line ``bayestune: error: <field>: ...`` on stderr with exit code 2: no
traceback, no run or bench directory created, an existing run directory left as it was. Each generated input holds
at least one value that is invalid whatever else is given, so no case trains. Each suite counts its cases and
checks the count reached its floor.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from bayestune_pyro.artifacts import RECORD, TENSORS_HASH, sealed_copy
from bayestune_pyro.cli import main
from bayestune_pyro.finetune.delta import LEGACY_FORMAT, SparseDelta, merge
from bayestune_pyro.io import read_tensors, save_tensors
from bayestune_pyro.models.lifted import Layout
from bayestune_pyro.selection.masks import Mask

GLUE = Path(__file__).parent / "fixtures" / "glue"
TINY = ["--backbone", "tiny-bert", "--shots-per-class", "2", "--max-length", "16", "--steps", "6", "--warmup", "2",
        "--burnin", "2", "--thin", "2", "--stage2-steps", "2", "--n-tracked", "8", "--exclude", "*word_embeddings*"]
ONE_LINE = re.compile(r"bayestune: error: [a-z][a-z0-9_]*: \S.*")
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# values each invalid whatever else is given (checked by the configuration, argparse, or before any data is loaded)
INVALID = {
    "task": ["imagenet", "", "RTE"], "backbone": ["nope", "hf:", "timm: "],
    "device": ["gpu", "meta", "cuda:x", "cuda:99"],  # cuda:99: no machine has it (checked before any data loads)
    "p": ["0", "-0.1", "1.5", "nan", "abc", ""], "threshold": ["0", "-1", "abc", "nan"],
    "steps": ["0", "-5", "1.5", "x", ""], "warmup": ["-1", "x"], "burnin": ["-1"], "thin": ["0", "-2"],
    "batch_size": ["0", "-1", "1e100"], "eval_batch_size": ["0"], "max_length": ["0", "-16"], "shots_per_class": ["0"],
    "validation_fraction": ["0.6", "-0.1", "nan", "1"], "sigma": ["0", "-1", "inf"], "head_lr": ["0", "-1", "nan"],
    "stage2_lr": ["0", "inf", "-1e-3"], "stage2_head_lr": ["-1", "0", "nan"], "weight_decay": ["-1", "x", "nan"],
    "eval_every": ["0"], "train_size": ["0", "-3"], "image_size": ["0"], "data_seed": ["x"], "seed": ["1.5", "x"],
    "data_dir": ["/nonexistent/glue/RTE"], "method": ["nope"], "inference": ["nope"], "search_space": ["nope"],
    "gamma": ["-1", "inf"], "n_hat": ["0", "-1"], "lr": ["0", "abc"], "alpha": ["0", "nan"], "beta": ["-1"],
    "chains": ["0"], "n_tracked": ["-1"], "checkpoint_every": ["0"], "lambda_init": ["0"], "lr_lambda": ["nan"],
    "lambda_estimator": ["nope"], "preconditioner": ["nope"], "clip_norm": ["-1", "0"], "include": [""],
}
# pairs of options that cannot go together
CONFLICTS = [("method", "sift", "threshold", "0.01"), ("method", "bayestune-map", "inference", "vi"),
             ("method", "lora", "inference", "sgld"), ("inference", "vi", "gibbs", True),
             ("method", "random", "sift_batches", "2"), ("method", "sift", "gamma", "0.5"),
             ("method", "l1sp", "l1", "inf"), ("inference", "sghmc", "friction", "2")]
VALID = {"shots_per_class": "2", "max_length": "16", "batch_size": "4", "seed": "3", "stage2_steps": "2",
         "n_tracked": "8", "eval_every": "5", "weight_decay": "0.01", "head_lr": "0.002", "sigma": "1.0"}
BROKEN_YAML = [  # (file bytes, the fields it sets: a flag for one of them would replace the broken value)
    (b"p: [1, 2", set()), (b"a: b: c\n", set()), (b"- 1\n- 2\n", set()), (b"42\n", set()), (b"just text\n", set()),
    (b"1: 2\n", set()), (b"null: 3\n", set()), (b"\xff\xfe\x00p: 1\n", set()), (b"p: 0.01\n\tsteps: 3\n", set()),
    (b"method: [1, 2]\n", {"method"}), (b"engine: {name: 5}\n", {"inference"}),
    (b"method: {name: sift, sift_batches: [1]}\n", {"method", "sift_batches"}),
    (b"search_space: {name: subset, include: 5}\n", {"search_space", "include"}), (b"learning_rate: 0.1\n", set()),
    (b"method: {name: nope}\n", {"method"}), (b"steps: 1e400\n", {"steps"}),
    (b"p: " + b"[" * 300 + b"]" * 300 + b"\n", {"p"}), (b"? [a, b]\n: 1\n", set()), (b"p: &a [*a]\n", {"p"}),
    (b"p: !!python/object/apply:os.system [ls]\n", set()),
    (b"engine: {name: sghmc, friction: {a: 1}}\n", {"inference"}),
    (b"method: 5\n", {"method"}), (b"task: null\n", {"task"}), (b"\x00\x01\x02", set()),
]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _tokens(field: str, value) -> list[str]:
    return [_flag(field)] if value is True else [_flag(field), value]


@st.composite
def run_options(draw):
    """(flags, YAML text or None): one to three invalid settings (or a conflicting pair, or a broken YAML file) among
    valid ones; each invalid setting goes to a flag or to the YAML file, flat or nested under its part."""
    bad: dict[str, object] = {}
    broken = None
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value", "conflict", "yaml"]))
        if kind == "value":
            field = draw(st.sampled_from(sorted(INVALID)))
            bad.setdefault(field, draw(st.sampled_from(INVALID[field])))
        elif kind == "conflict":
            a, va, b, vb = draw(st.sampled_from(CONFLICTS))
            if a not in bad and b not in bad:
                bad.update({a: va, b: vb})
        else:
            broken = draw(st.sampled_from(BROKEN_YAML))
    used = set(bad) | (broken[1] if broken else set())
    fillers = {k: v for k, v in VALID.items() if k not in used and draw(st.booleans())}
    flags, in_yaml = [], {}
    for field, value in fillers.items():
        flags += _tokens(field, value)
    for field, value in bad.items():
        if broken is None and field not in ("include", "gibbs") and draw(st.booleans()):
            in_yaml[field] = value
        else:
            flags += _tokens(field, value)
    if broken is not None:
        return flags, broken[0]
    if not in_yaml:
        return flags, None
    nested = draw(st.booleans())
    text = ""
    for field, value in in_yaml.items():
        if nested and field in ("gamma", "preconditioner", "clip_norm", "friction"):
            text += f"engine: {{name: {in_yaml.get('inference', 'sgld')}, {field}: '{value}'}}\n"
        else:
            text += f"{field}: {value}\n" if value != "" else f"{field}: ''\n"
    return flags, text.encode()


def _snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _refused(capsys, argv: list[str]) -> str:
    """``main(argv)`` exits 2 with one line ``bayestune: error: <field>: ...`` and nothing else on stderr."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and ONE_LINE.fullmatch(err.rstrip("\n")), (argv, code, err[-2000:], out[-300:])
    return err.strip()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread) -> Path:
    """One finished tiny run (stage 1, mask, stage 2), never changed by a case."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    assert main(["run", "--out", str(out), *TINY, "--p", "0.01"]) == 0
    return out


def test_malformed_input_through_every_subcommand_is_one_line(run_dir, tmp_path, capsys):
    """≥ 200 generated cases across run, stage1, stage2, export, merge-chains, sweep, diagnose, bench and list."""
    counts: dict[str, set] = {}
    fields: set[str] = set()  # the fields the errors named
    pristine = _snapshot(run_dir)
    fresh = iter(range(10**6))
    capsys.readouterr()

    def new_path() -> Path:
        return tmp_path / f"case{next(fresh)}"

    def config_file(text: bytes | None) -> list[str]:
        if text is None:
            return []
        path = new_path().with_suffix(".yaml")
        path.write_bytes(text)
        return ["--config", str(path)]

    def refused(command: str, argv: list[str]) -> None:
        counts.setdefault(command, set()).add(tuple(argv))
        fields.add(_refused(capsys, argv).split(": ")[2])

    @settings(max_examples=70, **FUZZ)
    @given(st.sampled_from(["run", "stage1"]), run_options(), st.sampled_from(["fresh", "fresh", "not a run"]))
    def run_or_stage1(command, options, where):
        flags, text = options
        out = new_path()
        if where == "not a run":
            out.mkdir()
            (out / "notes.txt").write_text("mine")
        before = _snapshot(out) if out.exists() else None
        argv = [command, "--out", str(out), *config_file(text), *flags]
        refused(command, argv)
        assert (_snapshot(out) == before) if before is not None else not out.exists()

    @settings(max_examples=30, **FUZZ)
    @given(run_options())
    def stage2(options):
        flags, text = options
        argv = ["stage2", str(run_dir), *config_file(text), *flags]
        refused("stage2", argv)
        assert _snapshot(run_dir) == pristine

    export_bad = [["--p", "0"], ["--p", "-1"], ["--p", "1.5"], ["--p", "nan"], ["--p", "abc"], ["--p"],
                  ["--threshold", "0"], ["--threshold", "-2"], ["--threshold", "inf"], ["--threshold", "nan"],
                  ["--p", "0.1", "--threshold", "0.1"], ["--auto", "--p", "0.01"], ["--auto", "--threshold", "1e-3"],
                  ["--rank", "median"], ["--z", "0"], ["--z", "-1"], ["--z", "nan"], ["--z", "x"],
                  ["--format", "onnx"], ["--format", "peft", "--p", "0.01"], ["--frob"], ["extra"]]

    @settings(max_examples=30, **FUZZ)
    @given(st.lists(st.sampled_from(export_bad), min_size=1, max_size=3), st.booleans())
    def export(items, lcb):
        argv = ["export", str(run_dir), *(["--rank", "lcb"] if lcb else []), *[t for item in items for t in item]]
        refused("export", argv)
        assert _snapshot(run_dir) == pristine

    @settings(max_examples=15, **FUZZ)
    @given(st.lists(st.sampled_from(["run", "missing", "file", "empty"]), min_size=1, max_size=3),
           st.sampled_from(["fresh", "existing", "none"]))
    def merge_chains(runs, out):
        if runs.count("run") >= 2 and out == "fresh" and len(runs) == runs.count("run"):
            runs = [*runs[:-1], "missing"]  # two real runs into a new directory would merge
        paths = []
        for kind in runs:
            path = run_dir if kind == "run" else new_path()
            if kind == "file":
                path.write_text("x")
            elif kind == "empty":
                path.mkdir()
            paths.append(str(path))
        target = new_path()
        argv = ["merge-chains", *paths, *({"fresh": ["--out", str(target)], "existing": ["--out", str(run_dir)],
                                           "none": []}[out])]
        refused("merge-chains", argv)
        assert not target.exists() and _snapshot(run_dir) == pristine

    @settings(max_examples=15, **FUZZ)
    @given(st.sampled_from(["run", "missing"]),
           st.sampled_from([None, "", ",", "0", "1.5", "a,b", "0.1,,x", "nan", "-1", "0.1;0.2", "inf", "0.01,0.02"]))
    def sweep(where, budgets):
        argv = ["sweep", str(run_dir if where == "run" else new_path()), *(["--p", budgets] if budgets else [])]
        refused("sweep", argv)
        assert _snapshot(run_dir) == pristine and not (run_dir / "sweep").exists()

    @settings(max_examples=12, **FUZZ)
    @given(st.sampled_from(["missing", "file", "empty", "config only", "run"]),
           st.sampled_from([[], ["--p", "0.1"], ["extra"], ["--html"]]))
    def diagnose(where, extra):
        if where == "run" and not extra:
            extra = ["--verbose"]
        path = run_dir if where == "run" else new_path()
        if where == "file":
            path.write_text("x")
        elif where in ("empty", "config only"):
            path.mkdir()
            if where == "config only":
                shutil.copy(run_dir / "config.yaml", path / "config.yaml")
        argv = ["diagnose", str(path), *extra]
        refused("diagnose", argv)
        assert _snapshot(run_dir) == pristine

    bench_bad = [["--tasks", ""], ["--tasks", "nope"], ["--tasks", "rte,nope"], ["--tasks", ","],
                 ["--methods", "nope"], ["--methods", ""], ["--methods", "random,,nope"], ["--p", "0"], ["--p", "abc"],
                 ["--p", "1.5"], ["--p", ""], ["--p", "nan"], ["--seeds", "0"], ["--seeds", "-1"], ["--seeds", "x"],
                 ["--data-root", "/nonexistent/glue"], ["--per-task", "rte"], ["--per-task", "rte.steps"],
                 ["--per-task", "nope.steps=3"], ["--per-task", "rte.nofield=3"], ["--per-task", "rte.steps=x"],
                 ["--per-task", "rte.steps=0"], ["--per-method", "random.sift_batches=2"],
                 ["--per-method", "nope.p=0.1"], ["--per-method", "random"],
                 ["--steps", "0"], ["--stage2-lr", "-1"], ["--device", "cuda:99"], ["--backbone", "nope"]]
    bench_fillers = {"--tasks": "rte", "--data-root": str(GLUE), "--methods": "random", "--seeds": "1",
                     "--backbone": "tiny-bert", "--stage2-steps": "2", "--max-length": "16"}

    @settings(max_examples=40, **FUZZ)
    @given(st.lists(st.sampled_from(bench_bad), min_size=1, max_size=3), st.data())
    def bench(items, data):
        used = {item[0] for item in items}
        fillers = [t for flag, value in bench_fillers.items()
                   if flag not in used and (flag in ("--tasks", "--data-root") or data.draw(st.booleans()))
                   for t in (flag, value)]
        out = new_path()
        argv = ["bench", "--out", str(out), *fillers, *[t for item in items for t in item]]
        refused("bench", argv)
        assert not out.exists()

    @settings(max_examples=10, **FUZZ)
    @given(st.sampled_from([[], ["nope"], ["list", "--foo"], ["list", "x"], ["list", "--p", "1"], ["--version"],
                            ["run", "--pretrained=3"], ["run", "--include"], ["stage2"], ["sweep"]]))
    def other(argv):
        refused("list and others", argv)

    for suite in (run_or_stage1, stage2, export, merge_chains, sweep, diagnose, bench, other):
        suite()
    sizes = {command: len(cases) for command, cases in counts.items()}
    print(f"\nmalformed-input cases: {sum(sizes.values())} {sizes}; fields named: {sorted(fields)}")
    assert set(sizes) >= {"run", "stage1", "stage2", "export", "merge-chains", "sweep", "diagnose", "bench",
                          "list and others"}
    assert sum(sizes.values()) >= 200 and min(sizes.values()) >= 5, sizes


def test_a_real_terminal_gets_one_line_and_no_traceback(run_dir, tmp_path):
    """The console script in a subprocess: a usage error, a config error and a damaged artifact."""
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    (damaged / "mask.safetensors").write_bytes((run_dir / "mask.safetensors").read_bytes()[:100])
    cases = [(["run", "--out", str(tmp_path / "a"), "--steps", "0"], "steps:"),
             (["bench", "--tasks", "rte", "--seeds", "x", "--out", str(tmp_path / "b")], "seeds:"),
             (["stage2", str(damaged)], "mask:")]
    for argv, field in cases:
        result = subprocess.run([sys.executable, "-m", "bayestune_pyro.cli", *argv], capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 2 and ONE_LINE.fullmatch(result.stderr.rstrip("\n")), result.stderr
        assert result.stderr.startswith(f"bayestune: error: {field}") and "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- damaged and foreign artifacts

SEALED = ("posterior.safetensors", "mask.safetensors", "delta.safetensors")  # the *.json beside are copies
READERS = {"posterior.safetensors": ("export", "merge-chains", "diagnose"),  # the commands that read each file
           "mask.safetensors": ("stage2", "diagnose"), "delta.safetensors": ("merge",)}


def _copy(run_dir: Path, to: Path) -> Path:
    """A copy of the run whose files are hard links: cheap, and safe, since every write replaces a file whole."""
    shutil.copytree(run_dir, to, copy_function=os.link)
    return to


def _replace(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)  # never write through a hard link into the pristine run
    path.write_bytes(data)


MERGES = {"merge": {}, "merge for 2 labels": {"num_labels": 2}, "merge for tiny-vit": {"backbone": "tiny-vit"}}


def _read(command: str, run: Path, pristine: Path, tmp: Path, capsys) -> tuple[int, str]:
    """Run the command that reads the damaged file: (exit code, stderr as the CLI prints it)."""
    if command in MERGES:  # the Python API; the CLI prints a ValueError as below
        try:
            merge(run / "delta.safetensors", **MERGES[command])
        except ValueError as err:
            return 2, f"bayestune: error: {err}\n"
        return 0, ""
    argv = {"export": ["export", str(run), "--p", "0.02"], "stage2": ["stage2", str(run)],
            "diagnose": ["diagnose", str(run)],
            "merge-chains": ["merge-chains", str(run), str(pristine), "--out", str(tmp / "merged")]}[command]
    code = main(argv)
    return code, capsys.readouterr().err


def _same_content(damaged: Path, original: Path) -> bool:
    """The damaged file still says what the original said (e.g. a flipped bit turned 1e-05 into 1E-05)."""
    if not damaged.exists():
        return False
    if damaged.suffix == ".json":
        try:
            return json.loads(damaged.read_bytes()) == json.loads(original.read_bytes())
        except ValueError:
            return False
    try:
        (meta_a, a), (meta_b, b) = read_tensors(damaged, "x"), read_tensors(original, "x")
    except ValueError:
        return False
    return meta_a == meta_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _resave(path: Path, change) -> None:
    """Rewrite a safetensors artifact through ``change(metadata, tensors)`` with a valid digest: damage that only
    the loaders' checks can see."""
    metadata, tensors = read_tensors(path, "x")
    metadata = dict(metadata)
    change(metadata, tensors)
    path.unlink()
    save_tensors(path, tensors, metadata)


def _rerecord(path: Path, change) -> None:
    """Rewrite the record in a paired artifact's header through ``change(record)``, with a valid digest."""
    def edit(metadata, tensors):
        record = json.loads(metadata[RECORD])
        change(record)
        metadata[RECORD] = json.dumps(record)
    _resave(path, edit)


def _swap_first_two(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[[0, 1]] = t[[1, 0]]
    return t


def _set(key, value):
    return lambda meta, tensors: tensors.__setitem__(key, value(tensors[key])) if callable(value) else \
        tensors.__setitem__(key, value)


STRUCTURAL = {  # name: (file, change), each read by the commands of READERS
    "mask index unsorted": ("mask.safetensors", _set("index", _swap_first_two)),
    "mask index duplicated": ("mask.safetensors", _set("index", lambda t: torch.cat([t[:1], t[:-1]]))),
    "mask index out of range": ("mask.safetensors", _set("index", lambda t: t + 10**9)),
    "mask index negative": ("mask.safetensors", _set("index", lambda t: t - int(t[-1]) - 1)),
    "mask index float": ("mask.safetensors", _set("index", lambda t: t.float())),
    "mask index 2-d": ("mask.safetensors", _set("index", lambda t: t.reshape(1, -1))),
    "mask index one short": ("mask.safetensors", _set("index", lambda t: t[:-1])),
    "mask without index": ("mask.safetensors", lambda meta, tensors: tensors.pop("index")),
    "mask with a stray tensor": ("mask.safetensors", _set("extra", torch.zeros(2))),
    "posterior moments of another d": ("posterior.safetensors", _set("lambda_mean", lambda t: t[:, :-1])),
    "posterior moments as integers": ("posterior.safetensors", _set("lambda_m2", lambda t: t.long())),
    "posterior without a trace": ("posterior.safetensors", lambda meta, tensors: tensors.pop("trace.loss")),
    "posterior trace of another chain count": ("posterior.safetensors", _set("trace.lambda", lambda t: t[:0])),
    "posterior tracked index unsorted": ("posterior.safetensors", _set("tracked_index", _swap_first_two)),
    "posterior tracked index beyond d": ("posterior.safetensors", _set("tracked_index", lambda t: t * 10**6)),
    "delta index unsorted": ("delta.safetensors", lambda meta, tensors: _first(tensors, ".index", _swap_first_two)),
    "delta index out of range": ("delta.safetensors", lambda meta, tensors: _first(tensors, ".index",
                                                                                  lambda t: t + 10**6)),
    "delta values of another length": ("delta.safetensors", lambda meta, tensors: _first(tensors, ".delta",
                                                                                        lambda t: t[:-1])),
    "delta values in float64": ("delta.safetensors", lambda meta, tensors: _first(tensors, ".delta",
                                                                                 lambda t: t.double())),
    "delta without its values": ("delta.safetensors", lambda meta, tensors: _first(tensors, ".delta", None)),
    "delta of a tensor the backbone lacks": ("delta.safetensors", lambda meta, tensors: tensors.update(
        {"nope.weight.index": torch.tensor([0], dtype=torch.int32), "nope.weight.delta": torch.zeros(1)})),
    "delta head of another width": ("delta.safetensors",
                                    lambda meta, tensors: _first(tensors, "head.", lambda t: t[:2])),
    "delta without its head bias": ("delta.safetensors", lambda meta, tensors: tensors.pop("head.classifier.bias")),
    "delta for 3 labels": ("delta.safetensors", lambda meta, tensors: meta.update(num_labels="3")),
    "delta num_labels not a number": ("delta.safetensors", lambda meta, tensors: meta.update(num_labels="five")),
    "delta of another backbone": ("delta.safetensors", lambda meta, tensors: meta.update(backbone="tiny-vit")),
    "delta of an unknown backbone": ("delta.safetensors", lambda meta, tensors: meta.update(backbone="nope")),
    "delta of another d": ("delta.safetensors", lambda meta, tensors: meta.update(d="5")),
    "delta of another layout": ("delta.safetensors", lambda meta, tensors: meta.update(layout_sha256="0" * 64)),
    "delta of another format": ("delta.safetensors", lambda meta, tensors: meta.update(format="lora/1")),
    "delta with a broken search space": ("delta.safetensors", lambda meta, tensors: meta.update(search_space="{x")),
    "delta of an unknown search space": ("delta.safetensors",
                                         lambda meta, tensors: meta.update(search_space='{"name": "nope"}')),
}
RECORDS = {  # the record in a paired artifact's header
    "mask record of another d": ("mask.safetensors", lambda r: r.update(d=r["d"] + 1)),
    "mask record with another k": ("mask.safetensors", lambda r: r.update(k=r["k"] - 1)),
    "mask record of another backbone": ("mask.safetensors", lambda r: r.update(backbone="minilm-l6")),
    "mask record with a renamed tensor": ("mask.safetensors",
                                          lambda r: r["layout"][0].__setitem__(0, "other.weight")),
    "mask record with a layout row cut": ("mask.safetensors", lambda r: r["layout"][1].pop()),
    "mask record without counts": ("mask.safetensors", lambda r: r.pop("counts")),
    "mask record with p a string": ("mask.safetensors", lambda r: r.update(p="0.01")),
    "mask record of another layout hash": ("mask.safetensors", lambda r: r.update(layout_sha256="f" * 64)),
    "mask record of another format": ("mask.safetensors", lambda r: r.update(format="bayestune-mask/9")),
    "posterior record with two chains": ("posterior.safetensors", lambda r: r.update(chains=2)),
    "posterior record with counts negative": ("posterior.safetensors", lambda r: r.update(counts=[-1])),
    "posterior record of another backbone": ("posterior.safetensors", lambda r: r.update(backbone="tiny-vit")),
    "posterior record of an unknown estimator": ("posterior.safetensors", lambda r: r.update(estimator="median")),
    "posterior record with a shape of another size": ("posterior.safetensors",
                                                      lambda r: r["layout"][0][1].__setitem__(0, 7)),
    "posterior record without a layout": ("posterior.safetensors", lambda r: r.pop("layout")),
}


def _first(tensors: dict, suffix: str, change) -> None:
    """Change (or, with ``change=None``, drop) the largest tensor whose name ends with (starts with) ``suffix``."""
    keys = [k for k in sorted(tensors) if (k.endswith(suffix) if suffix.startswith(".") else k.startswith(suffix))]
    key = max(keys, key=lambda k: tensors[k].numel())
    if change is None:
        tensors.pop(key)
    else:
        tensors[key] = change(tensors[key])


def test_damaged_and_foreign_artifacts_are_one_line_errors(run_dir, tmp_path, capsys):
    """≥ 50 cases: bytes truncated, flipped, zeroed, appended or swapped in every sealed artifact (generated), and
    artifacts rewritten with a valid digest but wrong contents, or made for another backbone, d or label count."""
    cases, unchanged = [], 0
    fresh = iter(range(10**6))
    pristine = _snapshot(run_dir)
    capsys.readouterr()

    def check(name: str, target: str, command: str, run: Path, may_pass: bool = False) -> None:
        nonlocal unchanged
        cases.append((name, command))
        code, err = _read(command, run, run_dir, tmp_path / f"out{len(cases)}", capsys)
        if code == 0 and may_pass:  # the damage left the file saying the same thing
            unchanged += 1
            return
        assert code == 2 and ONE_LINE.fullmatch(err.rstrip("\n")), (name, command, code, err[-2000:])
        what = target.split(".")[0]
        assert err.startswith(f"bayestune: error: {what}: ") or (command == "merge-chains" and "runs:" in err), err

    @settings(max_examples=30, **FUZZ)
    @given(st.sampled_from(SEALED), st.sampled_from(["truncate", "flip", "flip", "zero", "append", "swap", "delete"]),
           st.floats(0, 1, exclude_max=True), st.integers(0, 7), st.data())
    def bytes_damage(target, damage, where, bit, data):
        run = _copy(run_dir, tmp_path / f"bytes{next(fresh)}")
        original = (run_dir / target).read_bytes()
        at = int(where * len(original))
        damaged = {"truncate": lambda: original[:at], "append": lambda: original + b"\x00garbage",
                   "flip": lambda: original[:at] + bytes([original[at] ^ (1 << bit)]) + original[at + 1:],
                   "zero": lambda: original[:at] + bytes(min(16, len(original) - at)) + original[at + 16:],
                   "swap": lambda: (run_dir / data.draw(st.sampled_from([f for f in SEALED if f != target]))
                                    ).read_bytes(),
                   "delete": lambda: None}[damage]()
        if damaged is None:
            (run / target).unlink()
        else:
            _replace(run / target, damaged)
        command = data.draw(st.sampled_from(READERS[target]))
        check(f"{damage} {target} at {at}", target, command, run, _same_content(run / target, run_dir / target))

    bytes_damage()
    for i, (name, (target, change)) in enumerate({**STRUCTURAL, **RECORDS}.items()):
        run = _copy(run_dir, tmp_path / f"structural{next(fresh)}")
        (_rerecord if name in RECORDS else _resave)(run / target, change)
        check(name, target, READERS[target][i % len(READERS[target])], run)
    # made for something else: another d, another backbone, another label count than the run's
    run = _copy(run_dir, tmp_path / "other-d")
    for name in ("mask.safetensors", "mask.json"):
        (run / name).unlink()
    Mask(torch.tensor([0, 5, 9]), Layout.of([("bert.pooler.dense.weight", (10, 10))]), backbone="tiny-bert").save(run)
    check("mask of another d", "mask.safetensors", "stage2", run)
    check("delta of 5 labels merged for 2", "delta.safetensors", "merge for 2 labels", run_dir)
    check("delta of tiny-bert merged for tiny-vit", "delta.safetensors", "merge for tiny-vit", run_dir)
    run = _copy(run_dir, tmp_path / "pickle")
    (run / "delta.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, run / "delta.safetensors")
    check("a pickle as the delta", "delta.safetensors", "merge", run)

    assert _snapshot(run_dir) == pristine
    print(f"\ndamaged-artifact cases: {len(cases)} ({len(cases) - unchanged} refused, {unchanged} where the damage "
          "left the file saying the same)")
    assert len(cases) - unchanged >= 50


def test_mismatches_name_the_file_and_the_field(run_dir, tmp_path, capsys):
    """The messages themselves, for a mask of another d, a posterior of another backbone, a delta of 3 labels."""
    run = _copy(run_dir, tmp_path / "run")
    d = Mask.load(run_dir).layout.d
    for name in ("mask.safetensors", "mask.json"):
        (run / name).unlink()
    Mask(torch.tensor([0, 5, 9]), Layout.of([("bert.pooler.dense.weight", (10, 10))]), backbone="tiny-bert").save(run)
    assert _refused(capsys, ["stage2", str(run)]) == (f"bayestune: error: mask: {run / 'mask.safetensors'} has "
                                                      f"d=100 but the backbone gives d={d}")
    _rerecord(run / "posterior.safetensors", lambda r: r.update(backbone="tiny-vit"))
    assert _refused(capsys, ["export", str(run), "--p", "0.01"]) == (
        f"bayestune: error: posterior: {run / 'posterior.safetensors'} has backbone='tiny-vit' but the run's "
        "config.yaml gives backbone='tiny-bert'")
    _resave(run / "delta.safetensors", lambda meta, tensors: meta.update(num_labels="3"))
    with pytest.raises(ValueError) as err:
        merge(run / "delta.safetensors")
    assert str(err.value) == (f"delta: {run / 'delta.safetensors'} has head.classifier.bias shape=(5,) but the "
                              "backbone gives head.classifier.bias shape=(3,)")


def test_the_record_in_the_header_rules_and_its_json_copy_marks_a_complete_write(run_dir, tmp_path, monkeypatch):
    """A paired artifact is one file: a stale or damaged ``mask.json`` beside a newer ``mask.safetensors`` changes
    nothing, a write cut after the tensors leaves the new file and no copy (so a run redoes the stage), and the copy
    is the header's record."""
    run = _copy(run_dir, tmp_path / "run")
    old = Mask.load(run)
    header, _ = read_tensors(run / "mask.safetensors", "x")
    assert json.loads(header[RECORD]).items() <= json.loads((run / "mask.json").read_text()).items()
    stale = (run / "mask.json").read_bytes()
    new = Mask(old.index[1:], old.layout, old.p, None, old.method, {}, old.backbone)

    def cut(*args):
        raise KeyboardInterrupt("killed between the two writes")
    monkeypatch.setattr("bayestune_pyro.artifacts.write_json", cut)
    with pytest.raises(KeyboardInterrupt):
        new.save(run)
    monkeypatch.undo()
    assert not (run / "mask.json").exists()  # the stage is not done: a run exports again
    assert torch.equal(Mask.load(run).index, new.index)
    (run / "mask.json").write_bytes(stale)  # a copy from another write, or edited by hand: not read
    assert torch.equal(Mask.load(run).index, new.index)
    _replace(run / "mask.json", b"{garbage")
    assert Mask.load(run).k == old.k - 1


def test_pairs_written_with_the_record_only_in_the_json_copy_still_load(run_dir, tmp_path, capsys):
    """The previous version kept the record in the sealed JSON copy only, matched to the tensors by their digest:
    such a pair loads, and a copy from another write than its tensors is refused."""
    run = _copy(run_dir, tmp_path / "previous")
    for name in ("mask", "posterior"):
        metadata, tensors = read_tensors(run / f"{name}.safetensors", "x")
        record = json.loads(metadata.pop(RECORD))
        (run / f"{name}.safetensors").unlink()
        _replace(run / f"{name}.json", json.dumps(sealed_copy(
            record, save_tensors(run / f"{name}.safetensors", tensors, metadata))).encode())
    assert torch.equal(Mask.load(run).index, Mask.load(run_dir).index)
    capsys.readouterr()
    assert main(["export", str(run), "--p", "0.01"]) == 0  # reads the previous posterior, writes the new pair
    assert RECORD in read_tensors(run / "mask.safetensors", "x")[0]
    metadata, tensors = read_tensors(run / "posterior.safetensors", "x")
    tensors["tracked_index"] = tensors["tracked_index"][1:]
    (run / "posterior.safetensors").unlink()
    save_tensors(run / "posterior.safetensors", tensors, metadata)  # another write's tensors beside the copy
    assert _refused(capsys, ["export", str(run), "--p", "0.01"]) == (
        f"bayestune: error: posterior: {run / 'posterior.json'} does not belong with posterior.safetensors (another "
        "write's file: the sha256 differs); write both again")


def test_artifacts_written_before_the_hash_still_load_when_every_other_field_agrees(run_dir, tmp_path, capsys):
    """Earlier versions wrote no format, seal, layout hash or backbone in mask.json and posterior.json, no digest
    in safetensors headers, and format /1 deltas without d and hash: they read as before, and a field that
    disagrees is still refused."""
    run = _copy(run_dir, tmp_path / "legacy")
    new_only = ("format", "sha256", "layout_sha256", "backbone", TENSORS_HASH)
    for sidecar, tensors in (("mask.json", "mask.safetensors"), ("posterior.json", "posterior.safetensors")):
        record = {k: v for k, v in json.loads((run / sidecar).read_text()).items() if k not in new_only}
        _replace(run / sidecar, json.dumps(record).encode())
        _, loaded = read_tensors(run / tensors, "x")
        (run / tensors).unlink()
        save_file(loaded, str(run / tensors))  # as earlier versions wrote it: no digest in the header
    metadata, loaded = read_tensors(run / "delta.safetensors", "x")
    legacy = {k: v for k, v in metadata.items() if k not in ("sha256", "d", "layout_sha256")}
    (run / "delta.safetensors").unlink()
    save_file(loaded, str(run / "delta.safetensors"), metadata={**legacy, "format": LEGACY_FORMAT})
    assert SparseDelta.load(run / "delta.safetensors").d is None
    merged, reference = merge(run / "delta.safetensors"), merge(run_dir / "delta.safetensors")
    for (name, a), (_, b) in zip(merged.model.named_parameters(), reference.model.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(Mask.load(run).index, Mask.load(run_dir).index)
    capsys.readouterr()
    assert main(["export", str(run), "--p", "0.01"]) == 0  # reads the legacy posterior, writes a sealed mask
    assert torch.equal(Mask.load(run).index, Mask.load(run_dir).index)
    record = json.loads((run / "posterior.json").read_text())
    _replace(run / "posterior.json", json.dumps({**record, "d": record["d"] + 1}).encode())
    assert _refused(capsys, ["export", str(run), "--p", "0.01"]).endswith(
        f"has d={record['d'] + 1} but its layout gives d={record['d']}")
    yaml.safe_load((run / "config.yaml").read_text())  # untouched
