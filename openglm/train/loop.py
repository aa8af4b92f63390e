"""The GLM pretraining loop: AdamW, warmup + cosine schedule, accumulation, clipping, exact resume.

``pretrain(PretrainSettings(...))`` trains a model (a new one from a config, or existing weights with
``init``) on token shards written by ``openglm data prepare`` and writes into the run directory::

    run.json          the settings of the run, and under "history" what earlier invocations changed
    metrics.jsonl     one line per logged step (loss, lr, grad norm, tokens/s) and per evaluation
    checkpoint/       everything to continue exactly (see ``openglm.train.checkpointing``)
    checkpoint-STEP/  older checkpoints kept by ``keep`` / ``keep_best``
    model/            the latest weights in the Hugging Face layout, with the tokenizer

A run that fails before its first checkpoint removes what it wrote; temporary files left by a killed
run are removed when the next one starts, and a new run never appends to an old run's metrics.

The loss is the cross-entropy over the target tokens of a whole optimizer step (all micro-batches,
all ranks) divided by their number. The same code runs under ``torchrun`` for DDP or FSDP2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
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
from ..data.objective import IGNORE_INDEX, SpecialIds, collate, pack
from ..errors import OpenGLMError
from . import checkpointing
from .balance import LoadBalancer, balance_rate, check_aux_loss_coef
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
    shutdown_distributed,
)
from .settings import PretrainSettings

# Settings that fix the model and the data stream: a resumed run must keep them.
RESUME_FIXED = ("config", "init", "overrides", "seq_len", "batch_size", "grad_accum", "seed", "objective",
                "mask_ratio", "append_eos")
# Settings that only say how this invocation runs: changing them on --resume is not worth a note.
RESUME_QUIET = ("resume", "stop_after", "threads", "progress", "log_every", "compile", "device", "log_to", "tokenizer")


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


def check_run_settings(s, world: Distributed) -> None:
    """The checks pretraining and fine-tuning share, made before any work: numbers in range,
    trackers installed, the run directory writable."""
    from ..utils import check_writable
    from .tracking import parse_trackers

    if s.steps < 1 or s.batch_size < 1 or s.grad_accum < 1 or s.seq_len < 8:
        raise OpenGLMError("steps, batch size and grad accum must be >= 1 and seq len >= 8")
    if s.batch_size % world.world_size:
        raise OpenGLMError(f"batch size {s.batch_size} must be a multiple of the {world.world_size} processes")
    if not 0 <= s.warmup <= s.steps:
        raise OpenGLMError(f"--warmup {s.warmup} must be between 0 and --steps {s.steps}")
    if not s.lr > 0:
        raise OpenGLMError(f"--lr must be positive, got {s.lr}")
    if s.min_lr is not None and not 0 <= s.min_lr <= s.lr:
        raise OpenGLMError(f"--min-lr {s.min_lr} must be between 0 and --lr {s.lr}")
    if not s.clip >= 0:
        raise OpenGLMError(f"--clip must be >= 0 (0 for no clipping), got {s.clip}")
    if min(s.eval_every, s.save_every) < 0 or s.log_every < 1:
        raise OpenGLMError("--eval-every and --save-every must be >= 0, --log-every >= 1")
    if s.keep < 1 or s.early_stop < 0:
        raise OpenGLMError("--keep must be >= 1 and --early-stop >= 0")
    if s.bf16 and s.fp16:
        raise OpenGLMError("choose one of --bf16 and --fp16")
    parse_trackers(s.log_to)
    if world.is_main:
        check_writable(s.out)


def _check_settings(s: PretrainSettings, world: Distributed) -> None:
    check_run_settings(s, world)
    if s.eval_tokens < 0:
        raise OpenGLMError(f"--eval-tokens must be >= 0, got {s.eval_tokens}")
    if not 0.0 < s.emb_shrink <= 1.0:
        raise OpenGLMError(f"--emb-shrink must be in (0, 1], got {s.emb_shrink}")
    if s.bf16 and world.device.type == "cpu" and world.is_main and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("warning: this CPU has no native bfloat16 matmul (AVX512-BF16 or AMX): --bf16 steps run many "
              "times slower than fp32 here", file=sys.stderr)


def _min_lr(settings: dict) -> float:
    return settings["lr"] / 10 if settings.get("min_lr") is None else settings["min_lr"]


def check_resume_settings(s, run_dir: Path, step: int | None, fixed: tuple[str, ...] = RESUME_FIXED) -> dict:
    """The ``run.json`` to write for settings ``s``: resuming at ``step``, it refuses changes of the
    settings named in ``fixed``, and records the others that changed under ``"history"`` (their
    earlier values and the step they changed at), telling on stderr what changed and how the
    learning-rate schedule continues."""
    current = dataclasses.asdict(s)
    path = run_dir / "run.json"
    if step is None or not path.is_file():
        return current
    saved = json.loads(path.read_text(encoding="utf-8"))
    refused = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in fixed if saved.get(k, current[k]) != current[k]]
    if refused:
        raise OpenGLMError("cannot resume with other model or data settings (" + "; ".join(refused) + ")")
    changed = {k: [saved[k], v] for k, v in current.items()
               if k in saved and k not in fixed and k not in RESUME_QUIET and saved[k] != v}
    history = saved.get("history", [])
    if changed:
        history = [*history, {"step": step, "changed": changed}]
        notes = [f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in changed.items()]
        print(f"resuming at step {step} with changed settings: {', '.join(notes)}", file=sys.stderr)
        if {"lr", "min_lr", "warmup", "steps"} & set(changed) and step < s.steps:
            before = learning_rate(step, saved["lr"], _min_lr(saved), saved["warmup"], saved["steps"])
            after = learning_rate(step, s.lr, _min_lr(current), s.warmup, s.steps)
            where = "warmup continues" if step < s.warmup else "cosine decay continues"
            print(f"learning rate at step {step}: {before:.4g} -> {after:.4g}; the schedule is recomputed over "
                  f"{s.steps} steps ({where}, reaching {_min_lr(current):.4g} at step {s.steps})", file=sys.stderr)
    return {**current, "history": history}


def _write_run_json(run_dir: Path, record: dict) -> None:
    from ..utils import atomic_write_text

    atomic_write_text(run_dir / "run.json", json.dumps(record, indent=2) + "\n")


class _StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a request to save and stop after the current step.

    A second signal interrupts at once, except under torchrun: its agent passes the user's Ctrl-C on
    to the workers, which already had it, and kills them itself if they take too long to save.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ

    def _handle(self, signum, frame):
        if self.requested and not self._under_torchrun:
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


def clip_grad_norm(module: nn.Module, clip: float) -> float:
    """The global gradient norm, accumulated in float64, and gradients scaled to at most ``clip`` (0: no clipping).

    ``torch.nn.utils.clip_grad_norm_`` sums the squares in float32: on glm-tiny its norm was 6.5e-5
    (relative) off the exact one, and off by a different amount when FSDP sums the same gradients
    shard by shard, so clipping scaled FSDP's update differently from the first step on. In float64
    the norms of one process and of FSDP agree to 1e-8.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    total = torch.linalg.vector_norm(norms)
    if hasattr(total, "full_tensor"):  # a DTensor under FSDP: the sum over the shards
        total = total.full_tensor()
    total = float(total)
    if clip > 0 and total > 0:
        coef = min(1.0, clip / (total + 1e-6))  # as torch.nn.utils.clip_grad_norm_ does
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
    return total


