"""An output that cannot be written is one line on stderr and exit 1, found before any work, with nothing left behind."""

from __future__ import annotations

import json

import pytest

from openglm.cli import main


@pytest.fixture
def blocked(tmp_path):
    """A path under a regular file: no folder can be made there, whoever runs the test."""
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "out"


def fails_cleanly(capsys, *argv) -> str:
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("openglm: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_tokenizer_train(capsys, blocked, tmp_path):
    (tmp_path / "t.txt").write_text("some text to learn from\n" * 20)
    err = fails_cleanly(capsys, "tokenizer", "train", "--input", tmp_path / "t.txt", "--vocab-size", "300",
                        "-o", blocked)
    assert str(blocked) in err


def test_data_prepare(capsys, blocked, tmp_path, tiny_checkpoint):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    fails_cleanly(capsys, "data", "prepare", "--input", tmp_path / "t.jsonl", "--tokenizer", tiny_checkpoint,
                  "--workers", "1", "-o", blocked)


def test_quantize_and_convert(capsys, blocked, tiny_checkpoint):
    fails_cleanly(capsys, "quantize", tiny_checkpoint, "--scheme", "int8", "-o", blocked)
    fails_cleanly(capsys, "convert", tiny_checkpoint, "--to", "hf", "-o", blocked)
    fails_cleanly(capsys, "convert", tiny_checkpoint, "--to", "gguf", "-o", blocked / "m.gguf")


def test_gguf_into_a_missing_folder_creates_it(capsys, tiny_checkpoint, tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "missing" / "deeper" / "m.gguf"
    assert main(["convert", str(tiny_checkpoint), "--to", "gguf", "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and [p.name for p in out.parent.iterdir()] == ["m.gguf"]


def test_eval_outputs_are_checked_before_the_work(capsys, blocked, tiny_checkpoint, tmp_path, monkeypatch):
    import openglm.eval.cli as eval_cli

    def no_work(*args):
        raise AssertionError("evaluated before checking the output")

    monkeypatch.setattr(eval_cli, "_evaluate", no_work)
    (tmp_path / "p.txt").write_text("text\n")
    for flag in ("--json", "--plot"):
        fails_cleanly(capsys, "eval", tiny_checkpoint, "--ppl", tmp_path / "p.txt", flag, blocked / "x")


def test_merge(capsys, blocked, tmp_path):
    fails_cleanly(capsys, "finetune", "merge", tmp_path, "-o", blocked)


def test_a_missing_output_folder_is_not_left_by_a_failed_run(capsys, tmp_path):
    out = tmp_path / "new" / "run"
    fails_cleanly(capsys, "quantize", tmp_path / "no-such-model", "--scheme", "int8", "-o", out)
    assert not (tmp_path / "new").exists()


def test_finetune(capsys, blocked, tmp_path, tiny_checkpoint):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    err = fails_cleanly(capsys, "finetune", tiny_checkpoint, "--data", data, "-o", blocked, "--steps", "2",
                        "--warmup", "1")
    assert "cannot write" in err
