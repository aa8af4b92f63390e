"""The GLM pretraining loop: AdamW, warmup + cosine schedule, accumulation, clipping, exact resume.

``pretrain(PretrainSettings(...))`` trains a model from the config registry on token shards written
by ``openglm data prepare`` and writes into the run directory::

    run.json          the settings of the run
    metrics.jsonl     one line per logged step (loss, lr, grad norm, tokens/s) and per evaluation
    checkpoint/       everything to continue exactly (see ``openglm.train.checkpointing``)
    model/            the latest weights in the Hugging Face layout, with the tokenizer

The loss is the cross-entropy over the target tokens of a whole optimizer step (all micro-batches,
all ranks) divided by their number. The same code runs under ``torchrun`` for DDP or FSDP2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..config import Config
from ..data.objective import IGNORE_INDEX, SpecialIds
from ..errors import OpenGLMError
from . import checkpointing
from .data import PackedBatches, parse_objective, sentence_end_ids
from .loss import linear_cross_entropy
from .parallel import (
    Distributed,
    all_reduce_sum,
    apply_activation_checkpointing,
    decoder_layers,
    gradient_sync,
    init_distributed,
    parallelize,
)
from .settings import PretrainSettings

# Settings that fix the model and the data stream: a resumed run must keep them.
RESUME_FIXED = ("config", "seq_len", "batch_size", "grad_accum", "seed", "objective", "mask_ratio", "append_eos")


@dataclass
class PretrainResult:
    step: int
    loss: float | None  # of the last step run
    val_loss: float | None  # of the last evaluation
    interrupted: bool


class PretrainLoss(nn.Module):
    """``GLMForCausalLM`` -> summed cross-entropy over target tokens; the module that DDP/FSDP wrap.

    Only positions with a target go through the output layer: with blank infilling most of a row is
    Part A, which has none, so this skips most of the ``[B*T, vocab]`` logits. The output layer and
    the loss are fused (``openglm.train.loss``).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, attention_mask, targets) -> torch.Tensor:
        h = self.lm.hidden_states(input_ids, position_ids, attention_mask)  # (B, T, C)
        keep = targets != IGNORE_INDEX  # (B, T)
        return linear_cross_entropy(h[keep], self.lm.lm_head.weight, targets[keep])  # h[keep]: (N, C)


def learning_rate(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Linear warmup over ``warmup`` steps to ``lr``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW with decay on matrices and embeddings only (not biases or norms); fused where supported."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    except RuntimeError:  # no fused kernel for this device or parameter type
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def embedding_gradient_shrink(embedding: nn.Module, alpha: float):
    """GLM-130B's stabiliser ``emb * alpha + emb.detach() * (1 - alpha)``: the forward value is
    unchanged, the embedding gradient is scaled by ``alpha``. Applied by a forward hook."""

    def hook(module, inputs, output):
        return output * alpha + output.detach() * (1 - alpha)

    return embedding.register_forward_hook(hook)


def _tokenizer_sha(tok) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        return hashlib.sha256(tok.save(tmp).read_bytes()).hexdigest()


def _load_data(s: PretrainSettings):
    """``(train TokenShards, val TokenShards or None, tokenizer)``, checking they belong together."""
    from ..data.shards import TokenShards
    from ..data.tokenizer import load_tokenizer

    train = TokenShards(s.data, "train")
    tok = load_tokenizer(s.tokenizer or train.tokenizer_dir)
    manifest = json.loads((Path(s.data) / "manifest.json").read_text(encoding="utf-8"))
    if s.tokenizer and _tokenizer_sha(tok) != manifest["tokenizer"]["sha256"]:
        raise OpenGLMError(f"{s.data} was prepared with another tokenizer ({manifest['tokenizer']['source']}); "
                           f"leave out --tokenizer to use the one stored with the data")
    val = TokenShards(s.data, "val") if "val" in manifest["splits"] else None
    return train, val, tok


def _check_settings(s: PretrainSettings, world: Distributed) -> None:
    if s.steps < 1 or s.batch_size < 1 or s.grad_accum < 1 or s.seq_len < 8:
        raise OpenGLMError("steps, batch size and grad accum must be >= 1 and seq len >= 8")
    if s.batch_size % world.world_size:
        raise OpenGLMError(f"batch size {s.batch_size} must be a multiple of the {world.world_size} processes")
    if not 0.0 < s.emb_shrink <= 1.0:
        raise OpenGLMError(f"--emb-shrink must be in (0, 1], got {s.emb_shrink}")
    if s.bf16 and world.device.type == "cpu" and world.is_main and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("warning: this CPU has no native bfloat16 matmul (AVX512-BF16 or AMX): --bf16 steps run many "
              "times slower than fp32 here", file=sys.stderr)


def _run_settings(s, run_dir: Path, resuming: bool, fixed: tuple[str, ...] = RESUME_FIXED) -> None:
    """Write ``run.json`` from the settings dataclass ``s``, or check that a resumed run keeps the
    settings named in ``fixed``."""
    path = run_dir / "run.json"
    current = dataclasses.asdict(s)
    if resuming and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in fixed if saved.get(k) != current[k]]
        if changed:
            raise OpenGLMError("cannot resume with other model or data settings (" + "; ".join(changed) + ")")
    from ..utils import atomic_write_text

    atomic_write_text(path, json.dumps(current, indent=2) + "\n")


