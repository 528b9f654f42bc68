"""Checked reading of a run's artifacts: every loader states what it reads and what it expects, and anything else
is a one-line ValueError ``<artifact>: <file> <problem>`` naming the field, its value and what is allowed.

Paired artifacts (``mask``, ``posterior``) are one safetensors file whose header holds the tensors' record (JSON
under ``record``, with ``format`` naming its version), covered by the file's own digest, so the pair is written in one
atomic rename. Beside it, ``<name>.json`` is a readable copy, *sealed*: ``sha256`` is the digest of the rest of the
record (canonical JSON) and ``tensors_sha256`` the safetensors file's digest. The copy is removed before a new file is
written and written after it, so it exists only beside a complete write (runs use it as the stage's "done" mark).

Files written before the record moved into the header are read from their copy, its seal and its tensors' digest
checked; records written before sealing (no ``format``) are read with every field they have checked, the seal and the
layout hash not (the hash is computed from the layout they store).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .io import DIGEST, fsync_directory, read_json, read_tensors, save_tensors, write_json
from .models.lifted import Layout

LAYOUT_HASH = "layout_sha256"
TENSORS_HASH = "tensors_sha256"
RECORD = "record"  # the safetensors header entry holding a paired artifact's record
INTEGER = (torch.int32, torch.int64)
MISSING = object()


def save_paired(path: str | os.PathLike, tensors: dict[str, torch.Tensor], record: dict, fmt: str) -> None:
    """Write ``tensors`` to ``path`` with ``record`` (in format ``fmt``) in its header, then the sealed readable copy
    ``path.with_suffix('.json')``; the old copy goes first, so a cut write leaves no copy beside the new file."""
    path = Path(path)
    copy = path.with_suffix(".json")
    if copy.exists():
        copy.unlink()
        fsync_directory(copy.parent)
    record = {"format": fmt, **record}
    write_json(copy, sealed_copy(record, save_tensors(path, tensors, {RECORD: json.dumps(record)})))


def sealed_copy(record: dict, tensors_sha256: str) -> dict:
    """The JSON copy of ``record`` beside the safetensors file whose digest is ``tensors_sha256``, sealed."""
    record = {**record, TENSORS_HASH: tensors_sha256}
    return {**record, DIGEST: _seal(record)}


def _seal(record: dict) -> str:
    canonical = json.dumps({k: v for k, v in record.items() if k != DIGEST}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is(value, kinds: tuple[type, ...]) -> bool:
    """``value`` is one of ``kinds``: ``int`` is not ``bool``, ``float`` takes ``int``, ``None`` is null."""
    return any(value is None if k is None else type(value) is int if k is int else
               isinstance(value, (int, float)) and not isinstance(value, bool) if k is float else isinstance(value, k)
               for k in kinds)


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join("null" if k is None else k.__name__ for k in kinds)


class Reader:
    """One artifact file and its one-line errors: ``<what>: <path> <problem>``."""

    def __init__(self, what: str, path: str | os.PathLike):
        self.what, self.path = what, Path(path)
        self.sealed = False

    def error(self, problem: str) -> ValueError:
        return ValueError(f"{self.what}: {self.path} {problem}")

    def record(self, fmt: str | None = None) -> dict:
        """The JSON object in the file; with ``fmt``, a sealed sidecar of that format (or one written before
        sealing), its seal checked."""
        record = read_json(self.path, self.what)
        if not isinstance(record, dict):
            raise self.error(f"holds a JSON {type(record).__name__}, not an object")
        if fmt is None or ("format" not in record and DIGEST not in record):
            return record
        self.sealed = True
        if record.get("format") != fmt:
            raise self.error(f"has format={_short(record.get('format'))}; this version reads {fmt!r}")
        if record.get(DIGEST) != _seal(record):
            raise self.error("is corrupted (its contents do not match the sha256 it was sealed with)")
        return record

    def tensors(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(header, tensors) of the file."""
        return read_tensors(self.path, self.what)

    def paired(self, fmt: str) -> tuple[Reader, dict, dict[str, torch.Tensor]]:
        """(reader of the record, record, tensors) of a paired safetensors file: the record from its header in
        format ``fmt`` (read by this reader), or, for a file written before the header held it, from its sealed
        JSON copy (its own reader), which must come from the same write."""
        header, tensors = read_tensors(self.path, self.what)
        if RECORD not in header:
            copy = Reader(self.what, self.path.with_suffix(".json"))
            record = copy.record(fmt)
            if TENSORS_HASH in record and record[TENSORS_HASH] != header.get(DIGEST):
                raise copy.error(f"does not belong with {self.path.name} (another write's file: the sha256 "
                                 "differs); write both again")
            return copy, record, tensors
        try:
            record = json.loads(header[RECORD])
        except json.JSONDecodeError:
            raise self.error(f"has a header {RECORD!r} that is not JSON") from None
        if not isinstance(record, dict):
            raise self.error(f"has a header {RECORD!r} holding a JSON {type(record).__name__}, not an object")
        self.sealed = True  # the file's digest covers the header
        if record.get("format") != fmt:
            raise self.error(f"has format={_short(record.get('format'))}; this version reads {fmt!r}")
        return self, record, tensors

    def value(self, record: dict, key: str, kinds: tuple[type, ...], default=MISSING):
        """``record[key]``, of one of ``kinds`` (``int`` is not ``bool``; ``float`` takes ``int``; ``None`` for
        None); ``default`` when it is missing, if given."""
        if key not in record:
            if default is MISSING:
                raise self.error(f"has no {key}")
            return default
        value = record[key]
        if not _is(value, kinds):
            raise self.error(f"has {key}={_short(value)}, not {_names(kinds)}")
        return value

    def items(self, record: dict, key: str, kinds: tuple[type, ...], length: int | None = None) -> list:
        """``record[key]``: a list (of ``length`` items, if given) whose every item is one of ``kinds``."""
        values = self.value(record, key, (list,))
        if (length is not None and len(values) != length) or not all(_is(v, kinds) for v in values):
            size = f"{length} " if length is not None else ""
            raise self.error(f"has {key}={_short(values)}, not a list of {size}{_names(kinds)}")
        return values

    def count(self, record: dict, key: str, default=MISSING) -> int:
        """A non-negative integer field."""
        value = self.value(record, key, (int,), default)
        if value is not default and value < 0:
            raise self.error(f"has {key}={value}, not >= 0")
        return value

    def layout(self, record: dict) -> Layout:
        """The stored layout; its ``d`` and (sealed records) its hash must agree with it."""
        try:
            layout = Layout.from_json(record.get("layout"))
        except ValueError as err:
            raise self.error(f"has a bad layout ({err})") from None
        self.agree("d", self.count(record, "d"), layout.d, "its layout")
        if self.sealed or LAYOUT_HASH in record:
            self.agree(LAYOUT_HASH, self.value(record, LAYOUT_HASH, (str,)), layout.sha256, "its layout")
        return layout

    def agree(self, field: str, got, expected, source: str) -> None:
        """``got`` (the file's ``field``) equals ``expected`` (what ``source`` gives)."""
        if got != expected:
            raise self.error(f"has {field}={_short(got)} but {source} gives {field}={_short(expected)}")

    def expect(self, layout: Layout, stored: Layout, backbone: str | None, stored_backbone: str | None,
               source: str) -> None:
        """The file was made for ``layout`` (d and hash) and ``backbone`` (when both sides name one)."""
        self.agree("d", stored.d, layout.d, source)
        self.agree(LAYOUT_HASH, stored.sha256, layout.sha256, source)
        if backbone is not None and stored_backbone is not None:
            self.agree("backbone", stored_backbone, backbone, source)

    def tensor(self, tensors: dict[str, torch.Tensor], name: str, dtypes: tuple[torch.dtype, ...] | str,
               shape: tuple[int | None, ...]) -> torch.Tensor:
        """``tensors[name]`` with a dtype of ``dtypes`` (or ``"float"``: any floating dtype) and ``shape``
        (``None``: any length)."""
        if name not in tensors:
            raise self.error(f"has no tensor {name!r}")
        t = tensors[name]
        if not (t.is_floating_point() if dtypes == "float" else t.dtype in dtypes):
            allowed = "a floating dtype" if dtypes == "float" else " or ".join(str(d) for d in dtypes)
            raise self.error(f"has {name} of dtype {t.dtype}, not {allowed}")
        if len(t.shape) != len(shape) or any(s is not None and n != s for n, s in zip(t.shape, shape)):
            wanted = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
            raise self.error(f"has {name} of shape {tuple(t.shape)}, not {wanted}")
        return t

    def index(self, tensors: dict[str, torch.Tensor], name: str, bound: int | None) -> torch.Tensor:
        """A 1-D integer tensor of strictly increasing indices in [0, ``bound``), as int64."""
        index = self.tensor(tensors, name, INTEGER, (None,)).to(torch.int64)
        if index.numel():
            if index[0] < 0 or (bound is not None and index[-1] >= bound) or not bool((index[1:] > index[:-1]).all()):
                where = f"[0, {bound})" if bound is not None else ">= 0"
                raise self.error(f"has {name} that is not sorted, distinct and in {where} (min {int(index.min())}, "
                                 f"max {int(index.max())}, {index.numel()} entries)")
        return index

    def only(self, tensors: dict[str, torch.Tensor], names: set[str]) -> None:
        """The file holds no tensor outside ``names``."""
        extra = sorted(set(tensors) - names)
        if extra:
            raise self.error(f"has an unexpected tensor {extra[0]!r}")
