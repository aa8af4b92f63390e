"""The skeleton every training run shares; pretraining and fine-tuning are each a ``Run``.

``SomeRun(settings).execute()`` checks the settings, owns the run directory, sets up the model, the
optimizer and the data, resumes exactly from a checkpoint, runs the optimizer steps with their
progress line, evaluates, saves and exports. A subclass says only what is its own:

    fixed                    settings a resumed run must keep (they fix the model and the data stream)
    check_settings()         its own checks, after the shared ones (call ``super()``)
    prepare()                before anything is written: read the data and tokenizer, set ``config``
                             and ``balance_rate`` (and add to ``notes``)
    build_model()            the ``GLMForCausalLM`` to train, on ``world.device``, in train mode
    make_loader()            the training batches: ``next_batch(batch_size, rank, world_size)``,
                             ``state_dict()`` / ``load_state_dict()``
    validation_batches()     ``(batches, target count)`` of the fixed validation set, or None
    eval_first, strict_resume  evaluate before the first step; refuse a checkpoint missing weights
    throughput(...)          what the metrics line and progress bar say about speed
    export(model_state)      what besides the checkpoint the run writes after each save (``model/``...)
    finish(...)              the closing message and the result object

The run directory::

    run.json          the settings of the run, and under "history" what earlier invocations changed
    metrics.jsonl     one line per logged step and per evaluation
    checkpoint/       everything to continue exactly (see ``openglm.train.checkpointing``)
    checkpoint-STEP/  older checkpoints kept by ``keep`` / ``keep_best``

A run that fails before its first checkpoint removes what it wrote; temporary files left by a killed
run are removed when the next one starts, and a new run never appends to an old run's metrics.

The loss is the cross-entropy over the target tokens of a whole optimizer step (all micro-batches,
all ranks) divided by their number. The same code runs under ``torchrun`` for DDP or FSDP2, and with
expert parallelism (``openglm.train.expert_parallel``) for mixture-of-experts models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..config import Config
from ..data.objective import IGNORE_INDEX
from ..errors import OpenGLMError
from . import checkpointing
from .balance import LoadBalancer
from .expert_parallel import ExpertParallel, check_expert_parallel
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

# Settings that only say how this invocation runs: changing them on --resume is not worth a note.
RESUME_QUIET = ("resume", "stop_after", "threads", "progress", "log_every", "compile", "device", "log_to", "tokenizer")
# What a run writes besides its checkpoints; a new run that fails before its first checkpoint removes them.
RUN_FILES = ("run.json", "metrics.jsonl", "tracking.json", "tensorboard", "wandb", "mlflow.db", "model", "adapter")


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


def clip_grad_norm(module: nn.Module, clip: float, expert_parallel: ExpertParallel | None = None) -> float:
    """The global gradient norm, accumulated in float64, and gradients scaled to at most ``clip`` (0: no clipping).
    With ``expert_parallel`` the squares of the expert shards' gradients are summed over their group.

    ``torch.nn.utils.clip_grad_norm_`` sums the squares in float32: on glm-tiny its norm was 6.5e-5
    (relative) off the exact one, and off by a different amount when FSDP sums the same gradients
    shard by shard, so clipping scaled FSDP's update differently from the first step on. In float64
    the norms of one process and of FSDP agree to 1e-8.
    """
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return 0.0
    grads = [p.grad for p in params]
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    if expert_parallel is None:
        total = torch.linalg.vector_norm(norms)
    else:
        shards = {id(p) for p in expert_parallel.params}
        sharded = torch.tensor([id(p) in shards for p in params], device=norms.device)
        total = (norms[~sharded].square().sum() + expert_parallel.squared_norm(norms[sharded])).sqrt()
    if hasattr(total, "full_tensor"):  # a DTensor under FSDP: the sum over the shards
        total = total.full_tensor()
    total = float(total)
    if clip > 0 and total > 0:
        coef = min(1.0, clip / (total + 1e-6))  # as torch.nn.utils.clip_grad_norm_ does
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
    return total


def batch_inputs(batch: dict, two_d: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(input_ids, position_ids, attention_mask, targets)`` on ``device``; 1D models take the summed positions."""
    positions = batch["position_ids"] if two_d else batch["position_ids_1d"]
    return tuple(t.to(device, non_blocking=True) for t in (batch["input_ids"], positions,
                                                           batch["attention_mask"], batch["targets"]))


def check_resume_settings(s, run_dir: Path, step: int | None, fixed: tuple[str, ...]) -> dict:
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


def _min_lr(settings: dict) -> float:
    return settings["lr"] / 10 if settings.get("min_lr") is None else settings["min_lr"]


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


