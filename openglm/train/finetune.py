"""Supervised fine-tuning on chat conversations: full or LoRA, packed, resumable exactly.

``finetune(FinetuneSettings(...))`` starts from a checkpoint and trains on OpenAI-format
conversations (``{"messages": [...], "tools": [...]?}`` a line), rendered by
``openglm.data.chat.render_chat``. The loss is the cross-entropy of the tokens the assistant writes
and of the token that ends each assistant turn (the ``loss_mask`` of ``render_chat``), summed over an
optimizer step and divided by their number.

Packing: conversations fill rows of ``seq_len`` tokens in a seeded order (a new order each epoch);
``openglm.model.masks.packed_mask`` keeps each conversation from seeing the others, and positions
restart at 0 for each one, so a packed row gives every conversation the loss it has alone.

The optimizer, schedule, checkpoints, Ctrl-C handling, metrics and progress bar are the pretraining
loop's (``openglm.train.loop``); the run directory holds::

    run.json          the settings of the run
    metrics.jsonl     one line per logged step and per evaluation
    checkpoint/       weights (LoRA: the adapters only), optimizer, RNG and data-loader state
    adapter/          LoRA runs: the adapters in peft's format (base model in adapter_config.json)
    model/            a plain checkpoint openglm.load_model reads: weights, tokenizer, chat template,
                      generation_config.json with the end-of-turn ids as eos (LoRA: merged at the end)
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data.objective import IGNORE_INDEX, GLMSample, collate, pack
from ..errors import OpenGLMError
from . import checkpointing
from .balance import LoadBalancer, balance_rate, check_aux_loss_coef
from .finetune_cli import FinetuneSettings
from .loop import (
    Precision,
    PretrainLoss,
    ValidationTracker,
    _batch_inputs,
    _full_state,
    _write_run_json,
    build_optimizer,
    check_resume_settings,
    check_run_settings,
    cleanup_on_failure,
    open_metrics,
    resume,
    run_steps,
)
from .parallel import Distributed, apply_activation_checkpointing, init_distributed, parallelize, shutdown_distributed

__all__ = ["FinetuneSettings", "FinetuneResult", "finetune", "merge_adapter", "read_conversations",
           "tokenize_conversation", "ChatBatches", "pack_in_order"]

# Settings that fix the model and the data stream: a resumed run must keep them.
RESUME_FIXED = ("model", "data", "seq_len", "batch_size", "grad_accum", "seed", "lora", "lora_r", "lora_alpha",
                "lora_targets")
ADAPTER = "adapter"
MODEL = "model"


@dataclass
class FinetuneResult:
    step: int
    loss: float | None  # of the last step run
    val_loss: float | None  # of the last evaluation
    interrupted: bool
    skipped: int  # training conversations left out (too long, or nothing to train on)
    truncated: int  # training conversations cut to seq_len


# -- data --------------------------------------------------------------------------------------------


def read_conversations(path: str | Path) -> list[dict]:
    """The ``{"messages": [...], "tools"?: [...]}`` objects of a JSONL file (blank lines skipped)."""
    conversations = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise OpenGLMError(f"{path}:{n}: not JSON: {e}") from None
                if not isinstance(item, dict) or not isinstance(item.get("messages"), list):
                    raise OpenGLMError(f"{path}:{n}: expected an object with a \"messages\" list")
                conversations.append(item)
    except OSError as e:
        raise OpenGLMError(f"cannot read {path}: {e}") from None
    if not conversations:
        raise OpenGLMError(f"{path} holds no conversations")
    return conversations


def tokenize_conversation(tok, conversation: dict, template: str | None = None, max_len: int | None = None,
                          truncate: str | None = None) -> GLMSample:
    """One conversation as a causal ``GLMSample``: ``targets[t]`` is token ``t + 1`` where the chat
    loss mask marks it (assistant text and its end-of-turn token), else ``IGNORE_INDEX``.

    A conversation longer than ``max_len`` tokens is cut to fit when ``truncate`` says how:
    ``"right"`` keeps its beginning; ``"left"`` keeps the opening (``[gMASK]<sop>``, the system turn
    and tool declarations) and the latest tokens, dropping the oldest turns in between.
    """
    from ..data.chat import render_chat

    messages, tools = conversation["messages"], conversation.get("tools")
    ids, loss_mask = render_chat(tok, messages, tools=tools, template=template)
    if max_len is not None and truncate and len(ids) > max_len:
        if truncate == "right":
            ids, loss_mask = ids[:max_len], loss_mask[:max_len]
        else:
            # The opening ends at the first role token other than <|system|> (tools render as a system turn).
            roles = {tok.token_id(r) for r in ("<|user|>", "<|assistant|>", "<|observation|>")}
            keep = next((i for i, t in enumerate(ids) if t in roles), 0)
            keep = keep if keep < max_len else 0
            ids = ids[:keep] + ids[len(ids) - (max_len - keep):]
            loss_mask = loss_mask[:keep] + loss_mask[len(loss_mask) - (max_len - keep):]
    ids = np.asarray(ids, dtype=np.int64)
    mask = np.asarray(loss_mask, dtype=bool)
    targets = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    targets[:-1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    position_ids = np.stack([np.arange(len(ids)), np.zeros(len(ids))]).astype(np.int64)  # [2, T], span row 0
    return GLMSample(ids, position_ids, targets, prefix_len=0)


@dataclass
class TokenizedFile:
    samples: list[GLMSample]  # the conversations that train on something, each at most seq_len tokens
    skipped: int  # left out: too long (without truncate) or nothing to train on (after truncation too)
    truncated: int  # cut to seq_len tokens


def tokenize_file(path: str | Path, tok, template: str, seq_len: int, progress: bool,
                  truncate: str | None = None) -> TokenizedFile:
    """The conversations of ``path`` as samples of at most ``seq_len`` tokens (see ``tokenize_conversation``)."""
    from tqdm import tqdm

    out = TokenizedFile([], 0, 0)
    for conversation in tqdm(read_conversations(path), desc=f"tokenizing {Path(path).name}", unit=" conv",
                             disable=not progress, mininterval=1.0):
        sample = tokenize_conversation(tok, conversation, template)
        cut = len(sample) > seq_len and truncate is not None
        if cut:
            sample = tokenize_conversation(tok, conversation, template, seq_len, truncate)
        if len(sample) > seq_len or not (sample.targets != IGNORE_INDEX).any():
            out.skipped += 1
        else:
            out.samples.append(sample)
            out.truncated += cut
    return out


class ChatBatches:
    """Packs tokenized conversations into rows of ``seq_len`` tokens, in a seeded order per epoch.

    A row takes conversations in order until the next does not fit, then is padded. Every
    data-parallel rank runs the same stream and keeps rows ``rank::world_size`` of each global batch.
    The state (epoch, position in it) is a JSON-able dict, so a resumed run sees the same batches.
    """

    def __init__(self, samples: list[GLMSample], seq_len: int, pad_id: int, seed: int = 0, shuffle: bool = True):
        if not samples:
            raise OpenGLMError(f"no conversation fits a row of {seq_len} tokens")
        if max(len(x) for x in samples) > seq_len:
            raise OpenGLMError(f"a conversation is longer than a row of {seq_len} tokens; leave such ones out")
        self.samples, self.seq_len, self.pad_id, self.seed, self.shuffle = samples, seq_len, pad_id, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))

    def _next_sample(self, peek: bool = False) -> GLMSample:
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        sample = self.samples[self._order[self.cursor]]
        if not peek:
            self.cursor += 1
        return sample

    def next_row(self):
        row, used = [], 0
        while used + len(self._next_sample(peek=True)) <= self.seq_len:
            row.append(self._next_sample())
            used += len(row[-1])
        return pack(row, self.seq_len, self.pad_id)

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[dict, int]:
        """This rank's rows of the next global batch as tensors (``collate``), and the batch's target count."""
        rows = [self.next_row() for _ in range(batch_size)]
        num_targets = sum(int((r.targets != IGNORE_INDEX).sum()) for r in rows)
        return collate(rows[rank::world_size]), num_targets

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


def pack_in_order(samples: list[GLMSample], seq_len: int, pad_id: int) -> list:
    """``samples`` (each at most ``seq_len`` tokens) packed greedily in order into ``PackedRow``s."""
    rows, row, used = [], [], 0
    for sample in samples:
        if row and used + len(sample) > seq_len:
            rows.append(pack(row, seq_len, pad_id))
            row, used = [], 0
        row.append(sample)
        used += len(sample)
    return rows + [pack(row, seq_len, pad_id)] if row else rows


def _validation_batches(samples, s: FinetuneSettings, pad_id: int, world: Distributed, two_d: bool):
    """The held-out conversations packed in file order (all of them, or the first ``ceil(eval_tokens /
    seq_len)`` rows, whatever the batch size), in batches of ``batch_size`` rows, and their target count."""
    rows = pack_in_order(samples, s.seq_len, pad_id)
    if s.eval_tokens:
        rows = rows[: -(-s.eval_tokens // s.seq_len)]
    rows += [pack([], s.seq_len, pad_id)] * (-len(rows) % s.batch_size)  # every rank gets as many batches
    batches = [_batch_inputs(collate(rows[i : i + s.batch_size][world.rank :: world.world_size]), two_d, world.device)
               for i in range(0, len(rows), s.batch_size)]
    return batches, sum(int((r.targets != IGNORE_INDEX).sum()) for r in rows)


# -- LoRA --------------------------------------------------------------------------------------------


def add_lora(lm, s: FinetuneSettings, base: str):
    """Wrap ``lm`` in a peft ``PeftModel`` with LoRA on the ``s.lora_targets`` modules; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in s.lora_targets.split(",") if t.strip()]
    if not targets:
        raise OpenGLMError("--lora-targets names no module")
    if "lm_head" in targets:
        raise OpenGLMError("lm_head cannot take an adapter here: the fused loss reads its weight directly")
    present = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    unknown = sorted(set(targets) - present)
    if unknown:
        raise OpenGLMError(f"no module named {', '.join(unknown)} in the model; it has e.g. "
                           f"q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj")
    config = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules=targets)
    torch.manual_seed(s.seed)  # the adapters' initialisation
    model = get_peft_model(lm, config)
    model.peft_config["default"].base_model_name_or_path = base  # peft would take it from a transformers model
    return model


