"""The whole pipeline on tiny random-initialised backbones: artifacts, mask budget, bitwise θ̄, delta round trip."""
import json
import math
from pathlib import Path

import pytest
import torch

from bayestune_pyro.cli import main
from bayestune_pyro.config import RunConfig
from bayestune_pyro.finetune.delta import SparseDelta, merge
from bayestune_pyro.finetune.stage2 import SparseFineTuner
from bayestune_pyro.inference.driver import CHECKPOINT, run_chain
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.io import save_tensors, state_header
from bayestune_pyro.registry import ENGINES
from bayestune_pyro.run_setup import setup
from bayestune_pyro.selection.masks import Mask

TINY_TEXT = ["--backbone", "tiny-bert", "--shots-per-class", "4", "--max-length", "24", "--steps", "12",
             "--warmup", "4", "--burnin", "4", "--thin", "2", "--stage2-steps", "6", "--n-tracked", "32"]


def test_run_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY_TEXT, "--p", "0.01"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "posterior.safetensors", "posterior.json", "mask.safetensors", "mask.json",
            "delta.safetensors", "metrics.json"} <= names
    assert CHECKPOINT not in names
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "bbc-news" and metrics["metric"] == "accuracy"
    assert 0 <= metrics["test_accuracy"] <= 1
    assert metrics["n_updated"] == math.floor(0.01 * metrics["n_total"])
    assert set(metrics["seconds"]) == {"stage1", "stage2"}
    test, table = metrics["test"], metrics["reliability"]  # calibration of the test split (a classification task)
    assert {"nll", "brier", "ece"} <= set(test) and table["bins"] == 15 and sum(table["count"]) == metrics["n_test"]
    filled = [(k, a, c) for k, a, c in zip(table["count"], table["accuracy"], table["confidence"]) if k]
    assert sum(k * a for k, a, _ in filled) / metrics["n_test"] == pytest.approx(test["accuracy"])
    assert test["ece"] == pytest.approx(sum(k * abs(a - c) for k, a, c in filled) / metrics["n_test"])
    posterior = StreamingPosterior.load(out)
    assert posterior.counts == [2] and posterior.trace("lambda").shape == (1, 2, 32)  # 4 sampling steps, thin 2
    assert json.loads(capsys.readouterr().out)["n_updated"] == metrics["n_updated"]


@pytest.mark.parametrize("space", [[], ["--search-space", "additive", "--p", "0.05"]], ids=["subset", "additive"])
def test_stage2_keeps_unmasked_coordinates_bitwise_and_delta_round_trips(tmp_path, space):
    """With the additive space, merge attaches the same seeded zero modules again before adding the delta."""
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY_TEXT, "--stage2-lr", "0.05", "--weight-decay", "0.1", *space]) == 0
    config = RunConfig.from_yaml(out / "config.yaml")
    mask = Mask.load(out)
    assert mask.k == math.floor(config.p * mask.layout.d)
    merged = merge(out / "delta.safetensors")
    fresh = setup(config)  # the pretrained backbone as stage 2 saw it
    merged_params = dict(merged.model.named_parameters())
    theta = torch.cat([merged_params[n].detach().reshape(-1) for n in fresh.lifted.layout.names])
    changed = theta != fresh.lifted.theta_bar
    assert changed.any()
    assert not changed[~mask.dense()].any()  # every unmasked covered coordinate is exactly θ̄
    # identical logits: the merged model vs stage 2's module, θ̄ + δ written in place at the mask
    sparse = SparseDelta.load(out / "delta.safetensors")
    tuner = SparseFineTuner(fresh.lifted, mask.index, fresh.nll)
    with torch.no_grad():
        names = [n for n in fresh.lifted.layout.names if n in sparse.updates]  # layout order = mask order
        tuner.load_trained({"delta": torch.cat([sparse.updates[n][1] for n in names])})
        named = dict(fresh.lifted.model.named_parameters())
        for name, value in sparse.head.items():  # the trained head (the backbone part stays θ̄)
            named[name].copy_(value)
    batch = next(iter(fresh.test_loader()))
    merged.model.eval(), fresh.lifted.model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(merged.model(**inputs).logits, tuner.forward(batch))
    if not space:  # (the additive space's d is a few thousand: there the header dominates the file)
        assert (out / "delta.safetensors").stat().st_size < 0.05 * 4 * (fresh.lifted.d)


