"""Expert parallelism under torchrun (gloo on CPU): the experts sharded over processes train like one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import openglm
from openglm.cli import main
from openglm.train import checkpointing
from openglm.train.loop import pretrain

# A MoE layer (8 experts, top 3 in 1 of 2 groups, a non-zero correction bias) run on each process's own
# tokens with its experts sharded, against the whole layer on all tokens in one process: the output and
# every gradient (the replicated ones summed over processes).
LAYER = """
import copy, json, sys
import torch, torch.distributed as dist, torch.nn as nn
from openglm.config import Config
from openglm.model.glm import MoE
from openglm.train.expert_parallel import ExpertParallel
from openglm.train.parallel import init_distributed, shutdown_distributed

size = int(sys.argv[1])
world = init_distributed("cpu")
W, r = world.world_size, world.rank
config = Config.from_name("glm-4.5-air-debug", num_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1)
torch.manual_seed(0)
full = nn.ModuleDict({"moe": MoE(config)})
for p in full.parameters():
    nn.init.normal_(p, std=0.2)
full["moe"].gate.e_score_correction_bias.normal_(std=0.1)
x = torch.randn(W, 13, 5, config.hidden_size)  # (W, B, T, C): each process its own 13 x 5 tokens
w = torch.randn_like(x)
sharded = copy.deepcopy(full)
ep = ExpertParallel.shard(sharded, size, world)
want_y = full["moe"](x.flatten(0, 1))
(want_y * w.flatten(0, 1)).sum().backward()
y = sharded["moe"](x[r])
(W * (y * w[r]).sum()).backward()  # the objective is scaled by W, as train_step scales it for DDP's average
ep.reduce_gradients()
want = dict(full.named_parameters())
err = {"output": ((y - want_y.view(x.shape)[r]).abs().max() / want_y.abs().max()).item()}
for name, p in sharded.named_parameters():
    if name.startswith("moe.experts."):
        n = p.shape[0]
        assert n == 8 // size
        g, ref = p.grad, want[name].grad[ep.index * n : (ep.index + 1) * n]
    else:
        g, ref = p.grad / W, want[name].grad
        dist.all_reduce(g)
    err[name] = ((g - ref).abs().max() / ref.abs().max()).item()
