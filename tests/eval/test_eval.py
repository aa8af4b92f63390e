"""Perplexity and multiple choice against hand computations and a model that learned the answers."""

from __future__ import annotations

import json
import lzma
import math
import re

import pytest
import torch
import torch.nn.functional as F

from openglm import Config, GLMForCausalLM, OpenGLMError, load_model, save_model
from openglm.cli import main
from openglm.eval.multiple_choice import delimiter, multiple_choice, read_items, split_pair, wilson_interval
from openglm.eval.perplexity import perplexity, score, windows


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint)


def plain_nll(model, ids: list[int]) -> float:
    """Summed NLL of ids[1:] from one plain forward pass over the whole sequence."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return -sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))


def test_perplexity_is_the_plain_forward_nll(model, tokenizer):
    text = "It reads the text around each blank."
    ids = [tokenizer.eos_id] + tokenizer.encode(text)  # the first token is predicted from <|endoftext|>
    nll = plain_nll(model, ids)
    stats = perplexity(model, tokenizer, [(text, "en"), ("通用语言模型", "zh"), ("untagged text", "")], seq_len=64)
    en = stats["en"]
    assert (en.documents, en.tokens, en.chars) == (1, len(ids) - 1, len(text))
    assert en.nll == pytest.approx(nll, rel=1e-5)
    assert en.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert en.bits_per_char == pytest.approx(nll / math.log(2) / len(text), rel=1e-5)
    assert set(stats) == {"all", "en", "zh"}  # untagged documents count in "all" only
    assert stats["all"].documents == 3
    assert stats["all"].nll == pytest.approx(en.nll + stats["zh"].nll + plain_nll(
        model, [tokenizer.eos_id] + tokenizer.encode("untagged text")), rel=1e-5)


def test_windows_score_every_target_once():
    for n in (1, 2, 5, 17, 100):
        spans = windows(n, seq_len=8, stride=3)
        scored = [t for _, first, end in spans for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= 8 for begin, _, end in spans)
        assert all(first - begin >= min(5, first) for begin, first, _ in spans)  # context kept


def test_windowed_equals_single_window_when_it_fits(model, tokenizer):
    docs = [("The General Language Model fills blanks in text. " * 3, "en")]
    one = perplexity(model, tokenizer, docs, seq_len=256)["all"]
    many = perplexity(model, tokenizer, docs, seq_len=256, stride=7, batch_size=3)["all"]
    assert many.tokens == one.tokens
    assert many.nll == pytest.approx(one.nll, rel=1e-5)


def test_long_document_windows_use_limited_context(model, tokenizer):
    ids = [tokenizer.eos_id] + tokenizer.encode("The General Language Model fills blanks in text. " * 4)
    stats = perplexity(model, tokenizer, [(tokenizer.decode(ids[1:]), "en")], seq_len=16, stride=8)["en"]
    expected = sum(score(model, [(ids[b:e], f - b)])[0] for b, f, e in windows(len(ids), 16, 8))
    assert stats.nll == pytest.approx(expected, rel=1e-5)
    assert stats.nll != pytest.approx(plain_nll(model, ids), rel=1e-3)  # cut context does change the scores


def test_padded_batch_equals_rows_scored_alone(model, tokenizer):
    rows = [([tokenizer.eos_id] + tokenizer.encode(t), 1) for t in ("Blank infilling.", "通用语言模型通过自回归空白填充进行预训练。", "a")]
    rows.append((rows[1][0], 5))  # scoring only a suffix
    alone = [plain_nll(model, ids) for ids, _ in rows[:3]]
    batched = score(model, rows, batch_size=4)
    assert batched[:3] == pytest.approx(alone, rel=1e-5)
    assert batched[3] < batched[1]


def test_max_tokens_stops_after_whole_documents(model, tokenizer):
    docs = [("Blank infilling fills spans.", "en")] * 5
    one = perplexity(model, tokenizer, docs[:1])["all"]
    bounded = perplexity(model, tokenizer, docs, max_tokens=one.tokens + 1)["all"]
    assert bounded.documents == 2 and bounded.tokens == 2 * one.tokens


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson_interval(10, 10)  # unlike the normal approximation, not collapsed to a point
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_continuation_joins_like_plain_text():
    assert split_pair("in Chinese is: ", "大要") == ("in Chinese is:", " 大要")  # the space moves to the choice
    assert split_pair("的英文意思是：", "gist") == ("的英文意思是：", "gist")
    assert split_pair("We cannot help ourselves.", "We live") == ("We cannot help ourselves.", " We live")
    assert delimiter("") == "" and delimiter("x\n") == "" and delimiter("x") == " "


ITEMS = [
    {"context": "The capital of the blank is", "choices": ["Zorbia", "filling", "tokens", "Qwerty"], "label": 1},
    {"context": "通用语言模型的英文是：", "choices": ["apple tree", "General Language Model", "red car", "ocean"], "label": 1},
    {"context": "Two plus two is ", "choices": ["seven", "banana", "four", "circle"], "label": 2},
]


def test_multiple_choice_finds_answers_a_model_learned(tokenizer):
    torch.manual_seed(0)
    config = Config.from_name("glm-tiny-debug", vocab_size=tokenizer.vocab_size)
    model = GLMForCausalLM.from_config(config, seed=0)
    untrained = multiple_choice(model.eval(), tokenizer, ITEMS)
    texts = [[tokenizer.eos_id] + tokenizer.encode("".join(split_pair(it["context"], it["choices"][it["label"]])))
             for it in ITEMS]
    T = max(len(t) for t in texts)
    x = torch.tensor([t + [tokenizer.eos_id] * (T - len(t)) for t in texts])  # (3, T), padding ends each text
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(25):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = multiple_choice(model.eval(), tokenizer, ITEMS, batch_size=3)
    assert result.items == 3 and result.acc == 1.0 and result.acc_norm == 1.0
    assert untrained.acc < 1.0 or untrained.acc_norm < 1.0


def write_jsonl(path, rows):
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def test_eval_command_writes_json(tmp_path, tiny_checkpoint, capsys):
    ppl = write_jsonl(tmp_path / "val.jsonl.xz", [{"text": t, "lang": lang} for t, lang in
                                                   [("Blank infilling.", "en"), ("通用语言模型。", "zh"), ("More text here.", "en")]])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_jsonl(tasks / "toy_mc.jsonl.xz", ITEMS)
    write_jsonl(tasks / "pairs.jsonl", [{"not": "mc"}])  # not *_mc: not picked up
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_checkpoint), "--ppl", str(ppl), "--tasks-dir", str(tasks), "--max-items", "2",
                 "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    ppl_all = data["perplexity"]["val.jsonl.xz"]
    assert set(ppl_all) == {"all", "en", "zh"} and ppl_all["all"]["documents"] == 3
    assert ppl_all["en"]["chars"] == len("Blank infilling.") + len("More text here.")
    assert data["bos"] == "<|endoftext|>"
    assert list(data["multiple_choice"]) == ["toy_mc.jsonl.xz"] and data["multiple_choice"]["toy_mc.jsonl.xz"]["items"] == 2
    printed = capsys.readouterr().out
    assert "| val.jsonl.xz [en] (2 docs, 31 chars) | bits/char |" in printed
    assert "| toy_mc.jsonl.xz (n=2) | acc [95% CI] |" in printed


def test_compare_prints_models_side_by_side(tmp_path, tiny_checkpoint, tokenizer, capsys):
    other = GLMForCausalLM.from_config(Config.from_name("glm-tiny-debug", vocab_size=tokenizer.vocab_size), seed=5)
    save_model(other, tmp_path / "other", tokenizer=tokenizer)
    mc = write_jsonl(tmp_path / "toy_mc.jsonl", ITEMS)
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_checkpoint), "--mc", str(mc), "--compare", str(tmp_path / "other"),
                 "--json", str(out), "--quiet"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == f"| set | metric | {tiny_checkpoint} | {tmp_path / 'other'} |"
    assert [r["model"] for r in json.loads(out.read_text())] == [str(tiny_checkpoint), str(tmp_path / "other")]


def test_bad_items_name_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad_mc.jsonl", [ITEMS[0], {"context": "x", "choices": ["a", "b"], "label": 5}])
    with pytest.raises(OpenGLMError, match="bad_mc.jsonl:2: not a multiple-choice item"):
        list(read_items(bad))
    with pytest.raises(OpenGLMError, match="no multiple-choice file"):
        list(read_items(tmp_path / "missing.jsonl"))


def test_cli_errors_are_clear(tmp_path, tiny_checkpoint, capsys):
    mc = write_jsonl(tmp_path / "toy_mc.jsonl", ITEMS)
    ckpt = str(tiny_checkpoint)
    cases = [
        (["--ppl", str(tmp_path / "missing.jsonl")], "no file at"),
        (["--ppl", str(mc)], 'toy_mc.jsonl:1: .*"text"'),  # a multiple-choice file is not a corpus
        (["--mc", str(write_jsonl(tmp_path / "val.jsonl", [{"text": "a", "lang": "en"}]))], "val.jsonl:1: not a multiple-choice"),
        (["--tasks-dir", str(tmp_path / "nowhere")], "no tasks directory"),
        (["--ppl", str(tmp_path / "val.jsonl"), "--seq-len", "16", "--stride", "16"], "stride must be in 1..15"),
        ([], "nothing to evaluate"),
    ]
    for extra, message in cases:
        assert main(["eval", ckpt, *extra, "--quiet"]) == 1
        assert re.search(message, capsys.readouterr().err), message
    assert main(["eval", "no-such-model", "--mc", str(mc)]) == 1
    assert "no checkpoint at 'no-such-model'" in capsys.readouterr().err
