"""Data parallelism for stage 1 (``inference.distributed``): W gloo ranks on 1/W of each minibatch take the steps
one process takes on the whole minibatch, and ``bayestune stage1`` runs under ``torchrun``."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from bayestune_pyro.inference import distributed
from bayestune_pyro.inference.posterior import StreamingPosterior
from bayestune_pyro.testing.data_parallel import batches, chain


def test_two_ranks_on_half_batches_take_the_steps_of_one_rank_on_the_whole_batch(tmp_path):
    """60 SGLD steps of the logistic toy (warm-up, burn-in, sampling): θ, log λ, the head and λ̂ agree to float32
    reduction order (relative 1e-5), though each rank sees only half of every minibatch."""
    chain(0, 1, "", str(tmp_path / "one.safetensors"))
    mp.start_processes(chain, args=(2, str(tmp_path / "init"), str(tmp_path / "two.safetensors")), nprocs=2,
                       start_method="spawn")
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7, msg=name)
    assert (one["theta"].abs() > 0.05).any()  # the chain moved: the check compares more than the start


def test_each_rank_gets_its_contiguous_slice_of_every_minibatch(monkeypatch):
    """Rank r of W takes the r-th of W near-equal contiguous slices; together they are the minibatch."""
    global_batch = next(batches())
    monkeypatch.setattr(distributed, "size", lambda: 3)
    parts = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(next(distributed.shard(iter([global_batch]))))
    assert [len(p["labels"]) for p in parts] == [14, 13, 13]
    for key in global_batch:
        assert torch.equal(torch.cat([p[key] for p in parts]), global_batch[key])
    monkeypatch.setattr(distributed, "size", lambda: 64)
    with pytest.raises(ValueError, match="batch_size: a minibatch of 40 cannot feed 64 ranks"):
        next(distributed.shard(iter([global_batch])))


def test_stage1_runs_under_torchrun_and_rank_0_writes(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            "-m", "bayestune_pyro", "stage1", "--out", str(out), "--backbone", "tiny-bert", "--shots-per-class",
            "3", "--max-length", "16", "--steps", "6", "--warmup", "2", "--burnin", "2", "--thin", "2",
            "--n-tracked", "8"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["ranks"] == 2  # one JSON document: rank 1 prints nothing
    posterior = StreamingPosterior.load(out)
    assert posterior.meta["ranks"] == 2 and posterior.counts == [1]
    assert not (out / "stage1.ckpt").exists()


def test_an_engine_without_the_averaged_gradient_is_refused_under_torchrun(tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            "-m", "bayestune_pyro", "stage1", "--out", str(tmp_path / "run"), "--backbone", "tiny-bert",
            "--inference", "vi-pyro", "--steps", "2", "--warmup", "0", "--burnin", "0", "--thin", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "bayestune: error: inference: engine 'vi-pyro' does not average its gradient" in result.stderr
