"""Perplexity and multiple choice against hand computations and a model that learned the answers."""

from __future__ import annotations

import json
import lzma
import math

import pytest
import torch
import torch.nn.functional as F

from openglm import Config, GLMForCausalLM, OpenGLMError, load_model, save_model
from openglm.cli import main
from openglm.eval.multiple_choice import delimiter, multiple_choice, read_items, wilson_interval
from openglm.eval.perplexity import perplexity, windows


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def test_perplexity_is_the_plain_forward_nll(model, tokenizer):
    text = "It reads the text around each blank."
    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0], -1)
    nll = -sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
    stats = perplexity(model, tokenizer, [(text, "en"), ("通用语言模型", "zh")], seq_len=64)
    en = stats["en"]
    assert en.tokens == len(ids) - 1 and en.chars == len(text)
    assert en.nll == pytest.approx(nll, rel=1e-5)
    assert en.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert en.bits_per_char == pytest.approx(nll / math.log(2) / len(text), rel=1e-5)
    assert stats["all"].tokens == en.tokens + stats["zh"].tokens


def test_windows_score_every_target_once():
    for n in (2, 5, 17, 100):
        spans = windows(n, seq_len=8, stride=3)
        scored = [t for _, first, end in spans for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= 8 for begin, _, end in spans)
        assert all(first - begin >= min(5, first) for begin, first, _ in spans)  # context kept


def test_windowed_equals_single_window_when_it_fits(model, tokenizer):
    docs = [("The General Language Model fills blanks in text. " * 3, "en")]
    one = perplexity(model, tokenizer, docs, seq_len=256)["all"]
    many = perplexity(model, tokenizer, docs, seq_len=256, stride=7, batch_size=3)["all"]
    assert many.nll == pytest.approx(one.nll, rel=1e-5)


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0


def test_delimiter():
    assert delimiter("in Chinese is: ") == ""
    assert delimiter("的英文意思是：") == ""
    assert delimiter("We cannot help ourselves.") == " "


ITEMS = [
    {"context": "The capital of the blank is", "choices": ["Zorbia", "filling", "tokens", "Qwerty"], "label": 1},
    {"context": "通用语言模型的英文是：", "choices": ["apple tree", "General Language Model", "red car", "ocean"], "label": 1},
    {"context": "Two plus two is", "choices": ["seven", "banana", "four", "circle"], "label": 2},
]


def test_multiple_choice_finds_answers_a_model_learned(tokenizer):
    config = Config.from_name("glm-tiny-debug", vocab_size=tokenizer.vocab_size)
    model = GLMForCausalLM.from_config(config, seed=0)
    texts = [[tokenizer.eos_id] + tokenizer.encode(it["context"] + delimiter(it["context"]) + it["choices"][it["label"]])
             for it in ITEMS]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        for ids in texts:
            x = torch.tensor([ids])
            loss = F.cross_entropy(model(x[:, :-1])[0], x[0, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    result = multiple_choice(model, tokenizer, ITEMS, batch_size=2)
    assert result.items == 3 and result.acc == 1.0 and result.acc_norm == 1.0
    untrained = multiple_choice(GLMForCausalLM.from_config(config, seed=0).eval(), tokenizer, ITEMS)
    assert untrained.acc < 1.0 or untrained.acc_norm < 1.0


def test_eval_command_writes_json(tmp_path, tiny_checkpoint):
    ppl = tmp_path / "val.jsonl.xz"
    with lzma.open(ppl, "wt", encoding="utf-8") as f:
        for text, lang in [("Blank infilling.", "en"), ("通用语言模型。", "zh"), ("More text here.", "en")]:
            f.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_mc.jsonl").write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in ITEMS))
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_checkpoint), "--ppl", str(ppl), "--tasks-dir", str(tasks), "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert set(data["perplexity"]["val.jsonl.xz"]) == {"all", "en", "zh"}
    assert data["perplexity"]["val.jsonl.xz"]["all"]["documents"] == 3
    assert data["multiple_choice"]["toy_mc.jsonl"]["items"] == 3


def test_bad_items_name_file_and_line(tmp_path):
    bad = tmp_path / "bad_mc.jsonl"
    bad.write_text(json.dumps(ITEMS[0]) + "\n" + json.dumps({"context": "x", "choices": ["a", "b"], "label": 5}) + "\n")
    with pytest.raises(OpenGLMError, match="bad_mc.jsonl:2: not a multiple-choice item"):
        list(read_items(bad))
    with pytest.raises(OpenGLMError, match="no multiple-choice file"):
        list(read_items(tmp_path / "missing.jsonl"))
    assert main(["eval", "glm-tiny-debug-missing"]) == 1


def test_compare_prints_models_side_by_side(tmp_path, tiny_checkpoint, tokenizer, capsys):
    other = GLMForCausalLM.from_config(Config.from_name("glm-tiny-debug", vocab_size=tokenizer.vocab_size), seed=5)
    save_model(other, tmp_path / "other", tokenizer=tokenizer)
    mc = tmp_path / "toy_mc.jsonl"
    mc.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in ITEMS))
    assert main(["eval", str(tiny_checkpoint), "--mc", str(mc), "--compare", str(tmp_path / "other"), "--quiet"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert str(tiny_checkpoint) in header and str(tmp_path / "other") in header
