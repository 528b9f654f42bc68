"""Atomic, durable artifact writes: tensors in safetensors, metadata in JSON/YAML (temp file, fsync, rename, fsync
of the directory: nothing half-written, nothing lost to a crash once written), and nested states (checkpoints) as
one safetensors file with their structure in its header, never pickle."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

TENSOR, TUPLE, ITEMS = "$tensor", "$tuple", "$items"  # the structure's tags (a state's own keys never start with $)
STATE = "state"  # the header entry holding a saved state's structure
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02\x8a\x0a")  # torch.save's zip archive, or its legacy pickle


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes.

    The temporary file's contents are fsynced before the rename and the directory after it, so a finished write
    survives a crash or power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        yield Path(tmp)
        _fsync(tmp, os.O_RDWR)  # the writer may have replaced the file at tmp: sync what is there now
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable, where the platform can (not Windows; not every file system)."""
    try:
        _fsync(directory, os.O_RDONLY)
    except OSError as err:
        if not isinstance(err, PermissionError) and err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EISDIR):
            raise


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def write_yaml(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))


def save_state(path: str | os.PathLike, state: dict) -> None:
    """A nested state (dicts, lists and tuples of tensors and JSON scalars, e.g. optimizer and RNG states) as one
    atomic safetensors file: every tensor under its dotted key (``kernel.z.theta``), and the structure with every
    other leaf as JSON in the header's ``state`` entry, where a tensor reads ``{"$tensor": key}``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "", tensors)
    save_tensors(path, tensors, metadata={STATE: json.dumps(tree)})


def state_header(path: str | os.PathLike) -> dict:
    """The non-tensor top-level entries of a saved state (e.g. a checkpoint's engine, chain and step), read from the
    header without loading a tensor; a one-line ValueError naming the file as :func:`load_state` gives."""
    tree, _ = _open_state(Path(path), tensors=False)
    return {k: v for k, v in tree.items() if not isinstance(v, (dict, list))}


def load_state(path: str | os.PathLike) -> dict:
    """The state :func:`save_state` wrote, on the CPU; a one-line ValueError naming the file if it is a pickle
    (``torch.save``), truncated or corrupted, or not a saved state."""
    path = Path(path)
    tree, tensors = _open_state(path, tensors=True)
    return _decode(tree, tensors, path)


def _open_state(path: Path, tensors: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(STATE)
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except SafetensorError as err:
        with open(path, "rb") as f:
            if f.read(4).startswith(PICKLE_MAGIC):
                raise ValueError(f"checkpoint: {path} was written by torch.save (a pickle), which is no longer "
                                 "read") from None
        raise ValueError(f"checkpoint: {path} is truncated or corrupted ({_first_line(err)})") from None
    try:
        tree = json.loads(header) if header is not None else None
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint: {path} is truncated or corrupted ({_first_line(err)})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"checkpoint: {path} is a safetensors file without a saved state in its header")
    return tree, loaded


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _encode(obj, key: str, tensors: dict[str, torch.Tensor]):
    """``obj`` as JSON, its tensors moved to ``tensors`` under dotted keys."""
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"state: two tensors would be stored as {key!r}; rename a key")
        tensors[key] = obj
        return {TENSOR: key}
    prefix = f"{key}." if key else ""
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, prefix + k, tensors) for k, v in obj.items()}
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            raise ValueError(f"state: {key or 'the state'} has a key that is neither a string nor an integer")
        return {ITEMS: [[k, _encode(v, f"{prefix}{k}", tensors)] for k, v in obj.items()]}  # keeps integer keys
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{prefix}{i}", tensors) for i, v in enumerate(obj)]
        return {TUPLE: items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"state: {key} is a {type(obj).__name__}; a state holds tensors, containers and JSON scalars")


def _decode(node, tensors: dict[str, torch.Tensor], path: Path):
    if isinstance(node, list):
        return [_decode(v, tensors, path) for v in node]
    if not isinstance(node, dict):
        return node
    if TENSOR in node:
        if node[TENSOR] not in tensors:
            raise ValueError(f"checkpoint: {path} has no tensor {node[TENSOR]!r} (corrupted?)")
        return tensors[node[TENSOR]]
    if TUPLE in node:
        return tuple(_decode(v, tensors, path) for v in node[TUPLE])
    if ITEMS in node:
        return {k: _decode(v, tensors, path) for k, v in node[ITEMS]}
    return {k: _decode(v, tensors, path) for k, v in node.items()}
