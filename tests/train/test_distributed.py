"""`openglm pretrain` under torchrun: 2 CPU processes (gloo) x B/2 rows train like 1 process x B rows."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import openglm
from openglm.train import checkpointing
from openglm.train.loop import pretrain

ARGS = ["--config", "glm-tiny-debug", "--steps", "4", "--batch-size", "4", "--seq-len", "64", "--lr", "3e-3",
        "--warmup", "2", "--eval-every", "2", "--eval-tokens", "256", "--log-every", "1", "--no-progress"]
RTOL = 1e-5  # different matmul blockings and the gradient all-reduce round differently


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun(data_dir, run_dir, *extra):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "openglm", "pretrain", "--data", str(data_dir), "-o", str(run_dir), *ARGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def single(settings, tmp_path):
    run = tmp_path / "single"
    pretrain(settings(run, steps=4, lr=3e-3, warmup=2, eval_every=2, eval_tokens=256))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume(mode, data_dir, single, tmp_path):
    run = tmp_path / mode
    torchrun(data_dir, run, "--parallel", mode, "--stop-after", "2")
    torchrun(data_dir, run, "--parallel", mode, "--resume")  # rank 0 wrote the checkpoint; every rank reads it
    got, want = records(run), records(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 2, 3, 4, 4]
    for g, w in zip(got, want):
        key = "loss" if "loss" in g else "val_loss"
        assert g[key] == pytest.approx(w[key], rel=RTOL), (g, w)
    assert want[-2]["loss"] < want[0]["loss"] - 0.1  # the steps did train
    # The exported model is the checkpoint's, and computes what the single process's does. (Weights
    # with near-zero gradients, like k_proj biases, may differ by an Adam step; the function does not.)
    model = openglm.load_model(run / "model")
    weights = checkpointing.load_checkpoint(run / "checkpoint")[0]
    assert all(t.equal(weights["lm." + k]) for k, t in model.state_dict().items())
    ids = torch.arange(48).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        assert model(ids).allclose(openglm.load_model(single / "model")(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_moe_balancing_matches_one_process(data_dir, settings, tmp_path):
    # Expert counts are summed over ranks before the bias update, so both ranks move the biases as one process does.
    moe = ["--config", "glm-4.5-air-debug", "--set", "num_layers=3", "--balance-rate", "0.01", "--aux-loss-coef", "0.01"]
    run = tmp_path / "ddp"
    torchrun(data_dir, run, *moe)  # the later --config wins over ARGS' glm-tiny-debug
    single = tmp_path / "single"
    pretrain(settings(single, config="glm-4.5-air-debug", overrides=["num_layers=3"], balance_rate=0.01,
                      aux_loss_coef=0.01, steps=4, lr=3e-3, warmup=2, eval_every=2, eval_tokens=256))
    got, want = [r for r in records(run) if "loss" in r], [r for r in records(single) if "loss" in r]
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL) and g["moe_load"] == w["moe_load"], (g, w)
    biases = [checkpointing.load_checkpoint(r / "checkpoint")[0] for r in (run, single)]
    names = [k for k in biases[0] if k.endswith("e_score_correction_bias")]
    assert len(names) == 2 and all(biases[0][k].abs().max() > 0 for k in names)
    assert all(biases[0][k].equal(biases[1][k]) for k in names)
