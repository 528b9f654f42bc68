"""kill -9 at seeded points of `bayestune run` (stage 1, mask, stage 2) and of `bayestune bench`, on tiny-bert.

After each kill every artifact in the directory is absent or complete (it loads, checked as the commands read it;
a pair of files belongs together), and the same command run again gives what an uninterrupted run gives, bitwise
on the CPU. A second bench on the same OUT is refused while the first holds its lock, and a killed bench leaves no
stale lock.
"""
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from bayestune_pyro.artifacts import RECORD
from bayestune_pyro.bench.harness import LOCK, read_records
from bayestune_pyro.cli import main
from bayestune_pyro.config import RunConfig
from bayestune_pyro.finetune.delta import SparseDelta
from bayestune_pyro.inference.driver import CHECKPOINT
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.io import DIGEST, load_state, read_json, read_tensors
from bayestune_pyro.selection.masks import Mask

GLUE = Path(__file__).parent / "fixtures" / "glue"
RUN = ["--task", "rte", "--data-dir", str(GLUE / "RTE"), "--backbone", "tiny-bert", "--max-length", "24", "--steps",
       "30", "--warmup", "6", "--burnin", "6", "--thin", "3", "--checkpoint-every", "3", "--n-tracked", "16",
       "--stage2-steps", "60", "--p", "0.01"]
BENCH = ["bench", "--tasks", "rte", "--data-root", str(GLUE), "--methods", "bayestune,random", "--seeds", "2",
         "--backbone", "tiny-bert", "--max-length", "24", "--steps", "8", "--warmup", "2", "--burnin", "2", "--thin",
         "2", "--stage2-steps", "20", "--eval-every", "10"]
# what may differ between two runs: sha256 (the seal over the seconds) and tensors_sha256 (the digest of a file whose
# header holds the seconds)
TIMING = ("seconds", "peak_mb", "sha256", "tensors_sha256")
HANG = 600  # seconds: a guard against a child that never gets there, not a measurement


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bayestune_pyro.cli", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait(proc: subprocess.Popen, condition) -> bool:
    """Poll until ``condition()``; False if the process ended first."""
    deadline = time.monotonic() + HANG
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the child never reached the kill point"
        time.sleep(0.002)
    return True


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL; True if the process was still running."""
    proc.send_signal(signal.SIGKILL)
    return proc.wait() == -signal.SIGKILL


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _check_run_files(run: Path) -> None:
    """Every artifact present in ``run`` loads, as the commands read it; a sidecar and its tensors belong together."""
    names = {p.name for p in run.iterdir() if not p.name.startswith(".")}
    if "config.yaml" in names:
        RunConfig.from_yaml(run / "config.yaml")
    for stem, load in (("posterior", lambda: StreamingPosterior.load(run, backbone="tiny-bert")),
                       ("mask", lambda: Mask.load(run))):
        if {f"{stem}.json", f"{stem}.safetensors"} <= names:
            load()
        elif f"{stem}.safetensors" in names:  # killed between the two writes: the tensors alone are whole
            read_tensors(run / f"{stem}.safetensors", stem)
        elif f"{stem}.json" in names:  # a bench cell, recorded: its heavy tensors are deleted
            read_json(run / f"{stem}.json")
    if "delta.safetensors" in names:
        SparseDelta.load(run / "delta.safetensors")
    if CHECKPOINT in names:
        load_state(run / CHECKPOINT)
    for name in names & {"metrics.json", "sweep.json"}:
        read_json(run / name)


def _without_timing(record):
    if isinstance(record, dict):
        return {k: _without_timing(v) for k, v in record.items() if k not in TIMING}
    return record


def _header(metadata: dict) -> dict:
    """A header's entries, its record's timings and the digest (which covers them) aside."""
    out = {k: v for k, v in metadata.items() if k != DIGEST}
    if RECORD in out:
        out[RECORD] = _without_timing(json.loads(out[RECORD]))
    return out


def _same_tensors(a: Path, b: Path) -> bool:
    """The same header entries (timings aside) and bitwise the same tensors (safetensors writes its header entries
    in an order of its own, so the bytes may differ)."""
    (meta_a, tensors_a), (meta_b, tensors_b) = read_tensors(a, "a"), read_tensors(b, "b")
    return _header(meta_a) == _header(meta_b) and tensors_a.keys() == tensors_b.keys() and all(
        tensors_a[k].dtype == tensors_b[k].dtype and torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


def _same_run(a: Path, b: Path) -> None:
    """Bitwise the same artifacts (timings aside), and nothing else: no checkpoint, no temporary file."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for name in ("posterior.safetensors", "mask.safetensors", "delta.safetensors"):
        assert _same_tensors(a / name, b / name), name
    for name in ("mask.json", "config.yaml"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in ("posterior.json", "metrics.json"):
        assert _without_timing(read_json(a / name)) == _without_timing(read_json(b / name)), name


def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, one_thread):
    """Killed after a seeded number of stage-1 checkpoints, after the mask at a seeded delay into stage 2, and at a
    seeded time after a restart; then run again to the end."""
    rng = random.Random(0)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(["run", "--out", str(reference), *RUN]) == 0
    argv = ["run", "--out", str(killed), *RUN]

    checkpoints = rng.randint(1, 3)
    seen = set()

    def after_checkpoints():
        seen.add(_inode(killed / CHECKPOINT))
        return len(seen - {None}) >= checkpoints

    proc = _start(argv)
    assert _wait(proc, after_checkpoints) and _kill(proc)
    assert (killed / CHECKPOINT).exists() and not (killed / "posterior.json").exists()  # cut inside stage 1
    _check_run_files(killed)

    proc = _start(argv)
    assert _wait(proc, lambda: (killed / "mask.json").exists())
    time.sleep(rng.uniform(0, 0.2))
    assert _kill(proc)  # inside stage 2 (60 steps)
    assert not (killed / CHECKPOINT).exists() and not (killed / "metrics.json").exists()
    _check_run_files(killed)

    start = _inode(killed / "config.yaml")  # the command rewrites config.yaml first: a restart is visible
    proc = _start(argv)
    if _wait(proc, lambda: _inode(killed / "config.yaml") != start):
        time.sleep(rng.uniform(0, 1.0))
        _kill(proc)
    _check_run_files(killed)

    assert main(argv) == 0
    _same_run(killed, reference)