class _StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to save and stop after the current step.

    A second signal interrupts at once.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _batch_inputs(batch: dict, two_d: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(input_ids, position_ids, attention_mask, targets)`` on ``device``; 1D models take the summed positions."""
    positions = batch["position_ids"] if two_d else batch["position_ids_1d"]
    return tuple(t.to(device, non_blocking=True) for t in (batch["input_ids"], positions,
                                                           batch["attention_mask"], batch["targets"]))


def train_step(module: nn.Module, optimizer, micro: list[tuple[dict, int]], lr: float, clip: float,
               world: Distributed, two_d: bool, autocast) -> tuple[float, float]:
    """One optimizer step over the micro-batches ``(batch, global target count)`` of ``next_batch``.

    Returns this rank's summed loss over its targets and the gradient norm before clipping.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Gradients end as d(sum of losses / all targets of the step); DDP and FSDP average over ranks, hence * world.
    scale = world.world_size / max(1, sum(n for _, n in micro))
    loss_sum = 0.0
    for k, (batch, _) in enumerate(micro):
        with gradient_sync(module, k == len(micro) - 1):
            with autocast():
                loss = module(*_batch_inputs(batch, two_d, world.device))
            (loss * scale).backward()
        loss_sum += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), clip if clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, float(grad_norm)


@torch.no_grad()
def evaluate(module: nn.Module, batches: list[tuple], num_targets: int, world: Distributed, autocast) -> float:
    """Mean cross-entropy per target token over the fixed validation batches (all ranks)."""
    module.eval()
    total = 0.0
    for inputs in batches:
        with autocast():
            total += module(*inputs).item()
    module.train()
    (total,) = all_reduce_sum([total], world)
    return total / max(1, num_targets)


def _validation_batches(val, s: PretrainSettings, special, sentence_ends, weights, world, two_d):
    """A fixed validation set: the first ``eval_batches`` batches of the val split, seed 0 (the same for every run)."""
    loader = PackedBatches(val, s.seq_len, special, seed=0, weights=weights, sentence_end_ids=sentence_ends,
                           mask_ratio=s.mask_ratio, append_eos=s.append_eos)
    batches, num_targets = [], 0
    for _ in range(s.eval_batches):
        batch, n = loader.next_batch(s.batch_size, world.rank, world.world_size)
        batches.append(_batch_inputs(batch, two_d, world.device))
        num_targets += n
    return batches, num_targets


