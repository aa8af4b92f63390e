"""Continuous batching of latent-attention models (GLM-4.7-Flash ``glm4_moe_lite``, GLM-5 ``glm_moe_dsa``) over
slots of the latent cache, and ``openglm serve`` serving one."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from openglm import Config, GLMForCausalLM, SamplingParams, load_model, save_model
from openglm.infer.generate import generate_steps
from openglm.serve.engine import Engine, EngineRequest, SlotLatentKVCache

from live_server import ServerProcess

PROMPTS = ["The General", "通用语言模型通过自回归", "Numbers like 2022 and 130 appear too, as do symbols", "It", "blank"]


def mla_model(name: str, tokenizer):
    # 16 indexer heads keep exact index ties (kept or not as topk chooses, see Indexer) rare.
    extra = {"index_n_heads": 16, "index_topk": 6} if name == "glm-5-debug" else {}
    config = Config.from_name(name, vocab_size=tokenizer.vocab_size, eos_token_id=[tokenizer.eos_id],
                              pad_token_id=tokenizer.eos_id, **extra)
    model = GLMForCausalLM.from_config(config, seed=0)
    with torch.no_grad():  # larger weights than the init so that tokens (and experts, and chosen keys) depend on the inputs
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
        model.lm_head.weight[tokenizer.eos_id] = 0  # greedy runs do not stop at their first token
    return model.eval()


@pytest.mark.parametrize("name", ["glm-4.7-flash-debug", "glm-5-debug"])
@pytest.mark.parametrize("packed", [True, False])
def test_requests_joining_mid_batch_match_single_generation(tokenizer, name, packed, monkeypatch):
    if not packed:
        monkeypatch.setattr(Engine, "PACK_MAX_TOKENS", 0)
    model = mla_model(name, tokenizer)
    prompts, lengths = [tokenizer.encode(p) for p in PROMPTS], [12, 5, 9, 14, 7]
    greedy = [SamplingParams(max_new_tokens=n, temperature=0) for n in lengths]
    expected = [[s.token for s in generate_steps(model, tokenizer, [ids], g)] for ids, g in zip(prompts, greedy)]

    async def main():
        engine = Engine(model, tokenizer, max_batch_size=3, prefill_chunk=3, max_seq_len=128)
        assert isinstance(engine.core.runner.cache, SlotLatentKVCache)
        engine.start()
        try:
            handles, head = [], []
            for ids, g in zip(prompts, greedy):
                handles.append(engine.submit(EngineRequest(ids, g)))
                event = await anext(handles[0], None)  # let the batch advance between arrivals
                head += [event] if event else []
            results = [await h.result() for h in handles]
            return head, results, engine.packed_steps
        finally:
            engine.stop()

    head, results, packed_steps = asyncio.run(main())
    results[0] = (head + results[0][0], results[0][1])
    assert (packed_steps > 0) == packed
    assert [[e.token for e in events] for events, _ in results] == expected


@pytest.mark.parametrize("name", ["glm-4.7-flash-debug", "glm-5-debug"])
def test_a_shared_prompt_prefix_is_copied_between_slots_of_the_latent_cache(tokenizer, name):
    # The second request's prefix comes from the first's slot while the first runs: the latents (and,
    # for sparse attention, the indexer keys) copied, its tokens those it gets alone.
    model = mla_model(name, tokenizer)
    system = tokenizer.encode(PROMPTS[2])
    first, second = system + tokenizer.encode(" What?"), system + tokenizer.encode(" Who?")
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    expected = [s.token for s in generate_steps(model, tokenizer, [second], greedy)]

    async def main():
        engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=128, preempt_tokens=0)
        engine.start()
        try:
            one = engine.submit(EngineRequest(first, SamplingParams(max_new_tokens=20, temperature=0)))
            await anext(one)
            events, _ = await engine.submit(EngineRequest(second, greedy)).result()
            await one.result()
            return [e.token for e in events], engine.core.prefix_tokens
        finally:
            engine.stop()

    tokens, reused = asyncio.run(main())
    assert reused >= len(system) and tokens == expected


def test_openglm_serve_serves_a_latent_attention_checkpoint(tokenizer, tmp_path):
    from openglm.serve.store import Store

    checkpoint = save_model(mla_model("glm-4.7-flash-debug", tokenizer), tmp_path / "flash", tokenizer=tokenizer)
    url = f"sqlite:///{tmp_path / 'mla.db'}"
    with Store(url) as store:
        store.set_price("tiny", 1_000_000, 2_000_000)
        _, secret = store.create_key(store.create_account("mla", 10**9).id)
    model = load_model(checkpoint)
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    expected = ["".join(s.text for s in generate_steps(model, tokenizer, [tokenizer.encode(p)], greedy)) for p in PROMPTS]

    async def clients(base: str):
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=120) as c:
            async def one(i: int, prompt: str):
                await asyncio.sleep(0.05 * i)
                return await c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                                              "temperature": 0})
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    server = ServerProcess(checkpoint, url, "--max-batch-size", "3")
    try:
        server.wait_ready()
        responses = asyncio.run(clients(server.url))
    finally:
        server.stop()
    assert [r.status_code for r in responses] == [200] * len(PROMPTS)
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
