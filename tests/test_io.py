"""Artifact files: durable atomic writes, and nested states (checkpoints) as one safetensors file."""
import os
import stat

import pytest
import torch

from bayestune_pyro import io
from bayestune_pyro.io import atomic_path, load_state, save_state, state_header


def test_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    target = tmp_path / "out" / "a.json"
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    io.write_json(target, {"x": 1})
    assert io.read_json(target) == {"x": 1}
    file_ino, dir_ino = target.stat().st_ino, target.parent.stat().st_ino
    assert events == [("fsync", "file", file_ino), ("replace", file_ino, str(target)), ("fsync", "dir", dir_ino)]


def test_a_failure_inside_the_block_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("new, half written")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_directory_that_cannot_be_fsynced_is_tolerated_where_the_platform_says_so(tmp_path, monkeypatch):
    fsync = os.fsync

    def no_directory_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")  # EINVAL: what some file systems answer for a directory
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_directory_fsync)
    io.write_json(tmp_path / "a.json", [1])
    assert io.read_json(tmp_path / "a.json") == [1]


def test_a_nested_state_round_trips_with_its_key_types_tuples_and_scalars(tmp_path):
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2, 2))], lr=0.01)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    state = {"step": 7, "name": "sgld", "time": 0.1 + 0.2, "none": None, "flag": True,
             "rng": torch.get_rng_state(), "generator": gen.get_state(), "opt": opt.state_dict(),
             "traces": [{"lambda": [torch.arange(3.0), torch.tensor(2.5)], "loss": []}],
             "dotted": {"a.b": torch.zeros(2, dtype=torch.float64)}}
    path = tmp_path / "state.ckpt"
    save_state(path, state)
    loaded = load_state(path)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return type(a) is type(b) and a == b

    assert same(state, loaded)
    assert list(loaded["opt"]["state"]) == [0, 1]  # integer keys stay integers (the optimizer matches on them)
    assert loaded["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    fresh = torch.optim.Adam([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2, 2))], lr=1.0)
    fresh.load_state_dict(loaded["opt"])
    assert fresh.param_groups[0]["lr"] == 0.01 and torch.equal(fresh.state_dict()["state"][1]["exp_avg"],
                                                               opt.state_dict()["state"][1]["exp_avg"])
    assert state_header(path) == {"step": 7, "name": "sgld", "time": 0.1 + 0.2, "none": None, "flag": True}
    assert [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]  # one file: written atomically as a whole


@pytest.mark.parametrize("bad,field", [({"x": object()}, "x is a object"), ({"x": {1.5: 1}}, "x has a key"),
                                       ({"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}}, "'a.b'")])
def test_a_state_that_cannot_be_stored_is_a_one_line_error(tmp_path, bad, field):
    with pytest.raises(ValueError, match=field):
        save_state(tmp_path / "s", bad)
    assert not list(tmp_path.iterdir())
