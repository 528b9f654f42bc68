"""Posterior diagnostics: InferenceData, convergence checks, uncertainty-aware selection, the report and its CLI."""
import json
import math
import re
from pathlib import Path

import arviz as az
import numpy as np
import pytest
import torch

from bayestune_pyro.cli import main
from bayestune_pyro.config import RunConfig
from bayestune_pyro.diagnostics.convergence import assess, chain_agreement, jaccard, tensor_summary
from bayestune_pyro.diagnostics.inference_data import TRACE_FILE, save_trace, to_inference_data
from bayestune_pyro.diagnostics.report import REPORT_FILE
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.models.lifted import Layout
from bayestune_pyro.pipeline import write_config
from bayestune_pyro.selection.masks import Mask
from bayestune_pyro.selection.uncertainty import Curve, inclusion_from_draws, inclusion_probability, score

LAYOUT = Layout.of([("bert.embeddings.word_embeddings.weight", (20, 8)),
                    ("bert.encoder.layer.0.attention.self.query.weight", (8, 8)),
                    ("bert.encoder.layer.0.output.LayerNorm.weight", (8,)),
                    ("bert.encoder.layer.1.intermediate.dense.weight", (16, 8))])
CONFIG = RunConfig.from_dict(dict(backbone="tiny-bert", p=0.05, lr=3e-4, gamma=0.5))
# ArviZ 0.23's plots call a matplotlib helper that matplotlib 3.11 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Passing a dict or None as alias_mapping:DeprecationWarning")


def synthetic(shifts=(0.0, 0.0), draws=1000, seed=0) -> StreamingPosterior:
    """Chains drawing log λ_i ~ N(μ_i + shift_c, 0.3²) independently: equal shifts mix, different ones do not."""
    gen = torch.Generator().manual_seed(seed)
    loc = torch.linspace(-9, -4, LAYOUT.d)[torch.randperm(LAYOUT.d, generator=gen)]
    post = StreamingPosterior(LAYOUT, chains=len(shifts), n_tracked=64)
    for chain, shift in enumerate(shifts):
        for _ in range(draws):
            lam = (loc + shift + 0.3 * torch.randn(LAYOUT.d, generator=gen)).exp()
            loss = 1.0 + 0.1 * torch.randn((), generator=gen)
            post.update(chain, lam, 0.01 * torch.randn(LAYOUT.d, generator=gen),
                        {"loss": loss, "log_joint": -CONFIG.n_hat * loss})
    return post


def write_run(path: Path, post: StreamingPosterior) -> Path:
    post.save(path, {"seconds": 1.0, "n_train": 10})
    write_config(CONFIG, path)
    return path


@pytest.fixture(scope="module")
def mixed():
    return synthetic()


def test_inference_data_labels_dims_and_netcdf_round_trip(mixed, tmp_path):
    idata = to_inference_data(mixed, CONFIG)
    for name in ("lambda", "log_lambda", "delta"):
        assert idata.posterior[name].dims == ("chain", "draw", "coordinate")
        assert idata.posterior[name].shape == (2, 1000, 64)
    labels, flat = idata.posterior.coordinate.values, idata.posterior.flat_index.values
    for label, i in zip(labels, flat):
        name, local = re.fullmatch(r"(.+)\[(\d+)\]", label).groups()
        assert LAYOUT.offsets[LAYOUT.names.index(name)] + int(local) == i
    np.testing.assert_allclose(idata.posterior["log_lambda"], np.log(idata.posterior["lambda"]))
    stats = idata.sample_stats
    np.testing.assert_array_equal(stats["potential"], -stats["log_joint"])
    assert float(stats["step_size"].max()) == 3e-4 and float(stats["temperature"].min()) == 0.25
    assert all(isinstance(v, (int, float, str)) for v in idata.attrs.values())
    path = save_trace(idata, tmp_path)
    back = az.from_netcdf(path)
    np.testing.assert_array_equal(back.posterior["lambda"], idata.posterior["lambda"])
    assert list(back.posterior.coordinate.values) == list(labels)
    assert back.attrs["lr"] == 3e-4 and back.attrs["threshold"] == "null" and back.attrs["counts"] == "[1000, 1000]"
    assert {"loss", "log_joint", "potential", "step_size", "temperature"} <= set(back.sample_stats.data_vars)


def test_az_summary_and_two_chain_rhat_are_finite(mixed):
    summary = az.summary(to_inference_data(mixed, CONFIG), var_names=["lambda", "delta"])
    assert len(summary) == 128 and np.isfinite(summary["r_hat"]).all() and np.isfinite(summary["ess_bulk"]).all()


