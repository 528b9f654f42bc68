"""Atomic, durable artifact writes: tensors in safetensors, metadata in JSON/YAML (temp file, fsync, rename, fsync
of the directory: nothing half-written, nothing lost to a crash once written), and nested states (checkpoints) as
one safetensors file with their structure in its header, never pickle.

Every safetensors file carries ``sha256`` in its header: the digest of its other header entries and its tensors
(names, dtypes, shapes, bytes), checked on reading, so a flipped bit anywhere is an error, not a silent change.
Reading errors are one-line ValueErrors naming the artifact and the file."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

TENSOR, TUPLE, ITEMS = "$tensor", "$tuple", "$items"  # the structure's tags (a state's own keys never start with $)
STATE = "state"  # the header entry holding a saved state's structure
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02\x8a\x0a")  # torch.save's zip archive, or its legacy pickle
DIGEST = "sha256"  # the header entry holding a safetensors file's digest


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes.

    The temporary file's contents are fsynced before the rename and the directory after it, so a finished write
    survives a crash or power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        yield Path(tmp)
        _fsync(tmp, os.O_RDWR)  # the writer may have replaced the file at tmp: sync what is there now
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` whose writer is gone (killed mid-write: its ``finally`` never ran)."""
    prefix = f".{path.name}."
    for tmp in path.parent.iterdir():
        pid = tmp.name[len(prefix):].split(".")[0]
        if tmp.name.startswith(prefix) and tmp.name.endswith(".tmp") and pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory beside ``path``; it becomes ``path`` (absent or empty) only if the block finishes,
    every file in it fsynced before the rename and the parent directory after it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; artifacts get the usual permissions
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file, os.O_RDONLY)
        fsync_directory(tmp)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _fsync(path: str | os.PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable, where the platform can (not Windows; not every file system)."""
    try:
        _fsync(directory, os.O_RDONLY)
    except OSError as err:
        if not isinstance(err, PermissionError) and err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EISDIR):
            raise


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` and ``metadata`` with their digest in the header; returns the digest."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {k: v for k, v in (metadata or {}).items() if k != DIGEST}
    metadata[DIGEST] = digest(tensors, metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return metadata[DIGEST]


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of the header entries (but the digest) and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != DIGEST}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_tensors(path: str | os.PathLike, what: str, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header metadata, tensors on the CPU) of a safetensors file; the digest is checked when the file has one
    (files written before it existed have none). A one-line ValueError ``<what>: <path> ...`` if the file is
    missing, a pickle (``torch.save``), truncated or corrupted."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except FileNotFoundError:
        raise ValueError(f"{what}: {path} does not exist") from None
    except (SafetensorError, OSError) as err:
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(4).startswith(PICKLE_MAGIC):
                    raise ValueError(f"{what}: {path} was written by torch.save (a pickle), which is not "
                                     "read") from None
        raise ValueError(f"{what}: {path} is truncated or corrupted ({_first_line(err)})") from None
    if tensors and DIGEST in metadata and digest(loaded, metadata) != metadata[DIGEST]:
        raise ValueError(f"{what}: {path} is truncated or corrupted (its contents do not match the sha256 in its "
                         "header)")
    return metadata, loaded


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str | None = None):
    """The JSON value in ``path``; a one-line ValueError ``<what>: <path> ...`` (``what`` defaults to the file's
    stem, e.g. ``metrics``) if it is missing or not UTF-8 JSON."""
    path = Path(path)
    what = what or path.stem
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what}: {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError, IsADirectoryError) as err:
        raise ValueError(f"{what}: {path} is not valid JSON ({_first_line(err)})") from None


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
    metadata, loaded = read_tensors(path, "checkpoint", tensors)
    header = metadata.get(STATE)
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