class Metrics:
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

    @classmethod
    def open(cls, s, run_dir: Path, world: Distributed, resume_step: int | None) -> "Metrics":
        """``metrics.jsonl`` and the ``--log-to`` trackers of a run (rank 0 writes; the others get a no-op)."""
        from .tracking import Trackers, parse_trackers

        trackers = None
        names = parse_trackers(s.log_to)
        if world.is_main and names:
            trackers = Trackers(names, run_dir, dataclasses.asdict(s), resume_step)
        return cls(run_dir / "metrics.jsonl", world.is_main, resume_step, trackers)

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.log(record)

    def close(self, finished: bool) -> None:
        if self.enabled and self.trackers is not None:
            self.trackers.close(finished)


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


def export_weights(config: Config, model_state: dict) -> nn.Module:
    """A ``GLMForCausalLM`` holding the training module's (full, unsharded) ``model_state``, for saving."""
    from ..model.glm import GLMForCausalLM

    with torch.device("meta"):
        lm = GLMForCausalLM(config)
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in model_state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    return lm


class Run:
    """One training run; see the module docstring for what a subclass provides."""

    fixed: tuple[str, ...] = ()
    eval_first = False  # also evaluate before the first step
    strict_resume = True  # False: a checkpoint may hold only some of the module's weights (LoRA adapters)

    def __init__(self, s):
        self.s = s
        self.config: Config | None = None  # set by prepare()
        self.balance_rate = 0.0  # set by prepare() for MoE models
        self.notes: list[str] = []  # said on stderr once the checkpoint and settings have been checked

    # -- what a subclass provides -------------------------------------------------------------------

    def check_settings(self) -> None:
        """The checks made before any work: numbers in range, trackers installed, the run directory writable."""
        from ..utils import check_writable
        from .tracking import parse_trackers

        s, world = self.s, self.world
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
        if s.eval_tokens < 0:
            raise OpenGLMError(f"--eval-tokens must be >= 0, got {s.eval_tokens}")
        if s.expert_parallel < 1:
            raise OpenGLMError(f"--expert-parallel must be >= 1, got {s.expert_parallel}")
        parse_trackers(s.log_to)
        if world.is_main:
            check_writable(s.out)

    def prepare(self) -> None:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def make_loader(self):
        raise NotImplementedError

    def validation_batches(self) -> tuple[list, int] | None:
        raise NotImplementedError

    def throughput(self, step: int, steps: int, seconds: float, targets: int) -> tuple[dict, dict, str]:
        """(metrics fields, progress-bar fields, text for the stderr line) about the speed at ``step`` of
        the last ``steps`` steps, which took ``seconds`` of training and had ``targets`` target tokens."""
        raise NotImplementedError

    def checkpoint_weights(self, model_state: dict) -> dict:
        """The weights the checkpoint keeps (a LoRA run: its adapters only)."""
        return model_state

    def export(self, model_state: dict) -> None:
        raise NotImplementedError

    def finish(self, step: int, loss: float | None, val_loss: float | None, interrupted: bool):
        raise NotImplementedError

    # -- the shared skeleton ------------------------------------------------------------------------

    def execute(self):
        """Train (or, with ``--resume``, continue) the run; returns what ``finish`` makes of it."""
        self.world = init_distributed(self.s.device)
        try:
            return self._execute()
        finally:
            # The run's module and optimizer state end here: under FSDP their DTensors hold the device
            # mesh, and through it the process group, which shutdown_distributed could not then destroy.
            self.__dict__ = {"s": self.s, "world": self.world}
            if self.world.world_size > 1:
                shutdown_distributed()

    def _execute(self):
        s, world = self.s, self.world
        self.check_settings()
        if s.threads:
            torch.set_num_threads(s.threads)
        self.run_dir = run_dir = Path(s.out)
        self.found = checkpointing.find_checkpoint(run_dir)
        if self.found is not None and not s.resume:
            raise OpenGLMError(f"{run_dir} already holds a training checkpoint: pass --resume, or choose a new directory")
        self.prepare()
        check_expert_parallel(s.expert_parallel, world, self.config, s.parallel, getattr(s, "lora", False))
        # A damaged checkpoint is found here, before anything is written.
        self.loaded = checkpointing.load_checkpoint(self.found) if self.found is not None else None
        record = check_resume_settings(s, run_dir, self.loaded[2]["step"] if self.loaded else None, self.fixed)
        if world.is_main:
            for note in self.notes:
                print(note, file=sys.stderr)
        existed = run_dir.exists()
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            checkpointing.remove_stale_temporaries(run_dir)
        with cleanup_on_failure(run_dir, world, fresh=self.found is None, existed=existed):
            if world.is_main:
                from ..utils import atomic_write_text

                atomic_write_text(run_dir / "run.json", json.dumps(record, indent=2) + "\n")
            self.set_up()
            finished = False
            try:
                step, loss, val_loss, interrupted = self.loop()
                finished = step >= s.steps
            finally:
                self.metrics.close(finished)
            return self.finish(step, loss, val_loss, interrupted)

    def set_up(self) -> None:
        """Seeds, the model wrapped for the loss and parallelized, optimizer, precision, balancing,
        data, and the state of the checkpoint resumed from."""
        s, world = self.s, self.world
        random.seed(s.seed)
        np.random.seed(s.seed)
        torch.manual_seed(s.seed)
        module = PretrainLoss(self.build_model())
        self.expert_parallel = ExpertParallel.shard(module, s.expert_parallel, world) if s.expert_parallel > 1 else None
        if s.grad_checkpointing:
            apply_activation_checkpointing(module)
        if getattr(s, "compile", False):
            for layer in decoder_layers(module):
                layer.compile()
        self.module = parallelize(module, s.parallel, world, self.expert_parallel and self.expert_parallel.names)
        self.optimizer = build_optimizer(self.module, s.lr, s.weight_decay, world.device)
        self.balance = LoadBalancer(self.module, self.balance_rate, world, s.aux_loss_coef)
        self.min_lr = s.lr / 10 if s.min_lr is None else s.min_lr
        self.precision = Precision(s, world.device)
        self.two_d = self.config.position_encoding_2d
        self.loader = self.make_loader()
        state = self.resume() if self.found is not None else {"step": 0}
        self.step = state["step"]
        self.precision.load_state_dict(state.get("scaler"))
        self.validation = ValidationTracker(state.get("validation"))
        self.val_batches = self.validation_batches()
        self.metrics = Metrics.open(s, self.run_dir, world, self.step if self.found is not None else None)

    def resume(self) -> dict:
        """Load the checkpoint found into the module, optimizer, data loader and RNGs; returns its
        ``state.json`` (``"step"``, ``"validation"``, ``"scaler"``...)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_state, optimizer_state, state = self.loaded
        if self.expert_parallel:
            model_state, optimizer_state = self.expert_parallel.local_state(model_state, optimizer_state)
        try:
            set_state_dict(self.module, self.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                           options=StateDictOptions(full_state_dict=True, strict=self.strict_resume))
            self.loader.load_state_dict(state["data"])
            checkpointing.set_rng_state(state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise OpenGLMError(f"the training checkpoint in {self.found} does not fit this run: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return state

    def full_state(self) -> tuple[dict, dict]:
        """Unsharded model and optimizer state dicts, on the CPU; only rank 0 gets them filled (every rank
        must call this: FSDP gathers its shards here, expert parallelism its experts)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optimizer_state = get_state_dict(
            self.module, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.expert_parallel:
            return self.expert_parallel.full_state(model_state, optimizer_state, self.optimizer)
        return model_state, optimizer_state

    def save(self, step: int) -> None:
        s = self.s
        model_state, optimizer_state = self.full_state()
        model_state = self.checkpoint_weights(model_state)
        if self.world.is_main:
            state = {"step": step, "val_loss": self.validation.at(step), "validation": self.validation.state_dict(),
                     "scaler": self.precision.state_dict(), "rng": checkpointing.rng_state(),
                     "data": self.loader.state_dict(), "settings": dataclasses.asdict(s)}
            checkpointing.save_checkpoint(self.run_dir, model_state, optimizer_state, state, s.keep_previous,
                                          keep=s.keep, keep_best=s.keep_best)
            self.export(model_state)

    def train_step(self, micro: list[tuple[dict, int]], lr: float) -> tuple[float, float]:
        """One optimizer step over the micro-batches ``(batch, global target count)`` of ``next_batch``;
        for MoE models the routers' correction biases are updated after it.

        Returns this rank's summed loss over its targets and the gradient norm before clipping (with
        fp16, inf or nan on a step the scaler skips for overflow).
        """
        module, optimizer, world, balance = self.module, self.optimizer, self.world, self.balance
        scaler = self.precision.scaler
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Gradients end as d(sum of losses / all targets of the step); DDP and FSDP average over ranks, hence * world.
        scale = world.world_size / max(1, sum(n for _, n in micro))
        loss_sum = 0.0
        for k, (batch, _) in enumerate(micro):
            with gradient_sync(module, k == len(micro) - 1):
                with self.precision.autocast():
                    inputs = batch_inputs(batch, self.two_d, world.device)
                    loss = module(*inputs)
                objective = loss * scale
                if balance:
                    balance.collect()
                    aux = balance.aux_loss(inputs[0].shape[1])
                    if aux is not None:  # a mean over the micro-batches; DDP and FSDP average it over ranks
                        objective = objective + aux / len(micro)
                (objective if scaler is None else scaler.scale(objective)).backward()
            loss_sum += loss.item()
        if self.expert_parallel:
            self.expert_parallel.reduce_gradients()
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip and report the true gradient norm
        grad_norm = clip_grad_norm(module, self.s.clip, self.expert_parallel)
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
    def evaluate(self) -> float:
        """Mean cross-entropy per target token over the fixed validation batches (all ranks)."""
        batches, num_targets = self.val_batches
        self.module.eval()
        total = 0.0
        for inputs in batches:
            with self.precision.autocast():
                total += self.module(*inputs).item()
        self.module.train()
        (total,) = all_reduce_sum([total], self.world)
        return total / max(1, num_targets)

    def describe(self, step: int, loss: float, lr: float, grad_norm: float, steps: int, seconds: float,
                 targets: int) -> tuple[dict, dict, str]:
        """(metrics record, progress-bar postfix, stderr line) of a logged step: loss, learning rate,
        gradient norm, the run's throughput and, for MoE models, the experts' loads."""
        record, postfix, speed = self.throughput(step, steps, seconds, targets)
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **record}
        postfix = {"loss": f"{loss:.4f}", **postfix}
        line = f"step {step}/{self.s.steps} loss {loss:.4f} lr {lr:.2e} grad norm {grad_norm:.3f} {speed}"
        moe = self.balance.report() if self.balance else {}
        if moe:
            record.update(moe)
            postfix["imb"] = f"{moe['moe_imbalance']:.2f}"
            line += f" moe imbalance {moe['moe_imbalance']:.2f}"
        return record, postfix, line

    def stopped_early(self) -> bool:
        return bool(self.s.early_stop) and self.validation.since_best >= self.s.early_stop

    def loop(self) -> tuple[int, float | None, float | None, bool]:
        """The optimizer steps from the resumed step to ``s.steps``.

        Every ``s.log_every`` steps it logs ``describe``. It evaluates every ``s.eval_every`` steps and
        at the end (with ``eval_first``: at the start too), saves every ``s.save_every`` steps, at each new
        best validation loss with ``s.keep_best``, and at the end. It stops early, saved, on Ctrl-C
        (any process), after ``s.stop_after`` steps, or after ``s.early_stop`` evaluations without a
        new best. Returns (step, last loss, last validation loss, interrupted).
        """
        from tqdm import tqdm

        s, world, step = self.s, self.world, self.step
        show = s.progress and world.is_main
        bar = tqdm(total=s.steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0,
                   disable=None if show else True)

        def run_eval():
            val_loss = self.evaluate()
            record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
            self.metrics.log(record)
            if world.is_main:
                bar.write(f"step {step}: val loss {val_loss:.4f}, ppl {record['val_ppl']:.2f}")
            return val_loss, self.validation.add(step, val_loss)

        loss = val_loss = None
        interrupted = False
        self.module.train()
        with _StopRequest() as stop, bar:
            if self.val_batches and self.eval_first:
                val_loss, _ = run_eval()
            start_step, interval = step, [0, 0.0, 0]  # steps, training seconds, target tokens since the last log
            while step < s.steps:
                started = time.perf_counter()
                lr = learning_rate(step, s.lr, self.min_lr, s.warmup, s.steps)
                micro = [self.loader.next_batch(s.batch_size, world.rank, world.world_size)
                         for _ in range(s.grad_accum)]
                loss_sum, grad_norm = self.train_step(micro, lr)
                step += 1
                loss_sum, stop_votes = all_reduce_sum([loss_sum, float(stop.requested)], world)
                num_targets = sum(n for _, n in micro)
                loss = loss_sum / max(1, num_targets)
                interval = [interval[0] + 1, interval[1] + time.perf_counter() - started, interval[2] + num_targets]
                bar.update(1)

                if step % s.log_every == 0 or step == s.steps or stop_votes:
                    record, postfix, line = self.describe(step, loss, lr, grad_norm, *interval)
                    interval = [0, 0.0, 0]
                    self.metrics.log(record)
                    bar.set_postfix(postfix, refresh=False)
                    if bar.disable and world.is_main:
                        print(line, file=sys.stderr, flush=True)
                new_best = False
                if self.val_batches and ((s.eval_every and step % s.eval_every == 0) or step == s.steps):
                    val_loss, new_best = run_eval()
                if stop_votes:
                    interrupted = True
                    break
                if s.stop_after and step - start_step >= s.stop_after:
                    break
                if self.stopped_early():
                    if world.is_main:
                        v = self.validation
                        bar.write(f"early stop at step {step}: no lower validation loss in {s.early_stop} "
                                  f"evaluations (best {v.best:.4f} at step {v.best_step})")
                    break
                if step < s.steps and ((s.save_every and step % s.save_every == 0) or (s.keep_best and new_best)):
                    self.save(step)
            self.save(step)
        self.step = step
        return step, loss, val_loss, interrupted