def test_timm_backbone_on_digits(tmp_path):
    out = tmp_path / "vision"
    args = ["run", "--out", str(out), "--task", "digits", "--backbone", "timm:test_efficientnet", "--no-pretrained",
            "--steps", "10", "--warmup", "4", "--burnin", "2", "--thin", "2", "--stage2-steps", "4",
            "--batch-size", "32", "--p", "0.02"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "digits" and metrics["n_updated"] == math.floor(0.02 * metrics["n_total"])


def test_stages_one_at_a_time(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["stage1", "--out", str(out), *TINY_TEXT]) == 0
    assert main(["export", str(out), "--threshold", "1e-12"]) == 0
    exported = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert exported["threshold"] == 1e-12 and exported["k"] > 0
    assert main(["export", str(out), "--p", "0.002"]) == 0
    assert main(["stage2", str(out), "--stage2-steps", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["p"] == 0.002 and metrics["n_updated"] == math.floor(0.002 * metrics["n_total"])


@pytest.mark.parametrize("engine", ["sgld", "map", "noisy-adam", "vi", "vi-pyro", "map-svi", "sghmc"])
def test_interrupted_stage1_resumes_bitwise(tmp_path, engine):
    """Interrupted in the sampling phase (preconditioner frozen, traces begun) and resumed from the safetensors
    checkpoint: the posterior and the head equal the uninterrupted chain's, bitwise."""
    config = RunConfig.from_dict(dict(backbone="tiny-bert", shots_per_class=4, max_length=24, steps=12, warmup=4,
                                      burnin=2, thin=2, n_tracked=16, inference=engine))

    def chain(run_dir, stop_after=None):
        s = setup(config)
        post = StreamingPosterior(s.lifted.layout, n_tracked=16)
        batches = s.train_batches()

        def limited():
            for i, b in enumerate(batches):
                if stop_after is not None and i == stop_after:
                    raise KeyboardInterrupt
                yield b

        kernel = ENGINES.get(engine).kernel(s, config.options, config.engine_options, seed=0)
        run_chain(kernel, limited(), config.schedule(), post, engine=engine, checkpoint_dir=run_dir,
                  checkpoint_every=3, progress=False)
        return post, [p.detach().clone() for p in s.lifted.head_parameters()]

    whole, whole_head = chain(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        chain(tmp_path / "b", stop_after=11)  # the last checkpoint is after step 9, in the sampling phase
    info = state_header(tmp_path / "b" / CHECKPOINT)
    assert (info["engine"], info["chain"], info["step"]) == (engine, 0, 9)
    assert (tmp_path / "b" / CHECKPOINT).read_bytes()[:4] != b"PK\x03\x04"  # not torch.save's zip
    resumed, resumed_head = chain(tmp_path / "b")
    assert resumed.counts == whole.counts == [3]
    for moments in ("mean", "m2"):
        for m, value in getattr(whole, moments).items():
            assert torch.equal(getattr(resumed, moments)[m], value), (moments, m)
    for name in ("lambda", "delta", "loss", "log_joint"):
        assert torch.equal(resumed.trace(name), whole.trace(name)), name
    assert all(torch.equal(a, b) for a, b in zip(resumed_head, whole_head))
    assert (resumed.touched is None) == (whole.touched is None)
    assert whole.touched is None or torch.equal(resumed.touched, whole.touched)


def test_a_pickle_or_broken_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["stage1", "--out", str(out), *TINY_TEXT]) == 0
    config = RunConfig.from_yaml(out / "config.yaml")
    s = setup(config)
    kernel = ENGINES.get("sgld").kernel(s, config.options, config.engine_options, seed=0)
    post = StreamingPosterior(s.lifted.layout, n_tracked=32)
    run_chain(kernel, s.train_batches(), config.schedule(), post, engine="sgld", checkpoint_dir=out, progress=False)
    data = (out / CHECKPOINT).read_bytes()  # saved at the last step
    capsys.readouterr()
    header = int.from_bytes(data[:8], "little")  # safetensors: 8-byte header length, the JSON header, the tensors

    def damaged_header():  # the state's structure no longer JSON, the file otherwise intact
        (out / CHECKPOINT).write_bytes(data.replace(b'"state":"{', b'"state":"[', 1))

    for damage, says in [
        (lambda: torch.save({"engine": "sgld", "chain": 0, "step": 3, "kernel": {}}, out / CHECKPOINT),
         "written by torch.save"),
        (lambda: (out / CHECKPOINT).write_bytes(data[: len(data) // 2]), "truncated or corrupted"),
        (lambda: (out / CHECKPOINT).write_bytes(data[: 8 + header // 2]), "truncated or corrupted"),
        (lambda: (out / CHECKPOINT).write_bytes(b"\x10\x00"), "truncated or corrupted"),
        (damaged_header, "truncated or corrupted"),
        (lambda: save_tensors(out / CHECKPOINT, {"x": torch.zeros(2)}), "without a saved state"),
    ]:
        damage()
        assert main(["stage1", "--out", str(out), *TINY_TEXT]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{out / CHECKPOINT} " in err and says in err, err
        assert f"delete {CHECKPOINT} to start stage 1 over" in err


@pytest.mark.parametrize("task", ["stsb", "rte"])
def test_regression_head_starts_at_the_training_mean(task):
    glue = Path(__file__).parent / "fixtures" / "glue"
    config = RunConfig.from_dict({"task": task, "data_dir": str(glue), "backbone": "tiny-bert", "max_length": 24})
    s = setup(config)
    bias = dict(s.lifted.model.named_parameters())["classifier.bias"]
    if task == "stsb":
        labels = [e.label for e in s.task.train]
        assert s.task.target_mean == pytest.approx(sum(labels) / len(labels)) and s.task.target_mean > 0.5
        assert bias.item() == pytest.approx(s.task.target_mean)
    else:  # classification heads start at zero
        assert s.task.target_mean is None and not bias.any()


def test_a_budget_sweep_chooses_p_on_validation_and_the_report_draws_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY_TEXT, "--validation-fraction", "0.3", "--eval-every", "3"]) == 0
    assert main(["sweep", str(out), "--p", "0.02,0.002"]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["p"] for r in sweep["rows"]] == [0.002, 0.02]
    best = max(sweep["rows"], key=lambda r: r["validation"])
    assert sweep["chosen"] == best["p"] and json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}") == sweep
    for row in sweep["rows"]:
        mask = Mask.load(out / "sweep" / f"p={row['p']:g}")
        assert row["k"] == mask.k == math.floor(row["p"] * mask.layout.d)
        metrics = json.loads((out / "sweep" / f"p={row['p']:g}" / "metrics.json").read_text())
        assert row["test"] == metrics["test_accuracy"] and row["validation"] == metrics["validation_score"]
    assert main(["diagnose", str(out)]) == 0
    assert "Budget sweep" in (out / "report.html").read_text()
    assert main(["sweep", str(out), "--p", "0,0.5"]) == 2
    assert "p: must be fractions" in capsys.readouterr().err


def test_a_sweep_needs_a_validation_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["stage1", "--out", str(out), *TINY_TEXT]) == 0
    assert main(["sweep", str(out), "--p", "0.01"]) == 2
    assert "validation-fraction" in capsys.readouterr().err
