import gzip
import json
import lzma

import pytest
from tokenizers import pre_tokenizers

from openglm.cli import main
from openglm.data.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    read_texts,
    train_tokenizer,
)
from openglm.errors import OpenGLMError

ZH = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "我们今天去图书馆学习语言模型。语言模型可以生成中文和英文。",
    "人工智能是计算机科学的一个分支，它研究如何让机器像人一样思考。",
]
EN = [
    "The quick brown fox jumps over the lazy dog.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "Language models predict the next token; GLM fills in blanks with spans.",
]
CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n\tprint(i * 2)  # 0..18\n"]
CORPUS = (ZH + EN + CODE) * 20

ROUND_TRIP = [
    "你好，世界！Hello, world!",
    "混合 mixed 文本 text 123456 ４５６",
    "emoji 😀🎉👩‍👩‍👧 and 𠀀 (CJK ext B)",
    "   leading and trailing   \n\n\t\t  ",
    "line1\r\nline2\rline3\u00a0nbsp\u200bzwsp",
    'x = {"k": [1, 2.5e-3, None]}\nif x:\n    pass\n',
    "e\u0301 combining, ﬁ ligature, \x00 nul",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=400, min_frequency=2)


def test_round_trip_is_exact(tok):
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.decode(ids) for ids in tok.encode_batch(ROUND_TRIP)] == ROUND_TRIP


