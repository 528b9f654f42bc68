"""The command line: help, bad input as one-line errors with nothing left behind, config files and overrides."""
import json
import subprocess
import sys

import pytest
import yaml

from bayestune_pyro.cli import build_parser, main, resolve_config
from bayestune_pyro.config import RunConfig

FAST = ["--backbone", "tiny-bert", "--shots-per-class", "2", "--max-length", "16", "--steps", "6", "--warmup", "2",
        "--burnin", "2", "--thin", "1", "--stage2-steps", "2"]


@pytest.mark.parametrize("args,field", [
    (["--p", "-0.1"], "p:"),
    (["--p", "1.5"], "p:"),
    (["--task", "imagenet-21k"], "task:"),
    (["--task", "rte", "--data-dir", "/nonexistent/glue/RTE"], "data_dir:"),
    (["--burnin", "100", "--steps", "50"], "burnin:"),
    (["--lr", "abc"], "lr:"),
    (["--gamma", "-1"], "gamma:"),
    (["--method", "sift", "--threshold", "0.01"], "threshold:"),
    (["--validation-fraction", "0.9"], "validation_fraction:"),
])
def test_bad_values_give_one_line_and_no_run_directory(tmp_path, capsys, args, field):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bayestune: error: " + field) and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_missing_task_files_leave_nothing_behind(tmp_path, capsys):
    empty = tmp_path / "RTE"
    empty.mkdir()
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *FAST, "--task", "rte", "--data-dir", str(empty)]) == 2
    assert "train.tsv" in capsys.readouterr().err
    assert not out.exists()


def test_console_script_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bayestune_pyro.cli", "run", "--out", str(tmp_path / "r"),
                             "--p", "2"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "bayestune: error: p: must be a fraction in (0, 1], got 2.0"


def test_help_explains_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--n-hat", "--gamma", "--preconditioner", "--warmup", "--burnin", "--thin", "--p", "--config"):
        assert flag in text
    assert "[1000000000.0]" in text and "[0.005]" in text