def test_warnings_fire_on_a_badly_mixed_posterior_only(mixed):
    good = assess(to_inference_data(mixed, CONFIG))
    assert good.status == "ok" and good.warnings == [] and good.shares["r_hat"] >= 0.95
    bad = assess(to_inference_data(synthetic(shifts=(0.0, 1.0)), CONFIG))
    assert bad.status == "fail"
    assert any(w.startswith("R-hat > 1.01 on 100% of the tracked λ") for w in bad.warnings)
    single = assess(to_inference_data(synthetic(shifts=(0.0,), draws=20), CONFIG))
    assert single.status == "caution" and "1 chain" in single.verdict
    assert any("--chains 2" in w for w in single.warnings) and any("only 20 draws" in w for w in single.warnings)


def test_tensor_summary_and_chain_agreement(mixed):
    mask = Mask(torch.tensor([0, 1, 170]), LAYOUT)
    tensors = tensor_summary(mixed, mask)
    assert list(tensors.tensor.values) == list(LAYOUT.names)
    assert tensors["in_mask"].values.tolist() == [2, 1, 0, 0] and int(tensors["numel"].sum()) == LAYOUT.d
    assert list(tensors.module.values) == ["embeddings", "query", "LayerNorm", "intermediate"]
    assert list(tensors.layer.values) == [-1, 0, 0, 1]
    assert (tensors["var_max"] >= tensors["var_mean"]).all() and (tensors["var_mean"] > 0).all()
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == 0.5
    assert jaccard(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 1.0
    agreement = chain_agreement(mixed, 0.1)
    assert agreement.shape == (2, 2) and np.allclose(np.diag(agreement), 1) and agreement[0, 1] > 0.7
    assert chain_agreement(synthetic(shifts=(0.0, 0.0), draws=1, seed=3), 0.1)[0, 1] < agreement[0, 1]


def test_knee_of_a_curve_with_a_known_knee():
    rank = torch.arange(1, 100_001, dtype=torch.float64)
    knee_at = 1000
    log_lam = torch.where(rank <= knee_at, -0.05 * rank.log(), -0.05 * math.log(knee_at) - 2 * (rank / knee_at).log())
    scores = log_lam.exp()[torch.randperm(rank.numel(), generator=torch.Generator().manual_seed(0))]
    knee = Curve.of(scores).knee()
    assert abs(math.log(knee.k / knee_at)) < 0.01
    assert knee.p == knee.k / 100_000 and knee.threshold == pytest.approx(knee_at ** -0.05, rel=1e-3)
    with pytest.raises(ValueError, match="flat"):
        Curve.of(torch.ones(100)).knee()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_curve_holds_the_sorted_scores_at_its_ranks(dtype):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 50, (30_008,), generator=gen).to(dtype) * torch.rand(30_008, generator=gen).to(dtype)
    curve = Curve.of(scores.reshape(-1, 8))
    ordered = torch.sort(scores.double(), descending=True).values
    assert curve.d == 30_008 and curve.k[0] == 1 and curve.k[-1] == 30_008 and np.all(np.diff(curve.k) > 0)
    assert np.array_equal(curve.values, ordered[torch.from_numpy(curve.k - 1)].numpy())


def test_inclusion_probability_and_lower_bound():
    gen = torch.Generator().manual_seed(0)
    m, s = torch.tensor([-8.0, -7.0, -6.0]), torch.tensor([0.1, 0.5, 1.0])
    draws = (m + s * torch.randn(4000, 3, generator=gen, dtype=torch.float64)).exp()
    threshold = math.exp(-7.0)
    from_draws = inclusion_from_draws(draws.reshape(2, 2000, 3), threshold)
    lognormal = inclusion_probability(draws.mean(0), draws.var(0), threshold)
    assert torch.allclose(from_draws, lognormal, atol=0.03)
    assert from_draws[0] < 0.01 and from_draws[2] > 0.8
    mean, var = torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 0.5])
    assert inclusion_probability(mean, var, 1.5).tolist()[:2] == [0.0, 0.0]
    assert 0.5 < float(inclusion_probability(mean, var, 1.5)[2]) < 1
    lcb = score(torch.tensor([1.0, 1.0]), torch.tensor([0.04, 0.01]), "lcb")  # similar means: lower variance wins
    assert lcb[1] > lcb[0] and torch.equal(score(mean, var), mean)
    with pytest.raises(ValueError, match="rank"):
        score(mean, var, "median")


