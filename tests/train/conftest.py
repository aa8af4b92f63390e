"""A tiny prepared corpus (train/ and val/ token shards) built with the real `openglm data prepare` code."""

from __future__ import annotations

import json

import pytest

EN = [
    "The General Language Model fills blanks in text.",
    "It reads the context in both directions.",
    "Then it writes the missing span from left to right!",
    "Does a small model learn this quickly?",
]
ZH = [
    "通用语言模型通过自回归空白填充进行预训练。",
    "它双向读取上下文！",
    "然后从左到右生成缺失的片段？",
]


def documents(n: int, offset: int = 0) -> list[str]:
    """``n`` short documents of a few sentences each, cycling through a fixed vocabulary."""
    sentences = EN + ZH
    return [" ".join(sentences[(i + j) % len(sentences)] for j in range(2 + i % 4))
            for i in range(offset, offset + n)]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from openglm.data.prepare import prepare
    from openglm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pretrain-data")
    train_tokenizer(documents(40), vocab_size=400).save(root / "tok")
    for split, docs in (("train", documents(60)), ("val", documents(8, offset=3))):
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
        prepare([path], root / "tok", root / "data", split=split, workers=1, shard_tokens=500)
    return root / "data"


@pytest.fixture
def settings(data_dir):
    """``settings(out, **overrides)``: a few-second run of glm-tiny-debug on the tiny corpus, 1 thread."""
    from openglm.train.settings import PretrainSettings

    def make(out, **overrides) -> PretrainSettings:
        base = dict(config="glm-tiny-debug", data=str(data_dir), out=str(out), steps=8, batch_size=4, seq_len=64,
                    lr=3e-3, warmup=2, eval_every=4, eval_tokens=256, save_every=100, log_every=1, threads=1,
                    progress=False)
        return PretrainSettings(**{**base, **overrides})

    return make