def test_a_bench_killed_anywhere_resumes_to_the_uninterrupted_cells_and_leaves_no_stale_lock(tmp_path, capsys,
                                                                                            one_thread):
    """A second bench on the OUT of a running one is refused (two processes); the first is killed once a cell is
    recorded, at a seeded delay; running it again needs no unlocking and gives the uninterrupted bench's cells."""
    rng = random.Random(1)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main([*BENCH, "--out", str(reference)]) == 0
    proc = _start([*BENCH, "--out", str(killed)])
    lock = killed / LOCK
    assert _wait(proc, lambda: lock.exists() and lock.read_text().strip() == str(proc.pid))
    capsys.readouterr()
    assert main([*BENCH, "--out", str(killed)]) == 2
    assert capsys.readouterr().err == (f"bayestune: error: out: {str(killed)!r} is in use by another bench (pid "
                                       f"{proc.pid}); wait for it to finish or choose another --out\n")
    jsonl = killed / "cells.jsonl"
    assert _wait(proc, lambda: jsonl.exists() and jsonl.read_text().count("\n") >= 1)
    time.sleep(rng.uniform(0, 0.5))
    assert _kill(proc)
    lines = jsonl.read_text().splitlines()
    assert 1 <= len(lines) < 4 and all(json.loads(line) for line in lines)  # whole lines only
    yaml.safe_load((killed / "bench.yaml").read_text())
    for cell in (killed / "cells").glob("*/*/*"):
        _check_run_files(cell)

    assert main([*BENCH, "--out", str(killed)]) == 0  # the killed bench's lock went with it
    key = lambda r: (r["task"], r["method"], r["seed"], r["p"])  # noqa: E731
    got, want = sorted(read_records(jsonl), key=key), sorted(read_records(reference / "cells.jsonl"), key=key)
    assert [_without_timing(r) for r in got] == [_without_timing(r) for r in want] and len(got) == 4
    for cell in (reference / "cells").glob("*/*/*"):
        twin = killed / cell.relative_to(reference)
        assert sorted(p.name for p in twin.iterdir()) == sorted(p.name for p in cell.iterdir())
        assert _same_tensors(twin / "mask.safetensors", cell / "mask.safetensors")
        assert _without_timing(read_json(twin / "metrics.json")) == _without_timing(read_json(cell / "metrics.json"))


def test_a_bench_whose_out_is_locked_is_refused_and_writes_nothing(tmp_path, capsys):
    """The lock held by this process (as another bench would hold it): the bench stops before writing anything."""
    out = tmp_path / "bench"
    out.mkdir()
    with open(out / LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("4242\n")
        f.flush()
        assert main([*BENCH, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"bayestune: error: out: {str(out)!r} is in use by another bench (pid 4242); "
                                       "wait for it to finish or choose another --out\n")
    assert [p.name for p in out.iterdir()] == [LOCK]


def test_a_line_cut_by_a_kill_does_not_swallow_the_next_record(tmp_path):
    """A crash mid-append leaves a partial last line in cells.jsonl; the next record starts on a line of its own."""
    out = tmp_path / "bench"
    out.mkdir()
    (out / "cells.jsonl").write_text('{"task": "rte", "method": "random", "se')
    assert main([*BENCH, "--methods", "random", "--seeds", "1", "--out", str(out)]) == 0  # the later flags win
    lines = (out / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["method"] == "random"
