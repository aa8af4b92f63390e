"""Checkpoint retention (--keep N, --keep-best) and early stopping on the validation loss."""

import json

import pytest

from openglm.train import checkpointing
from openglm.train.loop import pretrain


def kept_steps(run):
    return [state["step"] for _, state in checkpointing.kept_checkpoints(run)]


def test_keep_n_latest(settings, tmp_path):
    run = tmp_path / "run"
    pretrain(settings(run, steps=10, save_every=2, eval_every=0, eval_tokens=0, keep=3))
    # checkpoint/ is step 10; the two before it stay as checkpoint-STEP, each recording its step
    assert checkpointing.load_checkpoint(run / "checkpoint")[2]["step"] == 10
    assert kept_steps(run) == [6, 8]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000006", "checkpoint-00000008"]
    # each is a whole checkpoint a run could continue from
    weights, _, state = checkpointing.load_checkpoint(run / "checkpoint-00000006")
    assert state["step"] == 6 and weights


def test_keep_best_records_val_loss_and_keeps_the_lowest(settings, tmp_path):
    run = tmp_path / "run"
    pretrain(settings(run, steps=12, eval_every=2, save_every=0, keep_best=True, stop_after=6))
    # then a learning rate so high that the validation loss climbs: the best is not the last
    pretrain(settings(run, steps=12, lr=1.0, clip=0, eval_every=2, save_every=0, keep_best=True, resume=True))
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["val_loss"] for r in metrics if "val_loss" in r}
    best_step = min(evals, key=evals.get)
    assert best_step != 12, evals
    latest = checkpointing.load_checkpoint(run / "checkpoint")[2]
    assert latest["step"] == 12 and latest["val_loss"] == pytest.approx(evals[12])
    (kept,) = checkpointing.kept_checkpoints(run)
    assert kept[1]["step"] == best_step and kept[1]["val_loss"] == pytest.approx(evals[best_step])


def test_early_stop_and_resume_keep_counting(settings, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(settings(run, steps=40, eval_every=2, early_stop=2, stop_after=6))
    result = pretrain(settings(run, steps=40, lr=1.0, clip=0, eval_every=2, early_stop=2, resume=True))
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    # it stopped at the second evaluation in a row without a new best, and saved there
    best = min(range(len(evals)), key=lambda i: evals[i][1])
    assert result.step < 40 and not result.interrupted
    assert len(evals) == best + 3 and result.step == evals[-1][0]
    assert "early stop at step" in capsys.readouterr().out
    state = checkpointing.load_checkpoint(run / "checkpoint")[2]
    assert state["step"] == result.step and state["validation"]["since_best"] == 2
    # resuming with more patience continues the count from the checkpoint, not from zero
    again = pretrain(settings(run, steps=40, lr=1.0, clip=0, eval_every=2, early_stop=3, resume=True))
    assert again.step == result.step + 2


def test_keep_best_needs_validation(settings, tmp_path):
    from openglm.errors import OpenGLMError

    with pytest.raises(OpenGLMError, match="need validation data"):
        pretrain(settings(tmp_path / "run", eval_tokens=0, keep_best=True))
