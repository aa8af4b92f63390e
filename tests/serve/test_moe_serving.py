"""``openglm serve --model`` serves a mixture-of-experts (glm4_moe) checkpoint with continuous batching."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from openglm import Config, GLMForCausalLM, SamplingParams, load_model, save_model
from openglm.infer.generate import generate_steps

from live_server import ServerProcess

PROMPTS = ["The General", "通用语言模型通过自回归", "Numbers like 2022 and 130 appear too", "It", "(a + b) * c", "blanks"]


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, tokenizer):
    config = Config.from_name("glm-4.5-air-debug", vocab_size=tokenizer.vocab_size, eos_token_id=[tokenizer.eos_id],
                              pad_token_id=tokenizer.eos_id, n_group=2, topk_group=1)
    model = GLMForCausalLM.from_config(config, seed=0)
    with torch.no_grad():  # larger weights than the init so that tokens (and experts) depend on the inputs
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.1)
        model.lm_head.weight[tokenizer.eos_id] = 0  # greedy runs do not stop at their first token
    return save_model(model, tmp_path_factory.mktemp("moe") / "moe", tokenizer=tokenizer)


def test_concurrent_requests_get_what_each_gets_alone(moe_checkpoint, tokenizer, tmp_path):
    from openglm.serve.store import Store

    url = f"sqlite:///{tmp_path / 'moe.db'}"
    with Store(url) as store:
        store.set_price("tiny", 1_000_000, 2_000_000)
        _, secret = store.create_key(store.create_account("moe", 10**9).id)
    model = load_model(moe_checkpoint)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    expected = ["".join(s.text for s in generate_steps(model, tokenizer, [tokenizer.encode(p)], greedy)) for p in PROMPTS]

    async def clients(base: str):
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=120) as c:
            async def one(i: int, prompt: str):
                await asyncio.sleep(0.05 * i)  # requests join a batch that is already decoding
                body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}
                return await c.post("/v1/completions", json=body)
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    server = ServerProcess(moe_checkpoint, url, "--max-batch-size", "4", "--public-metrics")
    try:
        server.wait_ready()
        responses = asyncio.run(clients(server.url))
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        server.stop()
    assert [r.status_code for r in responses] == [200] * len(PROMPTS)
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    assert "num_requests_running" in metrics
