"""A run directory as an ML engineer leaves it: checks before any work, no half-made files, an honest
history of what changed on --resume, and continued pretraining from existing weights."""

import json
from pathlib import Path

import pytest
import torch

import openglm
from openglm.cli import main
from openglm.errors import OpenGLMError
from openglm.train import checkpointing, loop
from openglm.train.loop import pretrain
from openglm.train.run import Run, learning_rate


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def cli(data_dir, out, *extra) -> list[str]:
    return ["pretrain", "--config", "glm-tiny-debug", "--data", str(data_dir), "-o", str(out), "--steps", "4",
            "--batch-size", "4", "--seq-len", "64", "--warmup", "1", "--eval-tokens", "128", "--log-every", "1",
            "--threads", "1", "--no-progress", *map(str, extra)]


def one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("openglm: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--warmup", "9"], "--warmup 9 must be between 0 and --steps 4"),
    (["--lr", "1e-3", "--min-lr", "2e-3"], "--min-lr 0.002 must be between 0 and --lr 0.001"),
    (["--clip", "-1"], "--clip must be >= 0"),
    (["--seq-len", "2048"], "--seq-len 2048 is longer than the model's 1024 positions"),
    (["--set", "vocab_size=100"], "the tokenizer has 400 ids but the model only 100 embeddings"),
    (["--set", "num_layers=two"], "num_layers takes a int"),
    (["--log-to", "nope"], "unknown tracker 'nope'"),
])
def test_bad_settings_fail_before_any_work(capsys, data_dir, tmp_path, extra, message):
    out = tmp_path / "new" / "run"
    assert message in one_line_error(capsys, cli(data_dir, out, *extra))
    assert not (tmp_path / "new").exists()


def test_shard_ids_outside_the_vocabulary_are_found_first(capsys, data_dir, tmp_path):
    import shutil

    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shard = sorted((data / "val").glob("*.bin"))[0]
    tokens = np.fromfile(shard, dtype=np.uint32)
    tokens[3] = 450  # the model has 400 rows (the tokenizer's)
    tokens.tofile(shard)
    err = one_line_error(capsys, cli(data, tmp_path / "run"))
    assert "holds token id 450, outside the model's vocabulary of 400" in err and not (tmp_path / "run").exists()


