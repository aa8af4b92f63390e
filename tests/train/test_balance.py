"""Auxiliary-loss-free load balancing of MoE routers during pretraining (``openglm.train.balance``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import openglm
from openglm.config import Config
from openglm.errors import OpenGLMError
from openglm.model.glm import MoE
from openglm.train import checkpointing
from openglm.train.balance import LoadBalancer
from openglm.train.loop import pretrain
from openglm.train.parallel import Distributed

MOE = dict(config="glm-4.5-air-debug", overrides=["num_layers=3"])  # two MoE layers after one dense


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_bias_moves_toward_under_used_experts():
    config = Config.from_name("glm-4.5-air-debug")
    moe = MoE(config).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():  # every token prefers experts 0 and 1: they are overloaded, 2..7 idle
        moe.gate.weight.zero_()
        moe.gate.weight[0] = 1.0
        moe.gate.weight[1] = 0.5
    x = torch.ones(2, 5, config.hidden_size)
    balancer = LoadBalancer(moe, rate=0.01, world=Distributed(0, 1, 0, torch.device("cpu")))
    for _ in range(2):  # two micro-batches of one step
        moe(x)
        balancer.collect()
    assert moe.gate.expert_counts.tolist() == [10, 10, 0, 0, 0, 0, 0, 0]
    balancer.step()
    bias = moe.gate.e_score_correction_bias
    assert bias.tolist() == pytest.approx([-0.01, -0.01] + [0.01] * 6)
    report = balancer.report()
    assert report["moe_imbalance"] == pytest.approx(4.0)  # 20 of 40 slots where 5 is the mean
    assert report["moe_load"] == [[0.5, 0.5, 0, 0, 0, 0, 0, 0]]
    # Evaluation leaves the counts alone; the bias only moves in step(), never in forward.
    moe.eval()(x * 2)
    assert moe.gate.expert_counts.tolist() == [10, 10, 0, 0, 0, 0, 0, 0] and bias.tolist() == pytest.approx(
        [-0.01, -0.01] + [0.01] * 6)



def biases(run_dir: Path) -> list[torch.Tensor]:
    weights = checkpointing.load_checkpoint(Path(run_dir) / "checkpoint")[0]
    return [v for k, v in sorted(weights.items()) if k.endswith("e_score_correction_bias")]


def test_balancing_lowers_the_imbalance_and_logs_the_loads(settings, tmp_path):
    last = {}
    for rate in (0.0, 0.01):
        run = tmp_path / f"rate-{rate}"
        pretrain(settings(run, **MOE, steps=40, balance_rate=rate, eval_tokens=0))
        logged = [r for r in records(run) if "loss" in r]
        assert len(logged) == 40
        for r in logged:
            assert len(r["moe_load"]) == 2 and all(len(layer) == 8 for layer in r["moe_load"])
            assert all(sum(layer) == pytest.approx(1.0, abs=1e-4) for layer in r["moe_load"])
            worst = sum(max(layer) * 8 for layer in r["moe_load"]) / 2
            assert 1.0 <= r["moe_imbalance"] <= 4.0 and r["moe_imbalance"] == pytest.approx(worst, rel=1e-3)
        last[rate] = sum(r["moe_imbalance"] for r in logged[-10:]) / 10
        moved = [float(b.abs().max()) for b in biases(run)]
        assert (max(moved) == 0.0) if rate == 0 else all(m > 0.01 for m in moved)
    # Unbalanced, two experts take every token (imbalance 4 = 8 experts / 2 per token) within a few
    # steps; measured 3.97 without and 2.42 with balancing over steps 31-40.
    assert last[0.0] > 3.5 and last[0.01] < 0.8 * last[0.0], last


def test_resume_with_balancing_is_bit_for_bit(settings, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    options = dict(**MOE, grad_accum=2, balance_rate=0.01)
    pretrain(settings(straight, **options))
    pretrain(settings(halves, **options, stop_after=4))
    assert all(b.abs().max() > 0 for b in biases(halves))  # the moved biases are in the checkpoint
    pretrain(settings(halves, **options, resume=True))
    assert records(halves) == [{**r, "tokens_per_s": h["tokens_per_s"]} if "tokens_per_s" in r else r
                               for r, h in zip(records(straight), records(halves))]
    a = openglm.load_model(straight / "model").state_dict()
    b = openglm.load_model(halves / "model").state_dict()
    assert all(a[k].equal(b[k]) for k in a)
    assert [x.tolist() for x in biases(straight)] == [x.tolist() for x in biases(halves)]


def test_moe_default_rate_and_dense_refusal(settings, data_dir, tmp_path):
    pretrain(settings(tmp_path / "moe", **MOE, steps=2, eval_tokens=0))  # the default rate, 1e-3
    assert all(b.abs().max() == pytest.approx(2e-3) for b in biases(tmp_path / "moe"))
    dense = tmp_path / "dense"
    pretrain(settings(dense, steps=1, warmup=0, eval_tokens=0))
    assert "moe_imbalance" not in records(dense)[0]
    with pytest.raises(OpenGLMError, match="mixture-of-experts models only"):
        pretrain(settings(tmp_path / "refused", balance_rate=0.01))
    assert not (tmp_path / "refused").exists()
    cmd = [sys.executable, "-m", "openglm", "pretrain", "--config", "glm-tiny-debug", "--data", str(data_dir),
           "-o", str(tmp_path / "cli"), "--steps", "1", "--warmup", "0", "--balance-rate", "0.01"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith("openglm: error: --balance-rate applies to mixture-of-"
                                                           "experts models only")
    assert len(done.stderr.strip().splitlines()) == 1


def test_sequence_aux_loss_matches_its_definition_and_reaches_the_router():
    config = Config.from_name("glm-4.5-air-debug")
    torch.manual_seed(0)
    moe = MoE(config).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 7, config.hidden_size)  # 3 rows of 7 tokens
    balancer = LoadBalancer(moe, rate=0.0, world=Distributed(0, 1, 0, torch.device("cpu")), aux_loss_coef=0.3)
    moe(x)
    aux = balancer.aux_loss(seq_len=7)
    # DeepSeek-V3 (eq. 17-20), one row at a time
    scores = torch.sigmoid(x.reshape(-1, config.hidden_size) @ moe.gate.weight.T).detach()
    _, experts = moe.gate(x.reshape(-1, config.hidden_size))
    E, k, T = 8, 2, 7
    expected = 0.0
    for r in range(3):
        rows = slice(r * T, (r + 1) * T)
        for i in range(E):
            f = E / (k * T) * int((experts[rows] == i).sum())
            p = float((scores[rows, i] / scores[rows].sum(-1)).mean())
            expected += f * p / 3
    assert float(aux) == pytest.approx(0.3 * expected, rel=1e-5)
    aux.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().max() > 0
    balancer.collect()
    balancer.step()
    assert balancer.report()["moe_aux_loss"] == pytest.approx(float(aux))


def test_aux_loss_lowers_the_imbalance_and_resumes_exactly(settings, tmp_path):
    options = dict(**MOE, steps=40, balance_rate=0.0, eval_tokens=0)
    pretrain(settings(tmp_path / "plain", **options))
    pretrain(settings(tmp_path / "aux", **options, aux_loss_coef=0.1))
    # Recomputed activations give the same auxiliary gradients, and resuming keeps every number.
    pretrain(settings(tmp_path / "halves", **options, aux_loss_coef=0.1, grad_checkpointing=True, stop_after=20))
    pretrain(settings(tmp_path / "halves", **options, aux_loss_coef=0.1, grad_checkpointing=True, resume=True))
    logged = {name: [r for r in records(tmp_path / name) if "loss" in r] for name in ("plain", "aux", "halves")}
    assert "moe_aux_loss" not in logged["plain"][0] and all(r["moe_aux_loss"] > 0 for r in logged["aux"])
    assert [(r["loss"], r["moe_load"], r["moe_aux_loss"]) for r in logged["aux"]] == [
        (r["loss"], r["moe_load"], r["moe_aux_loss"]) for r in logged["halves"]]
    last = {name: sum(r["moe_imbalance"] for r in rows[-10:]) / 10 for name, rows in logged.items()}
    # measured over steps 31-40: 3.97 without, 2.09 with --aux-loss-coef 0.1 (no bias updates in either)
    assert last["plain"] > 3.5 and last["aux"] < 0.8 * last["plain"], last


def test_aux_loss_is_refused_on_a_dense_model(settings, tmp_path):
    with pytest.raises(OpenGLMError, match="--aux-loss-coef applies to mixture-of-experts models only"):
        pretrain(settings(tmp_path / "dense", aux_loss_coef=0.01))
    with pytest.raises(OpenGLMError, match="--aux-loss-coef must be >= 0"):
        pretrain(settings(tmp_path / "moe", **MOE, aux_loss_coef=-1.0))
