"""`bayestune`: the command line.

    bayestune run    [--config FILE] [--out DIR] [options]   stage 1 → mask → stage 2 → metrics, one run directory
    bayestune stage1 [--config FILE] [--out DIR] [options]   stage 1 only (writes the posterior)
    bayestune export RUN [--p P | --threshold T | --auto] [--rank mean|lcb] [--z Z]   mask from the posterior of RUN
    bayestune export RUN --format peft|hf [--out DIR]        RUN's fine-tuned model as a PEFT adapter / HF checkpoint
    bayestune stage2 RUN [options]                          stage 2 + evaluation from RUN's mask
    bayestune merge-chains RUN_A RUN_B ... --out RUN         pool separately run chains
    bayestune diagnose RUN                                  convergence checks: RUN/trace.nc and RUN/report.html
    bayestune sweep RUN --p P1,P2,...                       stage 2 at each budget p; p chosen on validation
    bayestune list                                          the registered methods, engines and search spaces
    bayestune bench --tasks T,... [--data-root DIR] [--methods all] [--p 0.005] [--seeds 3] [--out DIR]
                    [--per-task TASK.FIELD=VALUE ...] [--per-method METHOD.FIELD=VALUE ...]
                                                            methods × tasks × seeds × budgets → results.md

Options come from :class:`RunConfig` and the registered parts' options (a flag of another method or engine is an
error naming its owner); precedence is flags > ``--config`` file > RUN/config.yaml > defaults.
Errors are one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

from .config import RunConfig, layered, option_fields
from .registry import ENGINES, METHODS, SEARCH_SPACES

EXIT_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line ValueErrors naming the option, printed by :func:`main` like every
    other error (argparse's own is a usage block and ``<prog>: error: ...``); its subcommands' parsers are too.
    An abbreviated flag is an error, not a guess (``--stage2`` is not ``--stage2-steps``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str):
        raise ValueError(_usage_error(self.prog, message))


def _usage_error(prog: str, message: str) -> str:
    """argparse's ``message`` as ``<field>: <problem> (see `<prog> --help`)``."""
    field, problem = "arguments", message
    if m := re.match(r"argument ([^:]+): (.*)", message, re.S):
        field, problem = m.group(1).split("/")[0], m.group(2)
    elif m := re.match(r"the following arguments are required: ([^,]+)", message):
        field, problem = m.group(1), "required"
    elif m := re.match(r"(unrecognized arguments|ambiguous option): (-\S+)", message):
        field = m.group(2).split("=")[0]
    field = field.lstrip("-").replace("-", "_").lower()
    if not re.fullmatch(r"[a-z0-9_]+", field):
        field, problem = "arguments", message
    return f"{field}: {problem} (see `{prog} --help`)"