open(f"{sys.argv[2]}/rank{r}.json", "w").write(json.dumps(err))
shutdown_distributed()
"""

ARGS = ["--config", "glm-4.5-air-debug", "--set", "num_layers=3", "--steps", "4", "--batch-size", "4",
        "--seq-len", "64", "--lr", "3e-3", "--warmup", "2", "--eval-every", "2", "--eval-tokens", "256",
        "--log-every", "1", "--balance-rate", "0.01", "--no-progress"]
RTOL = 1e-5  # different matmul blockings and the gradient reductions round differently


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,size", [(2, 2), (4, 2)])
def test_sharded_experts_compute_what_one_process_does(nproc, size, tmp_path):
    script = tmp_path / "layer.py"
    script.write_text(LAYER, encoding="utf-8")
    done = torchrun(nproc, str(script), str(size), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(nproc):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(errors) == 6 and max(errors.values()) < 1e-5, (rank, errors)  # output, 2 experts, router, shared


@pytest.mark.slow
def test_expert_parallel_training_matches_one_process_and_resumes(data_dir, settings, tmp_path):
    single = tmp_path / "single"
    pretrain(settings(single, config="glm-4.5-air-debug", overrides=["num_layers=3"], balance_rate=0.01, steps=4,
                      lr=3e-3, warmup=2, eval_every=2, eval_tokens=256))
    run = tmp_path / "ep"
    train = ["-m", "openglm", "pretrain", "--data", str(data_dir), "-o", str(run), *ARGS, "--expert-parallel", "2"]
    for extra in (["--stop-after", "2"], ["--resume"]):
        done = torchrun(2, *train, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    got, want = records(run), records(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 2, 3, 4, 4]
    for g, w in zip(got, want):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=RTOL), (key, g, w)
        assert g.get("moe_load") == w.get("moe_load")
    # The checkpoint holds the full experts (and their AdamW moments) in the one-process layout.
    (got_w, got_opt, _), (want_w, want_opt, _) = (checkpointing.load_checkpoint(r / "checkpoint")
                                                  for r in (run, single))
    assert {k: v.shape for k, v in got_w.items()} == {k: v.shape for k, v in want_w.items()}
    experts = [k for k in want_w if ".mlp.experts." in k]
    assert len(experts) == 4 and want_w[experts[0]].shape[0] == 8
    for k in experts:
        assert got_w[k].allclose(want_w[k], rtol=1e-4, atol=1e-5), k
        for moment in ("exp_avg", "exp_avg_sq"):
            assert got_opt["state"][k][moment].shape == want_opt["state"][k][moment].shape
    model = openglm.load_model(run / "model")
    ids = torch.arange(48).remainder(model.config.vocab_size)[None]
    with torch.no_grad():
        assert model(ids).allclose(openglm.load_model(single / "model")(ids), rtol=1e-4, atol=1e-4)
    # A one-process checkpoint resumes with the experts sharded, and goes on as one process would.
    mixed = tmp_path / "mixed"
    pretrain(settings(mixed, config="glm-4.5-air-debug", overrides=["num_layers=3"], balance_rate=0.01, steps=4,
                      lr=3e-3, warmup=2, eval_every=2, eval_tokens=256, stop_after=2))
    done = torchrun(2, *train[:train.index("-o") + 1], str(mixed), *ARGS, "--expert-parallel", "2", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r.get("loss") for r in records(mixed)] == pytest.approx([r.get("loss") for r in want], rel=RTOL)


def test_expert_parallel_needs_a_moe_model_and_processes(data_dir, tmp_path, capsys):
    base = ["pretrain", "--data", str(data_dir), "-o", str(tmp_path / "run"), "--steps", "2", "--warmup", "1",
            "--batch-size", "2", "--seq-len", "32", "--no-progress"]
    for config, n, message in (("glm-tiny-debug", "2", "needs a mixture-of-experts model; glm-tiny-debug is dense"),
                               ("glm-4.5-air-debug", "2", "--expert-parallel 2 must divide the 1 processes"),
                               ("glm-4.5-air-debug", "0", "--expert-parallel must be >= 1, got 0")):
        code = main([*base, "--config", config, "--expert-parallel", n])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("openglm: error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_full_finetuning_with_expert_parallel_and_accumulation_matches_one_process(tokenizer, tmp_path):
    from openglm import Config, GLMForCausalLM, save_model
    from openglm.train.finetune import FinetuneSettings, finetune

    config = Config.from_name("glm-4.5-air-debug", num_layers=3, vocab_size=tokenizer.vocab_size,
                              eos_token_id=[tokenizer.eos_id], pad_token_id=tokenizer.eos_id)
    base = save_model(GLMForCausalLM.from_config(config, seed=0), tmp_path / "base", tokenizer=tokenizer)
    colours = ["red", "blue", "green", "black"]
    chats = [{"messages": [{"role": "user", "content": f"Say {c}."}, {"role": "assistant", "content": f"{c} {c}"}]}
             for c in colours * 6]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    args = dict(steps=3, batch_size=4, grad_accum=2, seq_len=64, lr=3e-3, warmup=1, eval_every=0, save_every=0,
                log_every=1, balance_rate=0.01)
    finetune(FinetuneSettings(model=str(base), data=str(data), out=str(tmp_path / "single"), threads=1,
                              progress=False, **args))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    done = torchrun(2, "-m", "openglm", "finetune", str(base), "--data", str(data), "-o", str(tmp_path / "ep"),
                    *flags, "--expert-parallel", "2", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = records(tmp_path / "ep"), records(tmp_path / "single")
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert (g["loss"], g["grad_norm"]) == pytest.approx((w["loss"], w["grad_norm"]), rel=RTOL), (g, w)
        assert g["moe_load"] == w["moe_load"]
    ids = torch.arange(40).remainder(config.vocab_size)[None]
    with torch.no_grad():
        got_logits, want_logits = (openglm.load_model(tmp_path / r / "model")(ids) for r in ("ep", "single"))
    assert got_logits.allclose(want_logits, rtol=1e-4, atol=1e-4)