def test_unwritable_run_dir(capsys, data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "cannot write" in one_line_error(capsys, cli(data_dir, tmp_path / "file" / "run"))


@pytest.mark.parametrize("damage", ["optimizer", "weights"])
def test_damaged_checkpoint_on_resume_is_one_line(capsys, data_dir, tmp_path, damage):
    run = tmp_path / "run"
    assert main(cli(data_dir, run, "--stop-after", "2")) == 0
    before = (run / "run.json").read_text()
    if damage == "optimizer":
        (run / "checkpoint" / "optimizer.pt").write_bytes(b"not a checkpoint")
    else:
        weights = run / "checkpoint" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    err = one_line_error(capsys, cli(data_dir, run, "--resume"))
    assert "cannot read the training checkpoint" in err and "damaged" in err
    assert (run / "run.json").read_text() == before  # nothing was written before the check


def test_a_failed_new_run_leaves_nothing(settings, tmp_path, monkeypatch):
    calls = []

    def failing_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real_step(*args)

    real_step = Run.train_step
    monkeypatch.setattr(Run, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        pretrain(settings(tmp_path / "run", save_every=100))
    assert not (tmp_path / "run").exists()


def test_stale_files_are_cleaned_and_metrics_never_mix(settings, tmp_path):
    run = tmp_path / "run"
    # what a run killed with -9 before its first checkpoint leaves
    (run / ".checkpoint.tmp-x1y2").mkdir(parents=True)
    (run / ".checkpoint.tmp-x1y2" / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / ".run.json.abc.tmp").write_text("{")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")
    pretrain(settings(run, steps=2))
    assert not list(run.glob(".*tmp*"))
    assert [r.get("loss") for r in records(run)][0] != 99.0 and [r["step"] for r in records(run)] == [1, 2, 2]


def test_resume_with_changed_settings_says_so_and_keeps_history(settings, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(settings(run, steps=8, stop_after=4))
    capsys.readouterr()
    pretrain(settings(run, steps=12, lr=2e-3, clip=0.5, resume=True))
    err = capsys.readouterr().err
    assert "resuming at step 4 with changed settings: --steps 8 -> 12, --lr 0.003 -> 0.002, --clip 1.0 -> 0.5" in err
    # step 4 of 8 at 3e-3 (warmup 2): cosine halfway through 6 steps; of 12 at 2e-3: 2/10 of the way
    old, new = learning_rate(4, 3e-3, 3e-4, 2, 8), learning_rate(4, 2e-3, 2e-4, 2, 12)
    assert f"learning rate at step 4: {old:.4g} -> {new:.4g}; the schedule is recomputed over 12 steps" in err
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["lr"] == 2e-3 and run_json["steps"] == 12
    assert run_json["history"] == [{"step": 4, "changed": {"steps": [8, 12], "lr": [3e-3, 2e-3], "clip": [1.0, 0.5]}}]
    assert [r["lr"] for r in records(run) if r["step"] == 5 and "lr" in r] == [pytest.approx(
        learning_rate(4, 2e-3, 2e-4, 2, 12))]


def test_validation_set_is_fixed_by_tokens(data_dir, settings, tmp_path):
    from openglm.data.objective import SpecialIds
    from openglm.train.data import parse_objective, sentence_end_ids
    from openglm.train.parallel import Distributed

    world = Distributed(0, 1, 0, torch.device("cpu"))
    _, val, tok = loop._load_data(settings(tmp_path))
    special, ends, weights = SpecialIds.from_tokenizer(tok), sentence_end_ids(tok), parse_objective("token=1")
    sets = {}
    for batch_size in (1, 2, 4):
        s = settings(tmp_path, batch_size=batch_size, eval_tokens=300)
        batches, targets = loop._validation_batches(val, s, special, ends, weights, world, two_d=False)
        ids = torch.cat([b[0] for b in batches])
        sets[batch_size] = (ids[ids != special.pad].tolist(), targets)
    assert sets[1] == sets[2] == sets[4] and sets[1][1] > 0  # 5 rows of 64 tokens whatever the batch size


def test_vocab_size_comes_from_the_tokenizer_and_config_from_a_file(settings, tmp_path, capsys):
    pretrain(settings(tmp_path / "a", steps=1, warmup=1))
    model = openglm.load_model(tmp_path / "a" / "model")
    tok = openglm.load_tokenizer(tmp_path / "a" / "model")
    assert model.config.vocab_size == tok.vocab_size == 400  # glm-tiny-debug has 512 rows
    assert "vocab size 400 (the tokenizer's; the config has 512)" in capsys.readouterr().err
    # --config takes a config.json or a checkpoint directory, and --set changes fields
    pretrain(settings(tmp_path / "b", config=str(tmp_path / "a" / "model" / "config.json"), steps=1, warmup=1,
                      overrides=["num_layers=1", "rope_theta=5e5"]))
    config = openglm.load_model(tmp_path / "b" / "model").config
    assert (config.num_layers, config.rope_theta, config.vocab_size) == (1, 5e5, 400)
    pretrain(settings(tmp_path / "c", config=str(tmp_path / "b" / "model"), steps=1, warmup=1))
    assert openglm.load_model(tmp_path / "c" / "model").config.num_layers == 1


def test_continued_pretraining_from_a_transformers_glm4_checkpoint(settings, tmp_path):
    transformers = pytest.importorskip("transformers")
    trained = tmp_path / "trained"
    pretrain(settings(trained, steps=30, eval_every=0))
    trained_losses = [r["loss"] for r in records(trained) if "loss" in r]
    # The trained weights saved by transformers itself: a GLM-4 (glm4) checkpoint with no openglm files.
    hf_dir = tmp_path / "hf-glm4"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(trained / "model")
    assert type(hf_model).__name__ == "Glm4ForCausalLM"
    hf_model.save_pretrained(hf_dir)
    assert not (hf_dir / "tokenizer.json").exists()

    fresh = pretrain(settings(tmp_path / "fresh", steps=2, warmup=1, lr=1e-4))
    continued = pretrain(settings(tmp_path / "continued", config=None, init=str(hf_dir), steps=2, warmup=1, lr=1e-4))
    first = {name: records(tmp_path / name)[0]["loss"] for name in ("fresh", "continued")}
    # it starts where the trained run ended, far below a fresh model
    assert first["continued"] < trained_losses[0] - 1.0 and first["continued"] < first["fresh"] - 1.0
    assert abs(first["continued"] - sum(trained_losses[-5:]) / 5) < 0.6
    assert continued.val_loss < fresh.val_loss
    with pytest.raises(OpenGLMError, match="would change the shapes"):
        pretrain(settings(tmp_path / "x", config=None, init=str(hf_dir), overrides=["num_layers=1"]))
    # --init also takes a run directory (its model/)
    again = pretrain(settings(tmp_path / "from-run", config=None, init=str(trained), steps=1, warmup=1, lr=1e-4))
    assert again.loss < trained_losses[0] - 1.0