def _full_state(module: nn.Module, optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (rank 0 gets them under FSDP; every rank otherwise)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _export(config: Config, model_state: dict, directory: Path, tok) -> None:
    """Save the weights in the Hugging Face layout that ``openglm.load_model`` reads."""
    from ..model.checkpoint import save_model
    from ..model.glm import GLMForCausalLM

    with torch.device("meta"):
        model = GLMForCausalLM(config)
    state = {k.removeprefix("lm."): v for k, v in model_state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    save_model(model, directory, tokenizer=tok)


class _Metrics:
    """``metrics.jsonl``, appended by rank 0 only."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until is not None and path.is_file():
            # Resuming: drop lines logged after the checkpoint, which this run logs again.
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                     if ln.strip() and json.loads(ln)["step"] <= keep_until]
            path.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def resume(found: Path, module: nn.Module, optimizer, loader, strict: bool = True) -> int:
    """Load the checkpoint ``found`` into the module, optimizer, data loader and RNGs; returns its step.

    ``strict=False`` accepts a checkpoint holding only some of the module's weights (LoRA adapters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state, optimizer_state, state = checkpointing.load_checkpoint(found)
    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=strict))
    loader.load_state_dict(state["data"])
    checkpointing.set_rng_state(state["rng"])
    return state["step"]


def run_steps(s, step: int, module: nn.Module, optimizer, loader, world: Distributed, two_d: bool, autocast,
              min_lr: float, val_batches, metrics: _Metrics, save, describe, show: bool,
              eval_first: bool = False) -> tuple[int, float | None, float | None, bool]:
    """The optimizer-step loop pretraining and fine-tuning share, from ``step`` to ``s.steps``.

    Every ``s.log_every`` steps it logs ``describe(step, loss, lr, grad_norm, steps, seconds, targets)``,
    which returns (metrics record, progress-bar postfix, stderr line) from the interval's steps,
    training seconds and target tokens. It evaluates every ``s.eval_every`` steps and at the end
    (``eval_first``: at the start too), calls ``save(step)`` every ``s.save_every`` steps and at the
    end, and stops early, saved, on Ctrl-C (any process) or after ``s.stop_after`` steps.
    Returns (step, last loss, last validation loss, interrupted).
    """
    from tqdm import tqdm

    bar = tqdm(total=s.steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=None if show else True)

    def run_eval():
        val_loss = evaluate(module, *val_batches, world, autocast)
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        metrics.log(record)
        if world.is_main:
            bar.write(f"step {step}: val loss {val_loss:.4f}, ppl {record['val_ppl']:.2f}")
        return val_loss

    loss = val_loss = None
    interrupted = False
    module.train()
    with _StopRequest() as stop, bar:
        if val_batches and eval_first:
            val_loss = run_eval()
        start_step, interval = step, [0, 0.0, 0]  # steps, training seconds, target tokens since the last log
        while step < s.steps:
            started = time.perf_counter()
            lr = learning_rate(step, s.lr, min_lr, s.warmup, s.steps)
            micro = [loader.next_batch(s.batch_size, world.rank, world.world_size) for _ in range(s.grad_accum)]
            loss_sum, grad_norm = train_step(module, optimizer, micro, lr, s.clip, world, two_d, autocast)
            step += 1
            loss_sum, stop_votes = all_reduce_sum([loss_sum, float(stop.requested)], world)
            num_targets = sum(n for _, n in micro)
            loss = loss_sum / max(1, num_targets)
            interval = [interval[0] + 1, interval[1] + time.perf_counter() - started, interval[2] + num_targets]
            bar.update(1)

            if step % s.log_every == 0 or step == s.steps or stop_votes:
                record, postfix, line = describe(step, loss, lr, grad_norm, *interval)
                interval = [0, 0.0, 0]
                metrics.log(record)
                bar.set_postfix(postfix, refresh=False)
                if bar.disable and world.is_main:
                    print(line, file=sys.stderr, flush=True)
            if val_batches and ((s.eval_every and step % s.eval_every == 0) or step == s.steps):
                val_loss = run_eval()
            if stop_votes:
                interrupted = True
                break
            if s.stop_after and step - start_step >= s.stop_after:
                break
            if s.save_every and step % s.save_every == 0 and step < s.steps:
                save(step)
        save(step)
    return step, loss, val_loss, interrupted


def pretrain(s: PretrainSettings) -> PretrainResult:
    """Train (or, with ``s.resume``, continue) a run; see the module docstring for what it writes."""
    world = init_distributed()
    try:
        return _pretrain(s, world)
    finally:
        if world.world_size > 1:
            torch.distributed.destroy_process_group()