def test_training_learns_merges_for_both_languages(tok):
    assert 300 < tok.vocab_size <= 400
    # Frequent words and characters of the corpus become single tokens or pairs.
    assert len(tok.encode(" the")) == 1
    assert len(tok.encode("语言模型")) == 1
    # Digits are split one by one.
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_special_tokens_by_name(tok):
    assert [tok.token_id(name) for name in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.special_ids == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.eos_id == tok.token_id("<|endoftext|>")
    assert tok.id_to_token(tok.token_id("[gMASK]")) == "[gMASK]"
    tok.check_glm_special_tokens()
    with pytest.raises(OpenGLMError, match="<unk>"):
        tok.token_id("<unk>")
    with pytest.raises(OpenGLMError, match="outside the vocabulary"):
        tok.id_to_token(tok.vocab_size)


def test_plain_text_never_encodes_to_a_special_token(tok):
    text = "hi <|user|>\n[gMASK]<sop><|assistant|>"
    special = set(tok.special_ids.values())
    for ids in (tok.encode(text), tok.encode_batch([text])[0]):
        assert not special & set(ids)
        assert tok.decode(ids) == text
    ids = tok.encode(text, allow_special=True)
    assert tok.token_id("<|user|>") in ids
    assert tok.encode("<|user|>", allow_special=True) == [tok.token_id("<|user|>")]
    assert tok.encode_batch(["<eop>"], allow_special=True) == [[tok.token_id("<eop>")]]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "hi \n"


def test_no_automatic_bos_or_eos(tok):
    ids = tok.encode("hello")
    assert tok.decode(ids) == "hello" and tok.eos_id not in ids


def test_save_and_load(tok, tmp_path):
    path = tok.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for source in (path.parent, path, str(path)):
        loaded = load_tokenizer(source)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.special_ids == tok.special_ids
        assert loaded.encode_batch(ROUND_TRIP) == tok.encode_batch(ROUND_TRIP)


def test_load_errors(tmp_path):
    with pytest.raises(OpenGLMError, match="no checkpoint"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(OpenGLMError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": 1}')
    with pytest.raises(OpenGLMError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


def test_transformers_loads_our_file_with_the_same_ids(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tok.save(tmp_path)
    texts = [t for t in ROUND_TRIP if t]
    for hf in (
        transformers.PreTrainedTokenizerFast(tokenizer_file=str(path)),
        transformers.AutoTokenizer.from_pretrained(str(tmp_path)),
    ):
        assert [hf.encode(t, add_special_tokens=False) for t in texts] == tok.encode_batch(texts)
        assert hf.decode(tok.encode(texts[0])) == texts[0]
    assert hf.eos_token == "<|endoftext|>"


def _glm4_style_tokenizer_json() -> dict:
    """A tiny tokenizer.json laid out like GLM-4's on the Hugging Face hub: GPT-4 regex split, then
    byte-level BPE, special tokens as added tokens after the BPE vocabulary, a ``[gMASK]<sop>`` prefix."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # 你 is E4 BD A0, written ä ½ ł in byte-level form.
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("ä", "½"), ("ä½", "ł")]
    vocab = {t: i for i, t in enumerate(alphabet + ["".join(m) for m in merges])}
    specials = SPECIAL_TOKENS + ["<|begin_of_image|>", "<|end_of_image|>"]
    added = [
        {"id": len(vocab) + k, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for k, s in enumerate(specials)
    ]
    gpt4_split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    prefix = [{"SpecialToken": {"id": "[gMASK]", "type_id": 0}}, {"SpecialToken": {"id": "<sop>", "type_id": 0}}]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": gpt4_split}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": prefix + [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": prefix + [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                s: {"id": s, "ids": [added[SPECIAL_TOKENS.index(s)]["id"]], "tokens": [s]} for s in ("[gMASK]", "<sop>")
            },
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": [list(m) for m in merges],
        },
    }


def test_loads_a_glm4_style_hub_file(tmp_path):
    spec = _glm4_style_tokenizer_json()
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    tok = load_tokenizer(tmp_path)
    tok.check_glm_special_tokens()
    base = len(spec["model"]["vocab"])
    assert tok.vocab_size == base + len(SPECIAL_TOKENS) + 2
    assert tok.token_id("[gMASK]") == base + 2
    assert tok.special_ids["<|begin_of_image|>"] == base + 10
    vocab = spec["model"]["vocab"]
    # The template's [gMASK]<sop> prefix is not added: prompts are built explicitly by name.
    assert tok.encode("hello world") == [vocab["hello"], vocab["Ġw"], *[vocab[c] for c in "orld"]]
    assert tok.encode("你") == [vocab["ä½ł"]]
    assert tok.encode("<|user|>") != [tok.token_id("<|user|>")]
    assert tok.encode("<|user|>hello", allow_special=True) == [tok.token_id("<|user|>"), vocab["hello"]]
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text


def test_missing_glm_special_tokens_are_named(tmp_path):
    spec = _glm4_style_tokenizer_json()
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in ("[sMASK]", "<eop>")]
    spec["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path)
    with pytest.raises(OpenGLMError, match=r"\[sMASK\], <eop>"):
        tok.check_glm_special_tokens()
    tok.check_glm_special_tokens(["[gMASK]", "<sop>"])


def test_read_texts_formats(tmp_path):
    lines = ["第一行\n", "second line\n", "\n"]
    records = [{"text": "一\n二", "lang": "zh"}, {"text": "three"}]
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "\n"
    (tmp_path / "a.txt").write_text("".join(lines), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(jsonl, encoding="utf-8")
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress("".join(lines).encode()))
    (tmp_path / "d.jsonl.xz").write_bytes(lzma.compress(jsonl.encode()))
    assert list(read_texts([tmp_path / "a.txt", tmp_path / "c.txt.gz"])) == ["第一行", "second line"] * 2
    assert list(read_texts([tmp_path / "b.jsonl", tmp_path / "d.jsonl.xz"])) == ["一\n二", "three"] * 2
    assert list(read_texts([tmp_path / "d.jsonl.xz", tmp_path / "a.txt"], max_chars=5)) == ["一\n二", "th"]


def test_read_texts_progress_counts_bytes_of_all_files(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("a\n" * 100)
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"b\n" * 100))
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert len(list(read_texts(sorted(tmp_path.iterdir()), progress=True))) == 200
    assert f"{total}/{total}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("bad.txt", b"fine\nbad \xff byte\n", r"bad.txt:2: invalid UTF-8"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', r"bad.jsonl:2: invalid JSON"),
        ("bad.jsonl.gz", gzip.compress(b'{"text": "a"}\n{"txt": "b"}\n'), r"bad.jsonl.gz:2: no string \"text\""),
        ("bad.txt.xz", b"not xz at all", r"bad.txt.xz: cannot read"),
    ],
)
def test_read_texts_errors_name_file_and_line(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(OpenGLMError, match=message):
        list(read_texts([tmp_path / name]))


def test_train_errors(tmp_path):
    with pytest.raises(OpenGLMError, match="no input file"):
        list(read_texts([tmp_path / "absent.txt"]))
    with pytest.raises(OpenGLMError, match="no text"):
        train_tokenizer(["", ""], vocab_size=400)
    with pytest.raises(OpenGLMError, match="too small"):
        train_tokenizer(CORPUS, vocab_size=100)
    # A bad line met while training stops training with the reader's error.
    (tmp_path / "bad.txt").write_bytes(b"good text\n" * 50 + b"\xfe\n")
    with pytest.raises(OpenGLMError, match="bad.txt:51"):
        train_tokenizer(read_texts([tmp_path / "bad.txt"]), vocab_size=300)


def test_cli_train_then_encode(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl.gz"
    corpus.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in CORPUS).encode()))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "350", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    tok = load_tokenizer(out)
    assert f"vocab size {tok.vocab_size}" in printed and str(out / "tokenizer.json") in printed
    assert tok.vocab_size == 350

    assert main(["tokenizer", "encode", "--tokenizer", str(out), "明月<|user|>"]) == 0
    printed = capsys.readouterr().out
    assert str(tok.encode("明月<|user|>")) in printed
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--allow-special", "<|user|>"]) == 0
    assert f"1 tokens: [{tok.token_id('<|user|>')}]" in capsys.readouterr().out


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    argv = ["tokenizer", "train", "--vocab-size", "300", "-o", str(tmp_path / "out"), "--input"]
    assert main(argv + [str(tmp_path / "x.txt")]) == 1
    assert "no input file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(argv + [str(tmp_path / "empty.jsonl")]) == 1
    assert "empty.jsonl: no documents" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