def test_diagnose_cli_writes_a_self_contained_report(mixed, tmp_path, capsys):
    run = write_run(tmp_path / "run", mixed)
    assert main(["diagnose", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "ok" and Path(out["report"]) == run / REPORT_FILE
    assert az.from_netcdf(run / TRACE_FILE).posterior.sizes["chain"] == 2
    page = (run / REPORT_FILE).read_text()
    assert "Verdict" in page and "data:image/png;base64," in page
    assert not re.search(r"(src|href)=['\"]?https?:", page)
    median = assess(to_inference_data(mixed, CONFIG)).overview().loc["lambda", "R-hat median"]
    assert np.isfinite(median) and f"{median:.4g}" in page
    assert "config.yaml (not exported yet)" in page  # no mask.json: the configured p is shown


def test_the_report_draws_the_reliability_diagram_of_a_classification_run(mixed, tmp_path, capsys):
    run = write_run(tmp_path / "run", mixed)
    table = {"bins": 15, "count": [0] * 10 + [2, 0, 0, 2, 0], "accuracy": [None] * 10 + [0.5, None, None, 1.0, None],
             "confidence": [None] * 10 + [0.7, None, None, 0.9, None]}
    metrics = {"task": "bbc-news", "metric": "accuracy", "test_accuracy": 0.75, "n_test": 4, "n_updated": 1,
               "n_total": LAYOUT.d, "test": {"accuracy": 0.75, "nll": 0.4, "brier": 0.3, "ece": 0.15}}
    ensembles = {"sgld": {"size": 4, "test": {"accuracy": 1.0, "ece": 0.2}, "reliability": table}}
    (run / "metrics.json").write_text(json.dumps({**metrics, "reliability": table, "ensembles": ensembles}))
    assert main(["diagnose", str(run)]) == 0
    page = (run / REPORT_FILE).read_text()
    assert "alt='Reliability diagram, point estimate, test split (15 bins): ECE = 0.1500'" in page
    assert "alt='Reliability diagram, sgld ensemble of 4, test split (15 bins): ECE = 0.2000'" in page
    assert "test.brier" in page and "ensembles.sgld.test.ece" in page
    assert "reliability.count" not in page  # the tables are drawn, not listed
    ensembles["sgld"]["reliability"] = {**table, "count": [1] * 14}
    (run / "metrics.json").write_text(json.dumps({**metrics, "reliability": table, "ensembles": ensembles}))
    assert main(["diagnose", str(run)]) == 2  # a damaged ensemble table is a one-line error
    err = capsys.readouterr().err
    assert err.startswith("bayestune: error: metrics:") and "has count=" in err and err.count("\n") == 1
    (run / "metrics.json").write_text(json.dumps({**metrics, "metric": "pearson_spearman",
                                                  "test_pearson_spearman": 0.5, "test": {"pearson_spearman": 0.5}}))
    assert main(["diagnose", str(run)]) == 0  # a regression run (or one from before calibration): no diagram
    assert "Reliability diagram" not in (run / REPORT_FILE).read_text()


def test_export_auto_records_and_prints_the_knee(mixed, tmp_path, capsys):
    run = write_run(tmp_path / "run", mixed)
    assert main(["export", str(run), "--auto", "--rank", "lcb"]) == 0
    out = json.loads(capsys.readouterr().out)
    meta = json.loads((run / "mask.json").read_text())
    assert out["selection"] == meta["selection"] == "knee" and out["rank"] == meta["rank"] == "lcb"
    assert out["p"] == meta["p"] == meta["knee"]["p"] and out["k"] == math.floor(out["p"] * LAYOUT.d)
    assert out["lambda_th"] == meta["lambda_cut"] > 0 and meta["z"] == 1.645
    assert main(["diagnose", str(run)]) == 0
    assert "mask.json" in (run / REPORT_FILE).read_text()


@pytest.mark.parametrize("args,message", [
    (["diagnose", "{tmp}"], "bayestune: error: run: "),
    (["export", "{run}", "--auto", "--p", "0.01"], "bayestune: error: auto: "),
    (["export", "{run}", "--z", "2"], "bayestune: error: z: "),
])
def test_bad_input_gives_one_line(mixed, tmp_path, capsys, args, message):
    run = write_run(tmp_path / "run", mixed)
    assert main([a.format(tmp=tmp_path, run=run) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