def train_step(module: nn.Module, optimizer, micro: list[tuple[dict, int]], lr: float, clip: float,
               world: Distributed, two_d: bool, precision: Precision, balance=None) -> tuple[float, float]:
    """One optimizer step over the micro-batches ``(batch, global target count)`` of ``next_batch``;
    with ``balance`` (a ``LoadBalancer``) the MoE routers' correction biases are updated after it.

    Returns this rank's summed loss over its targets and the gradient norm before clipping (with
    fp16, inf or nan on a step the scaler skips for overflow).
    """
    scaler = precision.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Gradients end as d(sum of losses / all targets of the step); DDP and FSDP average over ranks, hence * world.
    scale = world.world_size / max(1, sum(n for _, n in micro))
    loss_sum = 0.0
    for k, (batch, _) in enumerate(micro):
        with gradient_sync(module, k == len(micro) - 1):
            with precision.autocast():
                inputs = _batch_inputs(batch, two_d, world.device)
                loss = module(*inputs)
            objective = loss * scale
            if balance:
                balance.collect()
                aux = balance.aux_loss(inputs[0].shape[1])
                if aux is not None:  # a mean over the micro-batches; DDP and FSDP average it over ranks
                    objective = objective + aux / len(micro)
            (objective if scaler is None else scaler.scale(objective)).backward()
        loss_sum += loss.item()
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and report the true gradient norm
    grad_norm = clip_grad_norm(module, clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if balance:
        balance.step()
    return loss_sum, float(grad_norm)


@torch.no_grad()
def evaluate(module: nn.Module, batches: list[tuple], num_targets: int, world: Distributed, autocast) -> float:
    """Mean cross-entropy per target token over the fixed validation batches (all ranks);
    ``autocast()`` gives the precision context."""
    module.eval()
    total = 0.0
    for inputs in batches:
        with autocast():
            total += module(*inputs).item()
    module.train()
    (total,) = all_reduce_sum([total], world)
    return total / max(1, num_targets)


def _validation_batches(val, s: PretrainSettings, special, sentence_ends, weights, world, two_d):
    """A fixed validation set: the first ``ceil(eval_tokens / seq_len)`` rows of the val split, seed 0.

    The rows do not depend on the batch size or the number of processes, so validation losses
    compare across them; they are only split into micro-batches of ``batch_size`` rows (the last one
    padded with empty rows, so every rank runs as many batches).
    """
    loader = PackedBatches(val, s.seq_len, special, seed=0, weights=weights, sentence_end_ids=sentence_ends,
                           mask_ratio=s.mask_ratio, append_eos=s.append_eos)
    rows = [loader.next_row() for _ in range(-(-s.eval_tokens // s.seq_len))]
    num_targets = sum(int((r.targets != IGNORE_INDEX).sum()) for r in rows)
    rows += [pack([], s.seq_len, special.pad)] * (-len(rows) % s.batch_size)
    batches = [_batch_inputs(collate(rows[i : i + s.batch_size][world.rank :: world.world_size]), two_d, world.device)
               for i in range(0, len(rows), s.batch_size)]
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
    """``metrics.jsonl``, appended by rank 0 only, and the trackers of ``--log-to``.

    keep_until: the step of the checkpoint a resumed run starts from (lines after it are dropped,
    this run logs them again); None for a new run, which starts the file afresh.
    """

    def __init__(self, path: Path, enabled: bool, keep_until: int | None, trackers=None):
        from ..utils import atomic_write_text

        self.path, self.enabled, self.trackers = path, enabled, trackers
        if enabled:
            lines = []
            if keep_until is not None and path.is_file():
                lines = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                         if ln.strip() and json.loads(ln)["step"] <= keep_until]
            atomic_write_text(path, "".join(ln + "\n" for ln in lines))

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)

    def close(self, finished: bool) -> None:
        if self.enabled and self.trackers is not None:
            self.trackers.close(finished)


def open_metrics(s, run_dir: Path, world: Distributed, resume_step: int | None) -> _Metrics:
    """``metrics.jsonl`` and the ``--log-to`` trackers of a run (rank 0 writes; the others get a no-op)."""
    from .tracking import Trackers, parse_trackers

    trackers = None
    names = parse_trackers(s.log_to)
    if world.is_main and names:
        trackers = Trackers(names, run_dir, dataclasses.asdict(s), resume_step)
    return _Metrics(run_dir / "metrics.jsonl", world.is_main, resume_step, trackers)


class Precision:
    """Autocast (bf16, fp16 or none) and, for fp16, the gradient scaler that keeps small gradients
    from flushing to zero; the scaler's state goes into the checkpoint."""

    def __init__(self, s, device: torch.device):
        self.dtype = torch.bfloat16 if s.bf16 else torch.float16 if s.fp16 else None
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if s.fp16 else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class ValidationTracker:
    """The validation losses of a run: the best so far and how many evaluations ago, for
    ``--keep-best`` and ``--early-stop``; kept in the checkpoint so a resumed run goes on counting."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.best: float | None = state.get("best")
        self.best_step: int | None = state.get("best_step")
        self.since_best: int = state.get("since_best", 0)
        self.last: tuple[int, float] | None = tuple(state["last"]) if state.get("last") else None

    def add(self, step: int, loss: float) -> bool:
        """Record the validation loss at ``step``; True when it is the best so far."""
        self.last = (step, loss)
        if self.best is None or loss < self.best:
            self.best, self.best_step, self.since_best = loss, step, 0
            return True
        self.since_best += 1
        return False

    def at(self, step: int) -> float | None:
        """The validation loss measured at ``step``, if there was one."""
        return self.last[1] if self.last and self.last[0] == step else None

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best,
                "last": list(self.last) if self.last else None}


def resume(found: Path, loaded: tuple, module: nn.Module, optimizer, loader, strict: bool = True) -> dict:
    """Load the checkpoint ``found`` (``loaded``: what ``load_checkpoint`` read from it) into the module,
    optimizer, data loader and RNGs; returns its ``state.json`` (``"step"``, ``"validation"``, ``"scaler"``...).

    ``strict=False`` accepts a checkpoint holding only some of the module's weights (LoRA adapters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state, optimizer_state, state = loaded
    try:
        set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True, strict=strict))
        loader.load_state_dict(state["data"])
        checkpointing.set_rng_state(state["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise OpenGLMError(f"the training checkpoint in {found} does not fit this run: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return state


def run_steps(s, step: int, module: nn.Module, optimizer, loader, world: Distributed, two_d: bool,
              precision: Precision, min_lr: float, val_batches, metrics: _Metrics, save, describe, show: bool,
              validation: ValidationTracker, eval_first: bool = False,
              balance=None) -> tuple[int, float | None, float | None, bool]:
    """The optimizer-step loop pretraining and fine-tuning share, from ``step`` to ``s.steps``.

    Every ``s.log_every`` steps it logs ``describe(step, loss, lr, grad_norm, steps, seconds, targets)``,
    which returns (metrics record, progress-bar postfix, stderr line) from the interval's steps,
    training seconds and target tokens. It evaluates every ``s.eval_every`` steps and at the end
    (``eval_first``: at the start too), calls ``save(step)`` every ``s.save_every`` steps, at each new
    best validation loss with ``s.keep_best``, and at the end. It stops early, saved, on Ctrl-C (any
    process), after ``s.stop_after`` steps, or after ``s.early_stop`` evaluations without a new best.
    With ``balance`` (a ``LoadBalancer``) the logs carry the experts' loads and their imbalance.
    Returns (step, last loss, last validation loss, interrupted).
    """
    from tqdm import tqdm

    bar = tqdm(total=s.steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=None if show else True)

    def run_eval():
        val_loss = evaluate(module, *val_batches, world, precision.autocast)
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        metrics.log(record)
        if world.is_main:
            bar.write(f"step {step}: val loss {val_loss:.4f}, ppl {record['val_ppl']:.2f}")
        return val_loss, validation.add(step, val_loss)

    loss = val_loss = None
    interrupted = False
    module.train()
    with _StopRequest() as stop, bar:
        if val_batches and eval_first:
            val_loss, _ = run_eval()
        start_step, interval = step, [0, 0.0, 0]  # steps, training seconds, target tokens since the last log
        while step < s.steps:
            started = time.perf_counter()
            lr = learning_rate(step, s.lr, min_lr, s.warmup, s.steps)
            micro = [loader.next_batch(s.batch_size, world.rank, world.world_size) for _ in range(s.grad_accum)]
            loss_sum, grad_norm = train_step(module, optimizer, micro, lr, s.clip, world, two_d, precision, balance)
            step += 1
            loss_sum, stop_votes = all_reduce_sum([loss_sum, float(stop.requested)], world)
            num_targets = sum(n for _, n in micro)
            loss = loss_sum / max(1, num_targets)
            interval = [interval[0] + 1, interval[1] + time.perf_counter() - started, interval[2] + num_targets]
            bar.update(1)

            if step % s.log_every == 0 or step == s.steps or stop_votes:
                record, postfix, line = describe(step, loss, lr, grad_norm, *interval)
                interval = [0, 0.0, 0]
                if balance:
                    moe = balance.report()
                    record.update(moe)
                    if moe:
                        postfix["imb"] = f"{moe['moe_imbalance']:.2f}"
                        line += f" moe imbalance {moe['moe_imbalance']:.2f}"
                metrics.log(record)
                bar.set_postfix(postfix, refresh=False)
                if bar.disable and world.is_main:
                    print(line, file=sys.stderr, flush=True)
            new_best = False
            if val_batches and ((s.eval_every and step % s.eval_every == 0) or step == s.steps):
                val_loss, new_best = run_eval()
            if stop_votes:
                interrupted = True
                break
            if s.stop_after and step - start_step >= s.stop_after:
                break
            if s.early_stop and validation.since_best >= s.early_stop:
                if world.is_main:
                    bar.write(f"early stop at step {step}: no lower validation loss in {s.early_stop} evaluations "
                              f"(best {validation.best:.4f} at step {validation.best_step})")
                break
            if step < s.steps and ((s.save_every and step % s.save_every == 0) or (s.keep_best and new_best)):
                save(step)
        save(step)
    return step, loss, val_loss, interrupted


def pretrain(s: PretrainSettings) -> PretrainResult:
    """Train (or, with ``s.resume``, continue) a run; see the module docstring for what it writes."""
    world = init_distributed(s.device)
    try:
        return _pretrain(s, world)
    finally:
        if world.world_size > 1:
            shutdown_distributed()


# What a run writes besides its checkpoints; a new run that fails before its first checkpoint removes them.
RUN_FILES = ("run.json", "metrics.jsonl", "tracking.json", "tensorboard", "wandb", "mlflow.db", "model", "adapter")


@contextlib.contextmanager
def cleanup_on_failure(run_dir: Path, world: Distributed, fresh: bool, existed: bool):
    """Rank 0 removes a new run's files (and its directory, unless it ``existed`` before the run)
    when the run fails before writing a checkpoint: a failed run leaves nothing half-made behind."""
    try:
        yield
    except BaseException:
        if world.is_main and fresh and checkpointing.find_checkpoint(run_dir) is None:
            for name in RUN_FILES:
                path = run_dir / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            checkpointing.remove_stale_temporaries(run_dir)
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
        raise


def parse_overrides(items: list[str], config: Config) -> dict:
    """``["num_layers=4", "rope_theta=5e5"]`` -> config fields with the types of ``config``'s values."""
    fields = {f.name for f in dataclasses.fields(Config)} - {"name"}
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise OpenGLMError(f"bad --set {item!r}: expected KEY=VALUE with KEY a config field "
                               f"({', '.join(sorted(fields))})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        current = getattr(config, key)
        if isinstance(current, float) and type(value) is int:
            value = float(value)
        if current is not None and type(value) is not type(current):
            raise OpenGLMError(f"bad --set {item!r}: {key} takes a {type(current).__name__}")
        out[key] = value
    return out


# Fields that decide the shapes of the weights: --init's weights fix them.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "attention_bias", "post_norms", "tie_word_embeddings")


def init_checkpoint(name: str) -> Path:
    """The checkpoint directory ``--init`` names: a run directory (its ``model/``), a checkpoint
    directory or a bundled name."""
    from ..model.checkpoint import checkpoint_dir

    run_model = Path(name) / "model"
    if (run_model / "config.json").is_file():
        return run_model
    return checkpoint_dir(name)


def model_config(s: PretrainSettings, tok) -> tuple[Config, Path | None, str | None]:
    """The config of the model to train, the checkpoint ``--init`` starts from (None: random weights)
    and a note to print when the vocabulary size was taken from the tokenizer.

    Without ``--init`` the vocabulary is the tokenizer's unless ``--set vocab_size=N`` says otherwise:
    a 4,096-token tokenizer gives 4,096 embedding rows, not the config's 16,384.
    """
    from ..config import CONFIGS

    init_dir = None
    if s.init:
        if s.config:
            raise OpenGLMError("give --config or --init, not both: --init brings its own config")
        init_dir = init_checkpoint(s.init)
        config = Config.from_file(init_dir)
    elif s.config in CONFIGS or not Path(s.config).exists():
        config = Config.from_name(s.config)
    else:
        config = Config.from_file(s.config)
    overrides = parse_overrides(s.overrides, config)
    fixed = [k for k in overrides if k in SHAPE_FIELDS and overrides[k] != getattr(config, k)]
    if init_dir is not None and fixed:
        raise OpenGLMError(f"--set {fixed[0]} would change the shapes of the --init weights")
    note = None
    if init_dir is None and "vocab_size" not in overrides and tok.vocab_size != config.vocab_size:
        note = f"vocab size {tok.vocab_size} (the tokenizer's; the config has {config.vocab_size})"
        overrides["vocab_size"] = tok.vocab_size
    config = dataclasses.replace(config, **overrides, eos_token_id=[tok.eos_id], pad_token_id=tok.eos_id)
    if tok.vocab_size > config.vocab_size:
        raise OpenGLMError(f"the tokenizer has {tok.vocab_size} ids but the model only {config.vocab_size} "
                           f"embeddings")
    if init_dir is not None and (init_dir / "tokenizer.json").is_file():
        from ..data.tokenizer import load_tokenizer

        if _tokenizer_sha(load_tokenizer(init_dir)) != _tokenizer_sha(tok):
            raise OpenGLMError(f"the data was prepared with another tokenizer than the one of {init_dir}: "
                               f"prepare it with --tokenizer {init_dir}")
    return config, init_dir, note


def _check_data_fits(s: PretrainSettings, config: Config, splits) -> None:
    if s.seq_len > config.max_position_embeddings:
        raise OpenGLMError(f"--seq-len {s.seq_len} is longer than the model's {config.max_position_embeddings} "
                           f"positions")
    for shards in splits:
        largest = shards.max_token_id()
        if largest >= config.vocab_size:
            raise OpenGLMError(f"{shards.directory} holds token id {largest}, outside the model's vocabulary of "
                               f"{config.vocab_size}: prepare the data with the model's tokenizer")


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
    config, init_dir, note = model_config(s, tok)
    rate = balance_rate(s.balance_rate, config)
    check_aux_loss_coef(s.aux_loss_coef, config)
    _check_data_fits(s, config, [train] + ([val] if val is not None else []))
    if (s.keep_best or s.early_stop) and (val is None or not s.eval_tokens):
        raise OpenGLMError("--keep-best and --early-stop need validation data (a val split and --eval-tokens > 0)")
    # A damaged checkpoint is found here, before anything is written.
    loaded = checkpointing.load_checkpoint(found) if found is not None else None
    run_record = check_resume_settings(s, run_dir, loaded[2]["step"] if loaded else None)
    if note and world.is_main:
        print(note, file=sys.stderr)
    existed = run_dir.exists()
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_temporaries(run_dir)
    with cleanup_on_failure(run_dir, world, fresh=found is None, existed=existed):
        if world.is_main:
            _write_run_json(run_dir, run_record)
        return _train(s, world, run_dir, found, loaded, config, init_dir, train, val, tok, weights, special,
                      sentence_ends, rate)


def _train(s, world, run_dir, found, loaded, config, init_dir, train, val, tok, weights, special, sentence_ends,
           rate):
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    from ..model.glm import GLMForCausalLM

    if init_dir is not None:
        from ..model.checkpoint import load_model

        lm = load_model(init_dir, device=world.device, dtype=torch.float32).train()
        if getattr(lm, "quantization", None) is not None:
            raise OpenGLMError(f"{init_dir} is quantized; continue pretraining from full-precision weights")
        lm.config = config
    else:
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
    balance = LoadBalancer(module, rate, world, s.aux_loss_coef)
    min_lr = s.lr / 10 if s.min_lr is None else s.min_lr
    precision = Precision(s, world.device)

    loader = PackedBatches(train, s.seq_len, special, seed=s.seed, weights=weights, sentence_end_ids=sentence_ends,
                           mask_ratio=s.mask_ratio, append_eos=s.append_eos)
    state = resume(found, loaded, module, optimizer, loader) if found is not None else {"step": 0}
    step = state["step"]
    precision.load_state_dict(state.get("scaler"))
    validation = ValidationTracker(state.get("validation"))
    two_d = config.position_encoding_2d
    val_batches = None
    if val is not None and s.eval_tokens > 0:
        val_batches = _validation_batches(val, s, special, sentence_ends, weights, world, two_d)
    metrics = open_metrics(s, run_dir, world, step if found is not None else None)

    def save(step):
        model_state, optimizer_state = _full_state(module, optimizer)
        if world.is_main:
            state = {"step": step, "val_loss": validation.at(step), "validation": validation.state_dict(),
                     "scaler": precision.state_dict(), "rng": checkpointing.rng_state(), "data": loader.state_dict(),
                     "settings": dataclasses.asdict(s)}
            checkpointing.save_checkpoint(run_dir, model_state, optimizer_state, state, s.keep_previous,
                                          keep=s.keep, keep_best=s.keep_best)
            _export(config, model_state, run_dir / "model", tok)

    tokens_per_step = s.batch_size * s.grad_accum * s.seq_len

    def describe(step, loss, lr, grad_norm, steps, seconds, targets):
        tokens_per_s = tokens_per_step * steps / max(seconds, 1e-9)  # tokens/s counts training time only
        return ({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": step * tokens_per_step,
                 "tokens_per_s": tokens_per_s},
                {"loss": f"{loss:.4f}", "tok_s": f"{tokens_per_s:,.0f}"},
                f"step {step}/{s.steps} loss {loss:.4f} lr {lr:.2e} grad norm {grad_norm:.3f} "
                f"{tokens_per_s:,.0f} tokens/s")

    finished = False
    try:
        step, loss, val_loss, interrupted = run_steps(
            s, step, module, optimizer, loader, world, two_d, precision, min_lr, val_batches, metrics, save,
            describe, show=s.progress and world.is_main, validation=validation, balance=balance)
        finished = step >= s.steps
    finally:
        metrics.close(finished)
    if world.is_main:
        if step < s.steps and not interrupted and s.early_stop and validation.since_best >= s.early_stop:
            print(f"stopped early at step {step}; model saved in {run_dir / 'model'}", file=sys.stderr)
        elif step < s.steps:
            print(f"stopped at step {step}; checkpoint saved in {run_dir / checkpointing.CHECKPOINT}; "
                  f"continue with --resume", file=sys.stderr)
        else:
            print(f"trained {step} steps; model saved in {run_dir / 'model'}", file=sys.stderr)
    return PretrainResult(step, loss, val_loss, interrupted)