def _add_config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                        defaults: dict | None = None) -> None:
    """Flags generated from the configuration's fields and the registered methods' and engines' options."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (flat or nested, keys with - or _)")
    groups = {}
    for name, (owner, f, hint) in option_fields().items():
        if name in skip:
            continue
        if owner not in groups:
            title = "run configuration" if owner == "run" else f"options of {owner} (and of parts with the same name)"
            groups[owner] = parser.add_argument_group(title)
        group = groups[owner]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = (defaults or {}).get(f.name, default)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [{default}]"
        if hint is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
            continue
        choices = f.metadata.get("choices")
        if f.name == "method":
            choices = METHODS.names()
        elif f.name == "inference":
            choices = ENGINES.names()
        group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text,
                           nargs=f.metadata.get("nargs"), choices=choices,
                           metavar=f.name.upper() if choices is None else None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bayestune",
        description="BayesTune: Bayesian sparse fine-tuning. Stage 1 samples the Gamma-Laplace posterior of the "
                    "backbone with SGLD; the largest posterior-mean scales λ̂ pick the coordinates that stage 2 "
                    "fine-tunes; the result is a small sparse delta.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("run", "stage 1 → mask → stage 2 → metrics into one run directory"),
                       ("stage1", "stage 1 only: sample (θ, λ) and write the posterior")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--out", metavar="DIR", help="run directory [runs/<task>]")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        _add_config_options(p)
    p = sub.add_parser("export", help="mask from a run's posterior (top-p or threshold on λ̂), or the fine-tuned "
                       "model for PEFT / transformers",
                       description="Write RUN/mask.safetensors from RUN/posterior.safetensors; with --format peft "
                                   "or hf, RUN's fine-tuned model (delta.safetensors) as a PEFT adapter or a "
                                   "transformers checkpoint instead.")
    p.add_argument("run_dir", metavar="RUN", help="run directory holding posterior.safetensors")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--p", type=float, help="fraction of coordinates to keep (top-p by λ̂) [RUN's p]")
    choice.add_argument("--threshold", type=float, help="keep every coordinate with λ̂ > threshold")
    p.add_argument("--auto", action="store_true", help="choose p at the knee of the sorted λ̂ curve (log-log)")
    p.add_argument("--rank", choices=("mean", "lcb"), default="mean",
                   help="rank by λ̂ or by its lower credible bound λ̂ − z·sd (prefers low variance)")
    p.add_argument("--z", type=float, help="z of the lower credible bound (--rank lcb) [1.645]")
    p.add_argument("--format", choices=("mask", "peft", "hf"), default="mask",
                   help="mask: re-cut RUN's mask from its posterior (the options above); peft: RUN's fine-tuned "
                        "delta as a PEFT adapter directory; hf: the merged fine-tuned model as a transformers "
                        "checkpoint")
    p.add_argument("--out", metavar="DIR", help="--format peft or hf: the directory to write [RUN/<format>]")
    p = sub.add_parser("stage2", help="fine-tune the masked coordinates of a run and evaluate",
                       description="Stage 2 from RUN/mask.safetensors; writes delta.safetensors and metrics.json.")
    p.add_argument("run_dir", metavar="RUN", help="run directory holding mask.safetensors and config.yaml")
    _add_config_options(p)
    p = sub.add_parser("merge-chains", help="pool stage-1 chains run separately (e.g. one per GPU) into one run",
                       description="Pool the posteriors of RUN_A RUN_B ... (same backbone, search space, n_tracked) "
                                   "into OUT, which then takes export and stage2 like any run.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN", help="run directories holding posterior.safetensors")
    p.add_argument("--out", metavar="DIR", required=True, help="new run directory for the pooled chains")
    text = "stage 2 at every budget p, each mask cut from RUN's posterior; p is chosen on the validation split"
    p = sub.add_parser("sweep", help=text, description=text + ". Writes RUN/sweep/p=<p>/ and RUN/sweep.json; "
                       "`bayestune diagnose RUN` then draws the curve.")
    p.add_argument("run_dir", metavar="RUN", help="run directory holding posterior.safetensors and config.yaml")
    p.add_argument("--p", required=True, help="comma-separated budgets, e.g. 0.001,0.005,0.01,0.05")
    text = "the registered methods, engines and search spaces, with a one-line summary and their options"
    sub.add_parser("list", help=text, description=text + " (each is one module; see README, 'Adding a method')")
    p = sub.add_parser("diagnose", help="convergence diagnostics and an HTML report of a run's posterior",
                       description="Write RUN/trace.nc (ArviZ InferenceData) and RUN/report.html (verdict, R-hat, "
                                   "ESS, traces, λ̂ curve, mask summary, stage-2 metrics).")
    p.add_argument("run_dir", metavar="RUN", help="run directory holding posterior.safetensors")
    from .bench.harness import BENCH_DEFAULTS, GRID

    text = ("run every method on every task, seed and budget through the same pipeline; resumable; "
            "writes OUT/cells.jsonl and OUT/results.md (Table 1's shape)")
    p = sub.add_parser("bench", help=text, description=text + ". Seed s sets both --seed and --data-seed; the "
                       "run options below default to the bench protocol (train-size cap, 10%% validation split, "
                       "step budgets) and apply to every cell.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. cola,sst2,rte,stsb")
    p.add_argument("--data-root", metavar="DIR",
                   help="folder holding the tasks' distribution folders (e.g. glue/ with CoLA/, SST-2/, ...)")
    p.add_argument("--methods", default="all", help="comma-separated methods, or all: " + ", ".join(METHODS.names()))
    p.add_argument("--p", default="0.005", help="comma-separated budgets: fractions of covered coordinates")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    p.add_argument("--out", metavar="DIR", default="runs/bench", help="bench directory (resumed if it exists)")
    p.add_argument("--per-task", metavar="TASK.FIELD=VALUE", action="append", default=[],
                   help="a run option for one task's cells (repeatable), e.g. rte.stage2_steps=300 or "
                        "cola.train_size=4000")
    p.add_argument("--per-method", metavar="METHOD.FIELD=VALUE", action="append", default=[],
                   help="a run option for one method's cells (repeatable), e.g. bayestune.gamma=1e-4,1e-2,1 (a "
                        "grid chosen on validation)")
    _add_config_options(p, skip=GRID, defaults=BENCH_DEFAULTS)
    return parser


def resolve_config(args: argparse.Namespace, base: dict | None = None) -> RunConfig:
    """flags > --config file > ``base`` (a run's config.yaml, or the bench defaults) > defaults."""
    values = layered(base or {}, getattr(args, "config", None), vars(args))
    return RunConfig.from_dict(values, source="option")


def _existing_config(run_dir: Path) -> dict:
    """A run's config.yaml as this version writes it (files of earlier versions included)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ValueError(f"run: {str(run_dir)!r} has no config.yaml (not a run directory)")
    return RunConfig.from_yaml(path, strict=False).to_dict()


def _prepare_out(config: RunConfig, out: Path, overwrite: bool) -> Path | None:
    """Refuse to mix two configurations in one directory; the same configuration resumes. With ``overwrite`` an
    existing directory is moved aside, to ``.<name>.replaced``, and returned: the command deletes it once the new
    run has produced something, and puts it back if the new run fails before that."""
    replaced = None
    if overwrite and out.exists():
        replaced = out.with_name(f".{out.name}.replaced")
        shutil.rmtree(replaced, ignore_errors=True)  # left by a process killed mid-run
        out.rename(replaced)
    if (out / "config.yaml").is_file():
        old = _existing_config(out)
        changed = [k for k, v in config.to_dict().items() if old.get(k) != v]
        if changed:
            k = changed[0]
            raise ValueError(f"out: {str(out)!r} holds a run with {k}={old.get(k)!r} (now {config.to_dict()[k]!r}); "
                             "pass --overwrite or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {str(out)!r} exists and is not a run directory; choose another --out")
    return replaced


def _stage1_data_parallel(args: argparse.Namespace, pipeline) -> dict | None:
    """``bayestune stage1`` under ``torchrun``: rank 0 prepares RUN, every rank runs the chain on its share of each
    minibatch (``inference.distributed``), rank 0 writes; the other ranks print nothing."""
    from .inference import distributed

    if args.overwrite:
        raise ValueError("overwrite: not under torchrun; remove the old run first, or choose another --out")
    config = resolve_config(args)
    out = Path(args.out or f"runs/{config.task}")
    distributed.init_from_env(config.device)
    if distributed.is_writer():
        _prepare_out(config, out, overwrite=False)
        pipeline.write_config(config, out)
    distributed.barrier()
    pipeline.stage1(config, out)
    return {"posterior": str(out / "posterior.safetensors"), "ranks": distributed.size()} \
        if distributed.is_writer() else None


def _command(args: argparse.Namespace) -> dict | None:
    from . import pipeline  # heavy imports only once the arguments are known to be sane

    if args.command == "stage1" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _stage1_data_parallel(args, pipeline)
    if args.command in ("run", "stage1"):
        config = resolve_config(args)
        out = Path(args.out or f"runs/{config.task}")
        replaced = _prepare_out(config, out, args.overwrite)
        created = not out.exists()
        try:
            if args.command == "run":
                return pipeline.run(config, out)
            pipeline.write_config(config, out)
            pipeline.stage1(config, out)
            return {"posterior": str(out / "posterior.safetensors")}
        except BaseException:
            if created and out.exists() and {p.name for p in out.iterdir()} <= {"config.yaml"}:
                shutil.rmtree(out)  # nothing was produced: leave no half-made run behind
            if replaced is not None and not out.exists():
                replaced.rename(out)  # ... and give back the run it was to replace
                replaced = None
            raise
        finally:
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
    if args.command == "merge-chains":
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"out: {str(out)!r} already exists and is not empty; choose another --out")
        merged = pipeline.merge_chains(args.run_dirs, out)
        return {"posterior": str(out / "posterior.safetensors"), "chains": merged.chains, "draws": merged.counts}
    if args.command == "bench":
        return _bench(args)
    if args.command == "list":
        return parts()
    run_dir = Path(args.run_dir)
    base = _existing_config(run_dir)
    if args.command == "export" and args.format != "mask":
        if args.p is not None or args.threshold is not None or args.auto or args.rank != "mean" or args.z is not None:
            raise ValueError(f"format: --format {args.format} exports RUN's fine-tuned delta; --p, --threshold, "
                             "--auto, --rank and --z re-cut the mask (--format mask), then run stage2 and export")
        from .finetune.export import export_model

        return export_model(run_dir, args.format, args.out)
    if args.command == "export":
        if args.out is not None:
            raise ValueError("out: --out is for --format peft or hf; --format mask writes RUN/mask.safetensors")
        p, threshold = args.p, args.threshold
        if p is None and threshold is None and not args.auto:
            p, threshold = base.get("p"), base.get("threshold")
        mask = pipeline.export(run_dir, p=p, threshold=threshold, auto=args.auto, rank=args.rank, z=args.z)
        lambda_th = mask.threshold if mask.threshold is not None else mask.info["lambda_cut"]
        return {"mask": str(run_dir / "mask.safetensors"), "k": mask.k, "d": mask.layout.d, "p": mask.p,
                "threshold": mask.threshold, "lambda_cut": mask.info.get("lambda_cut"), "lambda_th": lambda_th,
                "selection": mask.info["selection"], "rank": mask.info["rank"]}
    if args.command == "sweep":
        try:
            budgets = [float(v) for v in args.p.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"p: expected comma-separated fractions, got {args.p!r}") from None
        if not budgets or not all(0 < v <= 1 for v in budgets):
            raise ValueError(f"p: must be fractions in (0, 1], got {args.p!r}")
        return pipeline.sweep(run_dir, budgets)
    if args.command == "diagnose":
        from .diagnostics.report import diagnose

        return diagnose(run_dir)
    return pipeline.stage2(resolve_config(args, base), run_dir)  # writes config.yaml once the run's files fit it


def parts() -> dict:
    """Every registered part: name → summary, options (an engine's kind, a search space's defaults)."""
    listing = {}
    for kind, registry in (("methods", METHODS), ("engines", ENGINES), ("search_spaces", SEARCH_SPACES)):
        listing[kind] = {}
        for name in registry.names():
            part = registry.get(name)
            options = [f.name for f in dataclasses.fields(part.options)] if part.options is not None else []
            listing[kind][name] = {"summary": part.summary, "options": options,
                                   **({"kind": part.kind} if kind == "engines" else {}),
                                   **({"defaults": part.defaults(part.options())} if kind == "search_spaces" else {})}
    return listing


def _bench(args: argparse.Namespace) -> dict:
    from .bench.harness import BENCH_DEFAULTS, bench_values, parse_list, parse_overrides, run_bench
    from .data import TASKS

    tasks = parse_list("tasks", args.tasks, tuple(TASKS))
    methods = parse_list("methods", args.methods, METHODS.names())
    try:
        budgets = [float(v) for v in parse_list("p", args.p)]
    except ValueError:
        raise ValueError(f"p: expected comma-separated fractions, got {args.p!r}") from None
    for value in budgets:
        if not 0 < value <= 1:
            raise ValueError(f"p: must be fractions in (0, 1], got {value!r}")
    if args.seeds < 1:
        raise ValueError(f"seeds: must be >= 1, got {args.seeds!r}")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise ValueError(f"data_root: {args.data_root!r} is not a directory")
    per_task = parse_overrides("per_task", args.per_task, tasks)
    per_method = parse_overrides("per_method", args.per_method, methods)
    base = bench_values(args, BENCH_DEFAULTS)
    records = run_bench(base, tasks, methods, budgets, list(range(args.seeds)), args.data_root, args.out,
                        per_task=per_task, per_method=per_method)
    ok = sum(r.get("status") == "ok" for r in records)
    return {"results": str(Path(args.out) / "results.md"), "cells": str(Path(args.out) / "cells.jsonl"),
            "finished": ok, "failed": len(records) - ok}


def main(argv: list[str] | None = None) -> int:
    try:
        result = _command(build_parser().parse_args(argv))
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"bayestune: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("bayestune: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    if result is None:  # a torchrun rank other than 0
        return 0
    try:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    except BrokenPipeError:  # e.g. `bayestune list | head`: the reader is gone, which is not an error
        sys.stdout = open(os.devnull, "w")  # Python flushes stdout at exit; to a closed pipe that would fail
    return 0


if __name__ == "__main__":
    sys.exit(main())
