import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import openglm
from openglm.errors import OpenGLMError
from openglm.train import checkpointing
from openglm.train.loop import pretrain
from openglm.train.run import learning_rate


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_learning_rate_schedule():
    lr = [learning_rate(s, 1.0, 0.1, warmup=4, steps=20) for s in range(21)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[4] == 1.0 and math.isclose(lr[12], 0.55) and math.isclose(lr[20], 0.1)
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))


def test_loss_decreases_and_model_exports(settings, tmp_path):
    result = pretrain(settings(tmp_path / "run", steps=30, eval_every=15))
    trace = losses(tmp_path / "run")
    assert len(trace) == 30 and result.step == 30 and not result.interrupted
    first, last = sum(trace[s] for s in range(1, 4)) / 3, sum(trace[s] for s in range(28, 31)) / 3
    assert last < first - 1.0, (first, last)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert math.isclose(evals[1]["val_ppl"], math.exp(evals[1]["val_loss"]))
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(records[0])

    # The exported model is the trained one, readable by openglm.load_model with its tokenizer.
    model = openglm.load_model(tmp_path / "run" / "model")
    weights, _, state = checkpointing.load_checkpoint(tmp_path / "run" / "checkpoint")
    assert state["step"] == 30
    for name, tensor in model.state_dict().items():
        assert tensor.equal(weights["lm." + name]), name
    tok = openglm.load_tokenizer(tmp_path / "run" / "model")
    assert tok.vocab_size <= model.config.vocab_size and model.config.eos_token_id == [tok.eos_id]


def test_resume_is_bit_for_bit(settings, tmp_path):
    straight = tmp_path / "straight"
    pretrain(settings(straight, grad_accum=2))
    halves = tmp_path / "halves"
    first = pretrain(settings(halves, grad_accum=2, stop_after=4))
    assert first.step == 4 and len(losses(halves)) == 4
    with pytest.raises(OpenGLMError, match="--resume"):
        pretrain(settings(halves, grad_accum=2))
    with pytest.raises(OpenGLMError, match="seq_len"):
        pretrain(settings(halves, grad_accum=2, seq_len=32, resume=True))
    pretrain(settings(halves, grad_accum=2, resume=True))
    assert losses(halves) == losses(straight)  # exact float equality, all 8 steps
    a = openglm.load_model(straight / "model").state_dict()
    b = openglm.load_model(halves / "model").state_dict()
    assert all(a[k].equal(b[k]) for k in a)


def test_2d_positions_and_training_options(settings, tmp_path):
    # The original GLM form (2D positions), with every training option switched on.
    run = tmp_path / "run2d"
    result = pretrain(settings(run, config="glm-tiny-2d-debug", steps=4, bf16=True,
                               grad_checkpointing=True, emb_shrink=0.1, objective="token=1,causal=1"))
    assert result.step == 4 and all(math.isfinite(v) for v in losses(run).values())
    model = openglm.load_model(run / "model")
    assert model.config.position_encoding_2d


def test_crash_mid_save_keeps_the_last_good_checkpoint(settings, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(settings(run, steps=2))
    real_replace = os.replace

    def crash_on_swap(src, dst):
        if Path(dst).name == checkpointing.CHECKPOINT and ".tmp-" in Path(src).name:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_swap)
    with pytest.raises(OSError, match="simulated crash"):
        pretrain(settings(run, steps=4, resume=True))
    monkeypatch.undo()
    found = checkpointing.find_checkpoint(run)
    assert found is not None and checkpointing.load_checkpoint(found)[2]["step"] == 2
    assert not list(run.glob(".checkpoint.tmp-*"))  # the half-written one is gone
    result = pretrain(settings(run, steps=4, resume=True))
    assert result.step == 4 and checkpointing.load_checkpoint(run / "checkpoint")[2]["step"] == 4
    assert not (run / checkpointing.PREVIOUS).exists()


def test_keep_previous_checkpoint(settings, tmp_path):
    run = tmp_path / "run"
    pretrain(settings(run, steps=4, save_every=2, keep_previous=True, eval_tokens=0))
    assert checkpointing.load_checkpoint(run / checkpointing.PREVIOUS)[2]["step"] == 2
    assert checkpointing.load_checkpoint(run / checkpointing.CHECKPOINT)[2]["step"] == 4


@pytest.mark.slow
def test_ctrl_c_saves_and_resumes(data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "openglm", "pretrain", "--config", "glm-tiny-debug", "--data", str(data_dir),
           "-o", str(run), "--steps", "100000", "--batch-size", "2", "--seq-len", "64", "--log-every", "1",
           "--threads", "1", "--no-progress", "--eval-tokens", "0", "--warmup", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len(losses(run) if (run / "metrics.jsonl").is_file() else {}) < 3 and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    step = checkpointing.load_checkpoint(run / "checkpoint")[2]["step"]
    assert step >= 3 and max(losses(run)) == step
    done = subprocess.run([*cmd[:11], str(step + 2), *cmd[12:], "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(losses(run)) == list(range(1, step + 3))


def test_gradient_norm_is_exact_on_glm_tiny(tmp_path):
    # glm-tiny's gradients: float32 summing (torch's clip_grad_norm_) was 6.5e-5 off the exact norm
    import torch

    from openglm import Config, GLMForCausalLM
    from openglm.train.run import PretrainLoss, clip_grad_norm

    torch.manual_seed(0)
    module = PretrainLoss(GLMForCausalLM.from_config(Config.from_name("glm-tiny"), seed=0))
    ids = torch.randint(0, 16384, (4, 64))
    positions = torch.arange(64).expand(4, 64)
    module(ids, positions, None, ids.roll(-1, 1)).backward()  # causal
    grads = [p.grad.clone() for p in module.parameters()]
    exact = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    assert clip_grad_norm(module, 1.0) == pytest.approx(exact, rel=1e-12)
    # clipped to the clip, in the same direction
    clipped = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in module.parameters()))
    assert clipped == pytest.approx(1.0, rel=1e-5)
    assert all(torch.allclose(p.grad, g / exact, rtol=1e-5, atol=0) for p, g in zip(module.parameters(), grads))


def test_fp16_with_a_gradient_scaler_resumes_exactly(settings, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    pretrain(settings(straight, steps=4, fp16=True, device="cpu"))
    pretrain(settings(halves, steps=4, fp16=True, stop_after=2))
    state = checkpointing.load_checkpoint(halves / "checkpoint")[2]
    assert state["scaler"]["scale"] > 0  # the scaler's state travels with the checkpoint
    pretrain(settings(halves, steps=4, fp16=True, resume=True))
    assert losses(halves) == losses(straight) and all(math.isfinite(v) for v in losses(straight).values())


def test_device_errors_are_one_line(settings, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(OpenGLMError, match="sees no CUDA GPU"):
        pretrain(settings(tmp_path / "run", device="cuda"))
    with pytest.raises(OpenGLMError, match="unknown device"):
        pretrain(settings(tmp_path / "run", device="gpu0"))
    with pytest.raises(OpenGLMError, match="choose one of --bf16 and --fp16"):
        pretrain(settings(tmp_path / "run", bf16=True, fp16=True))
