"""The bilingual instruction recipe, on a tiny shared-data directory built here."""

import json
import lzma

import pytest

from openglm.data.instruct import build_instruct, eval_texts

PAIRS = [(f"Open the dialog number {i}.", f"打开第 {i} 个对话框。") for i in range(40)]
LEAKED_PAIR = ("Atlantic mid-ocean ridge", "大西洋洋中脊")  # a held-out MC answer: must never be trained on
CEDICT = [f"词{chr(0x4e00 + i)}（ci2 x{i}）：meaning number {i}" for i in range(60)]
CEDICT_LEAKED = ["大要（da4 yao4）：abstract; gist; main points", "大西洋洋中脊（Da4 xi1 yang2）：Atlantic mid-ocean ridge",
                 "规模（gui1 mo2）：large scale; extensive"]
POEMS = [f"诗{i}\u3000作者\n春风{i}里，花开满城。\n明月照江，归人未眠。\n山高水长，云深不知。" for i in range(20)]


@pytest.fixture
def shared(tmp_path):
    tasks, corpus = tmp_path / "tasks", tmp_path / "corpus"
    tasks.mkdir()
    corpus.mkdir()
    with lzma.open(tasks / "par_demo_en_zh.tsv.xz", "wt", encoding="utf-8") as f:
        f.write("".join(f"{en}\t{zh}\n" for en, zh in [*PAIRS, LEAKED_PAIR, PAIRS[0]]))
    mc = [{"context": "\"abstract; gist; main points\" in Chinese is: ", "choices": ["泰式", "大要"], "label": 1},
          {"context": "规模 的英文意思是：", "choices": ["to assent", "Atlantic mid-ocean ridge"], "label": 1}]
    (tasks / "bi_cedict_demo_mc.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in mc))
    faq = [{"q": f"How do I use feature {i}?", "a": f"Call ``f{i}()``.\n\nSee :func:`help` for more."}
           for i in range(8)]
    (tasks / "python_faq_qa.json").write_text(json.dumps(faq))
    turns = lambda i: [f"Hello {i}", f"Hi {i}!", f"How are you {i}?", f"Fine, {i}.", "bye"]  # noqa: E731
    dialogs = [{"lang": "en", "category": "x", "turns": turns(i)} for i in range(10)] + [{"lang": "ch", "category": "x", "turns": ["你好", "你好！"]}]
    (tasks / "chatterbot_dialogs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dialogs))
    docs = [{"text": t, "src": "bi_cedict.txt"} for t in CEDICT + CEDICT_LEAKED]
    docs += [{"text": t, "src": "zh_poetry.txt"} for t in POEMS] + [{"text": "ignored", "src": "en_fortunes.txt"}]
    with lzma.open(corpus / "train.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    (corpus / "val.jsonl").write_text(json.dumps({"text": "词丁（x）：never read", "src": "bi_cedict.txt"}) + "\n")
    return tmp_path


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_eval_texts_include_the_asked_terms(shared):
    texts = eval_texts(sorted((shared / "tasks").glob("*_mc.jsonl")))
    assert {"abstract; gist; main points", "规模", "大要", "atlantic mid-ocean ridge"} <= texts


def test_builds_valid_disjoint_leak_free_conversations(shared, tmp_path, tokenizer):
    from openglm.data.chat import render_chat

    summary = build_instruct(shared, tmp_path / "out", val_fraction=0.2, seed=0, progress=False)
    train, val = read(tmp_path / "out" / "train.jsonl"), read(tmp_path / "out" / "val.jsonl")
    assert summary["train"] == len(train) > 0 and summary["val"] == len(val) > 0
    assert set(summary["sources"]) == {"translate", "dictionary", "poem", "faq", "dialog"}
    assert all(summary["sources"][s]["train"] > 0 for s in summary["sources"])
    assert summary["sources"]["translate"]["dropped_eval_overlap"] == 1
    assert summary["sources"]["translate"]["dropped_duplicates"] == 1
    assert summary["sources"]["dictionary"]["dropped_eval_overlap"] == 3
    for conv in train + val:
        assert set(conv) == {"messages"}
        roles = [m["role"] for m in conv["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2) and body
        assert all(isinstance(m["content"], str) and m["content"] for m in conv["messages"])
        render_chat(tokenizer, conv["messages"])  # the chat template accepts it
    texts = json.dumps(train + val, ensure_ascii=False)
    for leaked in ("大西洋洋中脊", "Atlantic mid-ocean ridge", "大要", "abstract; gist", "规模", "never read", "ignored"):
        assert leaked not in texts
    exchanges = lambda convs: {(m["content"]) for c in convs for m in c["messages"] if m["role"] == "assistant"}
    assert not exchanges(train) & exchanges(val)
    assert any(len(c["messages"]) >= 5 for c in train)  # multi-turn
    assert any(c["messages"][0]["role"] == "system" for c in train + val)
    prompts = " ".join(m["content"] for c in train for m in c["messages"] if m["role"] == "user")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in prompts.replace("词", "").replace("诗", "")) and "Translate" in prompts


def test_is_deterministic_and_capped(shared, tmp_path):
    a = build_instruct(shared, tmp_path / "a", seed=3, progress=False)
    build_instruct(shared, tmp_path / "b", seed=3, progress=False)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    build_instruct(shared, tmp_path / "c", seed=4, progress=False)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    capped = build_instruct(shared, tmp_path / "d", seed=3, max_per_source=5, progress=False)
    assert all(c["items"] <= 5 for c in capped["sources"].values())
    assert a["sources"]["translate"]["items"] == len(PAIRS)


def test_cli(shared, tmp_path, capsys):
    from openglm.cli import main

    assert main(["data", "instruct", "--shared-dir", str(shared), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "translate" in capsys.readouterr().out and (tmp_path / "out" / "summary.json").is_file()