def _pretrain(s: PretrainSettings, world: Distributed) -> PretrainResult:
    _check_settings(s, world)
    if s.threads:
        torch.set_num_threads(s.threads)
    run_dir = Path(s.out)
    found = checkpointing.find_checkpoint(run_dir)
    if found is not None and not s.resume:
        raise OpenGLMError(f"{run_dir} already holds a training checkpoint: pass --resume, or choose a new directory")
    weights = parse_objective(s.objective)
    train, val, tok = _load_data(s)
    special = SpecialIds.from_tokenizer(tok)
    sentence_ends = sentence_end_ids(tok)
    if weights["sentence"] > 0 and not sentence_ends:
        raise OpenGLMError("the tokenizer has none of '。！？.!?\\n' as a single token: give sentence weight 0")

    config = Config.from_name(s.config, eos_token_id=[tok.eos_id], pad_token_id=tok.eos_id)
    if tok.vocab_size > config.vocab_size:
        raise OpenGLMError(f"the tokenizer has {tok.vocab_size} ids but config {s.config!r} only "
                           f"{config.vocab_size} embeddings")
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _run_settings(s, run_dir, resuming=found is not None)

    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    from ..model.glm import GLMForCausalLM

    lm = GLMForCausalLM.from_config(config, device=world.device, seed=s.seed)
    if s.emb_shrink < 1.0:
        embedding_gradient_shrink(lm.model.embed_tokens, s.emb_shrink)
    module = PretrainLoss(lm)
    if s.grad_checkpointing:
        apply_activation_checkpointing(module)
    if s.compile:
        for layer in decoder_layers(module):
            layer.compile()
    module = parallelize(module, s.parallel, world)
    optimizer = build_optimizer(module, s.lr, s.weight_decay, world.device)
    min_lr = s.lr / 10 if s.min_lr is None else s.min_lr

    loader = PackedBatches(train, s.seq_len, special, seed=s.seed, weights=weights, sentence_end_ids=sentence_ends,
                           mask_ratio=s.mask_ratio, append_eos=s.append_eos)
    step = resume(found, module, optimizer, loader) if found is not None else 0
    two_d = config.position_encoding_2d
    autocast = lambda: torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=s.bf16)  # noqa: E731
    val_batches = None
    if val is not None and s.eval_batches > 0:
        val_batches = _validation_batches(val, s, special, sentence_ends, weights, world, two_d)
    metrics = _Metrics(run_dir / "metrics.jsonl", world.is_main, step if found is not None else None)

    def save(step):
        model_state, optimizer_state = _full_state(module, optimizer)
        if world.is_main:
            state = {"step": step, "rng": checkpointing.rng_state(), "data": loader.state_dict(),
                     "settings": dataclasses.asdict(s)}
            checkpointing.save_checkpoint(run_dir, model_state, optimizer_state, state, s.keep_previous)
            _export(config, model_state, run_dir / "model", tok)

    tokens_per_step = s.batch_size * s.grad_accum * s.seq_len

    def describe(step, loss, lr, grad_norm, steps, seconds, targets):
        tokens_per_s = tokens_per_step * steps / max(seconds, 1e-9)  # tokens/s counts training time only
        return ({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": step * tokens_per_step,
                 "tokens_per_s": tokens_per_s},
                {"loss": f"{loss:.4f}", "tok_s": f"{tokens_per_s:,.0f}"},
                f"step {step}/{s.steps} loss {loss:.4f} lr {lr:.2e} grad norm {grad_norm:.3f} "
                f"{tokens_per_s:,.0f} tokens/s")

    step, loss, val_loss, interrupted = run_steps(
        s, step, module, optimizer, loader, world, two_d, autocast, min_lr, val_batches, metrics, save, describe,
        show=s.progress and world.is_main)
    if world.is_main:
        if step < s.steps:
            print(f"stopped at step {step}; checkpoint saved in {run_dir / checkpointing.CHECKPOINT}; "
                  f"continue with --resume", file=sys.stderr)
        else:
            print(f"trained {step} steps; model saved in {run_dir / 'model'}", file=sys.stderr)
    return PretrainResult(step, loss, val_loss, interrupted)