def test_config_file_and_flags_override(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("task: rte\nn_hat: 1e6\nlr: 3e-5\ngamma: 0.5\n")
    args = build_parser().parse_args(["run", "--config", str(cfg), "--gamma", "0.25",
                                      "--data-dir", str(tmp_path)])
    config = resolve_config(args)
    assert (config.task, config.n_hat, config.lr, config.gamma) == ("rte", 1e6, 3e-5, 0.25)


def test_nested_and_flat_config_files_are_the_same_configuration(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("method: sift\nsift_batches: 3\nstage2_steps: 7\n")
    nested.write_text("method: {name: sift, sift_batches: 3}\nstage2_steps: 7\n")
    a, b = (resolve_config(build_parser().parse_args(["run", "--config", str(f)])) for f in (flat, nested))
    assert a.to_dict() == b.to_dict() and a.options.sift_batches == 3 and a.inference is None
    engine = tmp_path / "engine.yaml"
    engine.write_text("engine: {name: sghmc, friction: 0.3}\nmethod: {name: bayestune, n_hat: 1e8}\n")
    c = resolve_config(build_parser().parse_args(["run", "--config", str(engine), "--gamma", "0.5"]))
    assert (c.inference, c.friction, c.gamma, c.n_hat) == ("sghmc", 0.3, 0.5, 1e8)


@pytest.mark.parametrize("args,message", [
    (["--sift-batches", "2"], "sift_batches: an option of method sift, not of method bayestune with engine sgld"),
    (["--method", "sift", "--gamma", "0.5"], "gamma: an option of engine sgld, not of method sift"),
    (["--method", "bayestune-map", "--inference", "vi"], "inference: method 'bayestune-map' runs engine 'map'"),
    (["--method", "lora", "--inference", "sgld"], "inference: method 'lora' has no stage-1 engine"),
    (["--inference", "vi", "--gibbs"], "gibbs: an option of engine sgld, not of method bayestune with engine vi"),
])
def test_an_option_of_another_part_names_its_owner(tmp_path, capsys, args, message):
    assert main(["run", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"bayestune: error: {message}" or err.startswith(f"bayestune: error: {message}")
    assert "\n" not in err and not (tmp_path / "r").exists()


def test_help_groups_the_options_of_every_method_and_engine(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for group in ("options of method sift", "options of method lora", "options of engine sghmc",
                  "options of engine vi"):
        assert group in text
    assert "--friction" in text and "--sift-modules" in text


def test_a_run_directory_of_an_earlier_version_still_reads(tmp_path):
    """Earlier versions wrote config.yaml as one flat record of every method's and engine's options."""
    old = {"task": "bbc-news", "method": "sift", "inference": "sgld", "gamma": 1.0, "n_hat": 1e9, "sift_batches": 2,
           "sift_modules": ["*"], "lora_rank": None, "grad_batches": 8, "vi_init_scale": 1e-4, "include": ["*"],
           "exclude": [], "sigma": 1.0, "p": 0.005, "stage2_steps": 7}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    config = RunConfig.from_yaml(tmp_path / "config.yaml", strict=False)
    assert (config.method, config.sift_batches, config.stage2_steps, config.inference) == ("sift", 2, 7, None)
    with pytest.raises(ValueError, match="inference: method 'sift' has no stage-1 engine"):
        RunConfig.from_yaml(tmp_path / "config.yaml")  # as a user's file: the other parts' keys are errors


def test_every_boolean_option_is_a_flag_pair():
    from bayestune_pyro.config import option_fields

    booleans = [name for name, (_, _, hint) in option_fields().items() if hint is bool]
    assert {"pretrained", "delta_moments", "freeze_preconditioner", "gibbs", "additive_backbone"} <= set(booleans)
    flags = [f"--{n.replace('_', '-')}" for n in booleans]
    args = vars(build_parser().parse_args(["run", *flags]))
    assert all(args[n] is True for n in booleans)
    args = vars(build_parser().parse_args(["run", *[f.replace("--", "--no-", 1) for f in flags]]))
    assert all(args[n] is False for n in booleans)


def test_list_names_every_registered_part_with_its_options(capsys):
    assert main(["list"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"bayestune", "sift", "lora"} <= set(listing["methods"]) and "sghmc" in listing["engines"]
    assert listing["methods"]["sift"]["options"] == ["sift_batches", "sift_modules"]
    assert listing["engines"]["sghmc"]["kind"] == "sampler" and listing["engines"]["vi"]["kind"] == "variational"
    assert listing["search_spaces"]["subset"]["options"] == ["include", "exclude"]
    assert listing["search_spaces"]["subset"]["defaults"] == {}
    assert listing["search_spaces"]["additive"]["defaults"] == {"lr": 1e-3, "stage2_lr": 1e-2, "dense_lr": 3e-3}


def test_unknown_config_field_is_named(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "'learning_rate'" in capsys.readouterr().err


def test_existing_run_with_other_settings_is_not_mixed(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["stage1", "--out", str(out), *FAST]) == 0
    assert main(["run", "--out", str(out), *FAST, "--gamma", "0.5"]) == 2
    assert "gamma" in capsys.readouterr().err
    assert main(["run", "--out", str(out), *FAST]) == 0  # same settings: stage 1 is reused, the rest runs
    assert (out / "metrics.json").exists()


def test_a_peer_method_runs_from_the_command_line_and_stage1_refuses_it(tmp_path, capsys):
    out = tmp_path / "sift"
    assert main(["run", "--out", str(out), *FAST, "--method", "sift", "--validation-fraction", "0.2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "sift" and metrics["n_updated"] == metrics["budget"]
    assert json.loads((out / "mask.json").read_text())["method"] == "sift"
    capsys.readouterr()
    assert main(["stage1", "--out", str(tmp_path / "s1"), *FAST, "--method", "random"]) == 2
    assert capsys.readouterr().err.startswith("bayestune: error: method: stage 1 samples a posterior")


def test_export_says_when_a_run_has_no_posterior(tmp_path, capsys):
    out = tmp_path / "random"
    assert main(["run", "--out", str(out), *FAST, "--method", "random"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--p", "0.01"]) == 2
    assert "has no posterior" in capsys.readouterr().err


def test_an_abbreviated_flag_is_refused_not_guessed(capsys):
    assert main(["run", "--stage2-st", "5", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bayestune: error: ") and "--stage2-st" in err and err.count("\n") == 1


def test_overwrite_gives_the_old_run_back_when_the_new_one_fails_before_producing_anything(tmp_path, capsys):
    """The new run fails late (its data directory holds no task files): the old run is back, untouched."""
    out, empty = tmp_path / "run", tmp_path / "no-data"
    out.mkdir()
    empty.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(RunConfig(backbone="tiny-bert").to_dict()))
    (out / "mask.json").write_text("{}")
    assert main(["run", "--out", str(out), "--overwrite", "--backbone", "tiny-bert", "--task", "rte",
                 "--data-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bayestune: error: ") and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "mask.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_replaces_the_old_run_once_the_new_one_produces(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the old run's")
    assert main(["stage1", "--out", str(out), "--overwrite", "--backbone", "tiny-bert", "--shots-per-class", "2",
                 "--max-length", "16", "--steps", "6", "--warmup", "2", "--burnin", "2", "--thin", "2"]) == 0
    assert (out / "posterior.json").exists() and not (out / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing set aside is left behind