def _base_reference(model: str) -> str:
    """How ``adapter_config.json`` names the base: a bundled name as is, a directory as an absolute path."""
    path = Path(model)
    return str(path.resolve()) if path.exists() else model


def merge_adapter(adapter: str | Path, output: str | Path, base: str | None = None) -> Path:
    """Merge LoRA adapters into their base model and save a plain checkpoint in ``output``.

    ``adapter``: a fine-tuning run directory (its ``adapter/``) or an adapter directory in peft's
    format. ``base``: the base checkpoint (default: the one recorded in ``adapter_config.json``).
    The output has the base's tokenizer and chat template and the end-of-turn ids as eos.
    """
    from peft import PeftModel

    from ..data.tokenizer import load_tokenizer
    from ..model.checkpoint import checkpoint_dir, load_model

    from ..utils import check_writable

    check_writable(output)
    adapter = Path(adapter)
    if (adapter / ADAPTER / "adapter_config.json").is_file():
        adapter = adapter / ADAPTER
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise OpenGLMError(f"no LoRA adapter in {adapter} (expected adapter_config.json or {ADAPTER}/)")
    base = base or json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise OpenGLMError(f"{config_path} does not name its base model; pass it explicitly")
    lm = load_model(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(lm, str(adapter)).merge_and_unload()
    base_dir = checkpoint_dir(base)
    return export_chat_model(merged, Path(output), load_tokenizer(base_dir), base_dir)


def export_chat_model(lm, directory: Path, tok, base_dir: Path, template: str | None = None) -> Path:
    """Save ``lm`` as a plain chat checkpoint: the base's generation settings with the end-of-turn
    ids as eos, the tokenizer and the chat template (the base's unless ``template`` is given)."""
    from ..data.chat import chat_template_of, end_of_turn_ids, save_chat_template
    from ..model.checkpoint import save_model

    eos = end_of_turn_ids(tok)
    lm.config = dataclasses.replace(lm.config, eos_token_id=eos)
    generation = {}
    if (base_dir / "generation_config.json").is_file():
        generation = json.loads((base_dir / "generation_config.json").read_text(encoding="utf-8"))
    generation["eos_token_id"] = eos
    save_model(lm, directory, tokenizer=tok, generation_config=generation)
    save_chat_template(directory, template or chat_template_of(base_dir))
    return directory


# -- the loop ----------------------------------------------------------------------------------------


def finetune(s: FinetuneSettings) -> FinetuneResult:
    """Fine-tune (or, with ``s.resume``, continue) a run; see the module docstring for what it writes."""
    world = init_distributed(s.device)
    try:
        return _finetune(s, world)
    finally:
        if world.world_size > 1:
            shutdown_distributed()


def _check_settings(s: FinetuneSettings, world: Distributed) -> None:
    check_run_settings(s, world)
    if s.eval_tokens < 0:
        raise OpenGLMError("--eval-tokens must be >= 0")
    if s.truncate not in (None, "left", "right"):
        raise OpenGLMError(f"--truncate takes left or right, got {s.truncate!r}")
    if s.lora and (s.lora_r < 1 or not 0.0 <= s.lora_dropout < 1.0):
        raise OpenGLMError("--lora-r must be >= 1 and --lora-dropout in [0, 1)")


def _finetune(s: FinetuneSettings, world: Distributed) -> FinetuneResult:
    from ..data.chat import chat_template_of
    from ..data.tokenizer import load_tokenizer
    from ..model.checkpoint import checkpoint_dir

    _check_settings(s, world)
    if s.threads:
        torch.set_num_threads(s.threads)
    run_dir = Path(s.out)
    found = checkpointing.find_checkpoint(run_dir)
    if found is not None and not s.resume:
        raise OpenGLMError(f"{run_dir} already holds a training checkpoint: pass --resume, or choose a new directory")
    base_dir = checkpoint_dir(s.model)
    config = Config.from_file(base_dir)
    rate = balance_rate(s.balance_rate, config, s.lora)
    check_aux_loss_coef(s.aux_loss_coef, config, s.lora)
    tok = load_tokenizer(base_dir)
    template = chat_template_of(base_dir)
    show = s.progress and world.is_main
    train_file = tokenize_file(s.data, tok, template, s.seq_len, show, s.truncate)
    if world.is_main:
        print(f"{s.data}: {len(train_file.samples)} conversations, {train_file.truncated} truncated "
              f"({s.truncate or 'off'}), {train_file.skipped} left out (longer than {s.seq_len} tokens"
              f"{'' if s.truncate else ': use --truncate left|right to keep them'}, or no assistant turn)",
              file=sys.stderr)
    val_samples = tokenize_file(s.val, tok, template, s.seq_len, show, s.truncate).samples if s.val else []
    if (s.keep_best or s.early_stop) and not val_samples:
        raise OpenGLMError("--keep-best and --early-stop need held-out conversations (--val)")
    loaded = checkpointing.load_checkpoint(found) if found is not None else None
    run_record = check_resume_settings(s, run_dir, loaded[2]["step"] if loaded else None, fixed=RESUME_FIXED)
    existed = run_dir.exists()
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_temporaries(run_dir)
    with cleanup_on_failure(run_dir, world, fresh=found is None, existed=existed):
        if world.is_main:
            _write_run_json(run_dir, run_record)
        return _train(s, world, run_dir, found, loaded, base_dir, tok, template, train_file, val_samples, rate)


def _train(s, world, run_dir, found, loaded, base_dir, tok, template, train_file, val_samples,
           rate) -> FinetuneResult:
    from ..model.checkpoint import load_model

    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    lm = load_model(base_dir, device=world.device, dtype=torch.float32).train()
    lm.requires_grad_(not s.lora)
    config = lm.config
    peft_model = add_lora(lm, s, _base_reference(s.model)) if s.lora else None
    module = PretrainLoss(lm)  # peft injects its layers into lm in place
    if s.grad_checkpointing:
        apply_activation_checkpointing(module)
    module = parallelize(module, s.parallel, world)
    optimizer = build_optimizer(module, s.lr, s.weight_decay, world.device)
    balance = LoadBalancer(module, rate, world, s.aux_loss_coef)
    min_lr = s.lr / 10 if s.min_lr is None else s.min_lr
    precision = Precision(s, world.device)

    pad_id = tok.token_id("<|endoftext|>")
    loader = ChatBatches(train_file.samples, s.seq_len, pad_id, seed=s.seed)
    state = resume(found, loaded, module, optimizer, loader, strict=not s.lora) if found is not None else {"step": 0}
    step = state["step"]
    precision.load_state_dict(state.get("scaler"))
    validation = ValidationTracker(state.get("validation"))
    two_d = config.position_encoding_2d
    val_batches = _validation_batches(val_samples, s, pad_id, world, two_d) if val_samples else None
    metrics = open_metrics(s, run_dir, world, step if found is not None else None)

    def save(step):
        model_state, optimizer_state = _full_state(module, optimizer)
        if s.lora:  # the frozen base is in the base checkpoint already
            model_state = {k: v for k, v in model_state.items() if "lora_" in k}
        if world.is_main:
            state = {"step": step, "val_loss": validation.at(step), "validation": validation.state_dict(),
                     "scaler": precision.state_dict(), "rng": checkpointing.rng_state(), "data": loader.state_dict(),
                     "settings": dataclasses.asdict(s)}
            checkpointing.save_checkpoint(run_dir, model_state, optimizer_state, state, s.keep_previous,
                                          keep=s.keep, keep_best=s.keep_best)
            if s.lora:
                # From the gathered full state, not the module's own parameters: under FSDP those are
                # shards whose storage peft cannot read. Names as peft's own state dict gives them.
                adapters = {"base_model.model." + k.removeprefix("lm."): v for k, v in model_state.items()}
                # no embedding check: peft would look the base up as a transformers model or on the Hub
                peft_model.save_pretrained(str(run_dir / ADAPTER), state_dict=adapters, save_embedding_layers=False)
            else:
                _export_full(config, model_state, run_dir / MODEL, tok, base_dir, template)

    def describe(step, loss, lr, grad_norm, steps, seconds, targets):
        targets_per_s = targets / max(seconds, 1e-9)
        return ({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "epoch": loader.epoch,
                 "targets_per_s": targets_per_s},
                {"loss": f"{loss:.4f}", "epoch": loader.epoch},
                f"step {step}/{s.steps} loss {loss:.4f} lr {lr:.2e} grad norm {grad_norm:.3f} "
                f"{targets_per_s:,.0f} target tokens/s")

    # The held-out loss before any step is the starting point to compare against.
    finished = False
    try:
        step, loss, val_loss, interrupted = run_steps(
            s, step, module, optimizer, loader, world, two_d, precision, min_lr, val_batches, metrics, save,
            describe, show=s.progress and world.is_main, validation=validation, eval_first=found is None,
            balance=balance)
        finished = step >= s.steps
    finally:
        metrics.close(finished)
    early = not interrupted and s.early_stop and validation.since_best >= s.early_stop
    if world.is_main:
        if step < s.steps and not early:
            print(f"stopped at step {step}; checkpoint saved in {run_dir / checkpointing.CHECKPOINT}; "
                  f"continue with --resume", file=sys.stderr)
        else:
            if s.lora and s.merge:
                merge_adapter(run_dir / ADAPTER, run_dir / MODEL)
            where = run_dir / (MODEL if not s.lora or s.merge else ADAPTER)
            print(f"fine-tuned {step} steps{' (stopped early)' if early else ''}; saved in {where}", file=sys.stderr)
    return FinetuneResult(step, loss, val_loss, interrupted, train_file.skipped, train_file.truncated)


def _export_full(config, model_state: dict, directory: Path, tok, base_dir: Path, template: str) -> None:
    """Save full-fine-tuned weights (the training module's state) as a plain chat checkpoint."""
    from ..model.glm import GLMForCausalLM

    with torch.device("meta"):
        lm = GLMForCausalLM(config)
    state = {k.removeprefix("lm."): v for k, v in model_state.items()}
    lm.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    export_chat_model(lm, directory, tok, base_dir, template)
