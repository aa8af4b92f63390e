"""Shared fixtures: a tiny bilingual tokenizer and tiny checkpoints built in the test session."""

from __future__ import annotations

import pytest
import torch

TEXT = (
    "The General Language Model fills blanks in text. It reads the text around each blank in both "
    "directions, then writes the missing span from left to right. "
    "通用语言模型通过自回归空白填充进行预训练。它双向读取上下文，然后从左到右生成缺失的片段。"
    "Numbers like 2022 and 130 appear too, as do symbols: (a + b) * c = 42! "
) * 8


@pytest.fixture(scope="session")
def tokenizer():
    from openglm.data.tokenizer import train_tokenizer

    return train_tokenizer([TEXT], vocab_size=400)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A saved glm4-debug model (random weights) with its tokenizer: a real checkpoint directory."""
    from openglm import Config, GLMForCausalLM, save_model

    config = Config.from_name("glm-tiny-debug", vocab_size=tokenizer.vocab_size, eos_token_id=[tokenizer.eos_id],
                              pad_token_id=tokenizer.eos_id)
    model = GLMForCausalLM.from_config(config, seed=0)
    with torch.no_grad():  # larger weights than the init so that outputs depend clearly on inputs
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
        # A zero output row gives <|endoftext|> logit 0, below the largest of the other random logits,
        # so greedy runs do not end at their first token.
        model.lm_head.weight[tokenizer.eos_id] = 0
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=tokenizer)
