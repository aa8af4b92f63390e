"""Supervised fine-tuning: loss masking, packing, full and LoRA training, exact resume, merging."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import openglm
from openglm.data.chat import chat_template_of, end_of_turn_ids, render_chat
from openglm.data.objective import IGNORE_INDEX, collate, pack
from openglm.errors import OpenGLMError
from openglm.train.finetune import (
    ChatBatches,
    FinetuneSettings,
    finetune,
    merge_adapter,
    pack_in_order,
    tokenize_conversation,
)
from openglm.train.run import PretrainLoss

COLOURS = ["red", "blue", "green", "black", "white", "yellow"]


def conversation(i: int) -> dict:
    """A learnable pattern: the answer repeats the colour in the question, sometimes over two turns."""
    a, b = COLOURS[i % len(COLOURS)], COLOURS[(i * 5 + 1) % len(COLOURS)]
    messages = [{"role": "user", "content": f"Say {a}."}, {"role": "assistant", "content": f"{a} {a}"}]
    if i % 3 == 0:
        messages = [{"role": "system", "content": "You repeat colours."}, *messages,
                    {"role": "user", "content": f"Now {b}."}, {"role": "assistant", "content": f"{b} {b}"}]
    return {"messages": messages}


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    for name, ids in (("train", range(48)), ("val", range(100, 112))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(conversation(i)) + "\n" for i in ids))
    return root / "train.jsonl", root / "val.jsonl"


@pytest.fixture
def settings(tiny_checkpoint, chat_files, tmp_path):
    def make(out="run", **kw):
        base = dict(model=str(tiny_checkpoint), data=str(chat_files[0]), val=str(chat_files[1]),
                    out=str(tmp_path / out),
                    steps=30, batch_size=4, seq_len=96, lr=3e-3, warmup=3, eval_every=0, save_every=0,
                    log_every=1, threads=1, progress=False)
        return FinetuneSettings(**{**base, **kw})
    return make


def val_losses(run_dir) -> list[float]:
    lines = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in lines if "val_loss" in r]


def test_only_assistant_tokens_are_targets(tokenizer):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Numbers like 2022"},
                         {"role": "assistant", "content": "text in both"}, {"role": "user", "content": "symbols"},
                         {"role": "assistant", "content": "blanks"}]}
    sample = tokenize_conversation(tokenizer, conv)
    ids, mask = render_chat(tokenizer, conv["messages"])
    assert sample.input_ids.tolist() == ids and sample.prefix_len == 0
    trained = sample.targets[sample.targets != IGNORE_INDEX].tolist()
    user, eos = tokenizer.token_id("<|user|>"), tokenizer.token_id("<|endoftext|>")
    # exactly: each answer (with the newline the template puts after <|assistant|>), then the token ending its turn
    assert trained == tokenizer.encode("\ntext in both") + [user] + tokenizer.encode("\nblanks") + [eos]
    # every target is the next input token, predicted at the position before it
    positions = np.flatnonzero(sample.targets != IGNORE_INDEX)
    assert (sample.input_ids[positions + 1] == sample.targets[positions]).all()
    assert [mask[p + 1] for p in positions] == [1] * len(positions)


def test_loss_counts_assistant_tokens_only(tiny_checkpoint, tokenizer):
    model = openglm.load_model(tiny_checkpoint)
    sample = tokenize_conversation(tokenizer, conversation(0))
    batch = collate([pack([sample], len(sample), tokenizer.eos_id)])
    with torch.no_grad():
        loss = PretrainLoss(model)(batch["input_ids"], batch["position_ids_1d"], batch["attention_mask"],
                                   batch["targets"])
        logits = model(batch["input_ids"])[0]  # (T, vocab), plain causal
    keep = torch.from_numpy(sample.targets != IGNORE_INDEX)
    expected = F.cross_entropy(logits[keep], torch.from_numpy(sample.targets)[keep], reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-3)


def test_packed_rows_give_each_conversation_its_own_loss(tiny_checkpoint, tokenizer):
    model = openglm.load_model(tiny_checkpoint)
    samples = [tokenize_conversation(tokenizer, conversation(i)) for i in range(3)]
    seq_len = sum(len(s) for s in samples) + 5  # with padding at the end
    packed = collate([pack(samples, seq_len, tokenizer.eos_id)])
    assert packed["position_ids_1d"][0, len(samples[0])] == 0  # positions restart per conversation
    with torch.no_grad():
        logits = model(packed["input_ids"], packed["position_ids_1d"], packed["attention_mask"])[0]
        start = 0
        for s in samples:
            alone = model(torch.from_numpy(s.input_ids)[None])[0]  # (T, vocab)
            torch.testing.assert_close(logits[start : start + len(s)], alone, rtol=1e-4, atol=1e-4)
            start += len(s)


def test_chat_batches_pack_every_conversation_once_per_epoch(tokenizer):
    samples = [tokenize_conversation(tokenizer, conversation(i)) for i in range(10)]
    with pytest.raises(OpenGLMError, match="longer than a row"):
        ChatBatches(samples, 64, tokenizer.eos_id)
    loader = ChatBatches(samples, 96, tokenizer.eos_id, seed=1)
    starts = 0
    while loader.epoch == 0:
        row = loader.next_row()
        assert len(row.input_ids) == 96
        starts += int((row.input_ids == tokenizer.token_id("[gMASK]")).sum())
    assert starts >= len(samples)  # the epoch's conversations, and the next epoch's first ones
    state = loader.state_dict()
    after = [loader.next_row().input_ids.tolist() for _ in range(3)]
    loader.load_state_dict(state)
    assert [loader.next_row().input_ids.tolist() for _ in range(3)] == after
    rows = pack_in_order(samples, 96, tokenizer.eos_id)
    assert sum(int((r.targets != IGNORE_INDEX).sum()) for r in rows) == sum(
        int((s.targets != IGNORE_INDEX).sum()) for s in samples)


def test_full_finetuning_lowers_val_loss_and_saves_a_chat_checkpoint(settings, tokenizer):
    s = settings()
    result = finetune(s)
    assert result.step == 30 and not result.interrupted
    losses = val_losses(s.out)  # before training, then at the end
    assert len(losses) == 2 and losses[1] < losses[0] - 1.0, losses
    out = Path(s.out) / "model"
    model = openglm.load_model(out)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == end_of_turn_ids(tokenizer) == model.config.eos_token_id
    assert chat_template_of(out) == chat_template_of(s.model)
    assert openglm.load_tokenizer(out).vocab_size == tokenizer.vocab_size


def test_lora_lowers_val_loss_and_merges_into_a_plain_checkpoint(settings, tmp_path):
    from peft import PeftModel

    s = settings(lora=True, lora_r=4, lora_alpha=8, lr=1e-2)
    finetune(s)
    losses = val_losses(s.out)
    assert losses[1] < losses[0] - 0.5, losses
    adapter = Path(s.out) / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert not any("base_layer" in k for k in
                   load_file(Path(s.out) / "checkpoint" / "model.safetensors"))
    merged_dir = merge_adapter(s.out, tmp_path / "merged")
    merged = openglm.load_model(merged_dir)
    peft_model = PeftModel.from_pretrained(openglm.load_model(s.model), str(adapter)).eval()
    x = torch.randint(0, merged.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), peft_model.base_model.model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(x), openglm.load_model(Path(s.out) / "model")(x))
        assert not torch.allclose(merged(x), openglm.load_model(s.model)(x))  # the adapters did something


def test_resume_is_bit_exact(settings):
    full = settings("full", steps=6, lora=True, lora_dropout=0.1)  # dropout: the RNG state must resume too
    finetune(full)
    part = settings("part", steps=6, lora=True, lora_dropout=0.1, stop_after=3)
    assert finetune(part).step == 3
    assert finetune(settings("part", steps=6, lora=True, lora_dropout=0.1, resume=True)).step == 6
    a = load_file(Path(full.out) / "checkpoint" / "model.safetensors")
    b = load_file(Path(part.out) / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trace = lambda d: [json.loads(ln).get("loss") for ln in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    assert trace(full.out) == trace(part.out)


def test_refuses_to_overwrite_a_run_and_bad_targets(settings):
    finetune(settings(steps=1, warmup=1))
    with pytest.raises(OpenGLMError, match="--resume"):
        finetune(settings(steps=1, warmup=1))
    with pytest.raises(OpenGLMError, match="no module named nope"):
        finetune(settings("other", steps=1, warmup=1, lora=True, lora_targets="q_proj,nope"))


def test_cli_trains_lora_then_merges(settings, tokenizer, tmp_path):
    from openglm.cli import main

    s = settings()
    assert main(["finetune", s.model, "--data", s.data, "-o", s.out, "--steps", "2", "--warmup", "1",
                 "--batch-size", "2", "--seq-len", "96", "--lora", "--no-merge", "--save-every", "0", "--eval-every", "0",
                 "--threads", "1", "--no-progress"]) == 0
    assert not (Path(s.out) / "model").exists()
    assert main(["finetune", "merge", s.out, "-o", str(tmp_path / "merged")]) == 0
    assert openglm.load_model(tmp_path / "merged").config.eos_token_id == end_of_turn_ids(tokenizer)


def test_tool_calls_are_trained_and_tool_results_are_not(tokenizer):
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find a number",
                                               "parameters": {"type": "object", "properties": {}}}}]
    call = {"type": "function", "function": {"name": "lookup", "arguments": json.dumps({"q": "blank"})}}
    conv = {"tools": tools, "messages": [
        {"role": "user", "content": "Numbers like 2022?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "symbols 130"},
        {"role": "assistant", "content": "It is 130."}]}
    sample = tokenize_conversation(tokenizer, conv)
    trained = tokenizer.decode(sample.targets[sample.targets != IGNORE_INDEX].tolist())
    assert "lookup" in trained and "blank" in trained and "It is 130." in trained
    assert "symbols" not in trained and "2022" not in trained


def long_conversation() -> dict:
    turns = []
    for i in range(12):
        a = COLOURS[i % len(COLOURS)]
        turns += [{"role": "user", "content": f"Say {a}."}, {"role": "assistant", "content": f"{a} {a}"}]
    return {"messages": [{"role": "system", "content": "You repeat colours."}, *turns]}


def test_truncate_keeps_the_system_turn_or_the_start(tokenizer):
    from openglm.data.chat import render_chat

    conv = long_conversation()
    full = tokenize_conversation(tokenizer, conv)
    opening = render_chat(tokenizer, conv["messages"][:1])[0]
    assert len(full) > 96 and full.input_ids[: len(opening)].tolist() == opening
    left = tokenize_conversation(tokenizer, conv, max_len=96, truncate="left")
    right = tokenize_conversation(tokenizer, conv, max_len=96, truncate="right")
    assert len(left) == len(right) == 96
    # left: the system turn, then the latest tokens (the conversation's end, its last answer trained on)
    assert left.input_ids[: len(opening)].tolist() == opening
    assert left.input_ids[len(opening):].tolist() == full.input_ids[len(full) - (96 - len(opening)):].tolist()
    assert left.targets[len(opening):].tolist()[:-1] == full.targets[len(full) - (96 - len(opening)):].tolist()[:-1]
    # right: the beginning
    assert right.input_ids.tolist() == full.input_ids[:96].tolist()
    for sample in (left, right):
        assert (sample.targets != IGNORE_INDEX).any()
    # without a system turn the opening is [gMASK]<sop>
    no_system = {"messages": conv["messages"][1:]}
    cut = tokenize_conversation(tokenizer, no_system, max_len=96, truncate="left")
    full = tokenize_conversation(tokenizer, no_system)
    assert cut.input_ids[:2].tolist() == [tokenizer.token_id("[gMASK]"), tokenizer.token_id("<sop>")]
    assert cut.input_ids[2:].tolist() == full.input_ids[len(full) - 94:].tolist()


def test_finetune_counts_truncated_and_left_out(settings, chat_files, tmp_path, capsys):
    data = tmp_path / "with-long.jsonl"
    data.write_text(chat_files[0].read_text() + json.dumps(long_conversation()) + "\n")
    kept = finetune(settings("kept", data=str(data), steps=1, warmup=1, truncate="left", eval_every=0))
    assert (kept.truncated, kept.skipped) == (1, 0)
    assert "49 conversations, 1 truncated (left), 0 left out" in capsys.readouterr().err
    dropped = finetune(settings("dropped", data=str(data), steps=1, warmup=1, eval_every=0))
    assert (dropped.truncated, dropped.skipped) == (0, 1)
    assert "48 conversations, 0 truncated (off), 1 left out" in capsys.readouterr().err


def test_finetune_logs_to_tensorboard(settings):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = settings("tracked", steps=4, warmup=1, eval_every=2, log_to="tensorboard")
    finetune(s)
    events = EventAccumulator(str(Path(s.out) / "tensorboard")).Reload()
    records = [json.loads(ln) for ln in (Path(s.out) / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        want = {r["step"]: r[key] for r in records if key in r}
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx(want, rel=1e-6), key
    assert sorted(e.step for e in events.Scalars("val_loss")) == [0, 2, 4]  # from before the first step


def test_validation_set_does_not_depend_on_the_batch_size(tokenizer, chat_files, settings):
    import torch

    from openglm.train.finetune import _validation_batches, tokenize_file
    from openglm.train.parallel import Distributed

    samples = tokenize_file(chat_files[1], tokenizer, None, 96, False).samples
    world = Distributed(0, 1, 0, torch.device("cpu"))
    pad = tokenizer.token_id("<|endoftext|>")
    seen = set()
    for batch_size in (1, 2, 4):
        batches, targets = _validation_batches(samples, settings(batch_size=batch_size, eval_tokens=200), pad, world,
                                               False)
        ids = torch.cat([b[0] for b in batches])
        seen.add((tuple(ids[ids != pad].tolist()), targets))
    assert len(seen) == 1 and next(iter(seen))[1] > 0  # the same 3 rows of 96 tokens each time


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, tokenizer):
    """A saved glm-4.5-air-debug model (one dense layer, then two of 8 experts) with the test tokenizer."""
    from openglm import Config, GLMForCausalLM, save_model

    config = Config.from_name("glm-4.5-air-debug", num_layers=3, vocab_size=tokenizer.vocab_size,
                              eos_token_id=[tokenizer.eos_id], pad_token_id=tokenizer.eos_id)
    model = GLMForCausalLM.from_config(config, seed=0)
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "moe", tokenizer=tokenizer)


def test_full_finetuning_balances_moe_experts_and_resumes_exactly(settings, moe_checkpoint):
    def run(out, **kw):
        return finetune(settings(out, model=str(moe_checkpoint), steps=6, grad_accum=2, balance_rate=0.01,
                                 aux_loss_coef=0.01, **kw))

    run("full")
    assert run("part", stop_after=3).step == 3
    assert run("part", resume=True).step == 6
    a = load_file(Path(settings("full").out) / "checkpoint" / "model.safetensors")
    b = load_file(Path(settings("part").out) / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    biases = [a[k] for k in a if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(b.abs().max() > 0.01 for b in biases)  # 6 steps of +-0.01
    lines = [json.loads(ln) for ln in (Path(settings("full").out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == 6 and all(len(r["moe_load"]) == 2 and r["moe_imbalance"] >= 1.0 for r in steps)
    assert all(r["moe_aux_loss"] > 0 for r in steps)
    part = [json.loads(ln) for ln in (Path(settings("part").out) / "metrics.jsonl").read_text().splitlines()]
    assert [(r.get("loss"), r.get("moe_load")) for r in part] == [(r.get("loss"), r.get("moe_load")) for r in lines]


def test_balancing_is_refused_with_lora_and_on_dense_models(settings, moe_checkpoint):
    with pytest.raises(OpenGLMError, match="needs full fine-tuning"):
        finetune(settings("lora", model=str(moe_checkpoint), steps=1, warmup=1, lora=True, balance_rate=0.01))
    with pytest.raises(OpenGLMError, match="mixture-of-experts models only"):
        finetune(settings("dense", steps=1, warmup=1, balance_rate=0.01))
    with pytest.raises(OpenGLMError, match="--aux-loss-coef needs full fine-tuning"):
        finetune(settings("lora", model=str(moe_checkpoint), steps=1, warmup=1, lora=True, aux_loss_coef=0.01))
    # LoRA on an MoE model logs the loads, with the biases left alone (the adapters could not carry them)
    run = settings("lora-ok", model=str(moe_checkpoint), steps=2, warmup=1, lora=True, merge=False)
    finetune(run)
    lines = [json.loads(ln) for ln in (Path(run.out) / "metrics.jsonl").read_text().splitlines()]
    assert all("moe_imbalance" in r for r in lines if "loss" in r)
