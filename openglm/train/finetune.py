"""Supervised fine-tuning on chat conversations: full or LoRA, packed, resumable exactly.

``finetune(FinetuneSettings(...))`` starts from a checkpoint and trains on OpenAI-format
conversations (``{"messages": [...], "tools": [...]?}`` a line), rendered by
``openglm.data.chat.render_chat``. The loss is the cross-entropy of the tokens the assistant writes
and of the token that ends each assistant turn (the ``loss_mask`` of ``render_chat``), summed over an
optimizer step and divided by their number.

Packing: conversations fill rows of ``seq_len`` tokens in a seeded order (a new order each epoch);
``openglm.model.masks.packed_mask`` keeps each conversation from seeing the others, and positions
restart at 0 for each one, so a packed row gives every conversation the loss it has alone.

The optimizer, schedule, checkpoints, Ctrl-C handling, metrics and progress bar are those of every
``Run`` (``openglm.train.run``); the run directory holds::

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
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data.objective import IGNORE_INDEX, GLMSample, collate, pack
from ..errors import OpenGLMError
from . import checkpointing
from .balance import balance_rate, check_aux_loss_coef
from .finetune_cli import FinetuneSettings
from .parallel import Distributed
from .run import Run, batch_inputs, export_weights

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
    batches = [batch_inputs(collate(rows[i : i + s.batch_size][world.rank :: world.world_size]), two_d, world.device)
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


# -- the run -----------------------------------------------------------------------------------------


class FineTuning(Run):
    """``openglm finetune``: a checkpoint trained on chat conversations, in full or with LoRA adapters."""

    fixed = RESUME_FIXED

    @property
    def eval_first(self) -> bool:
        """A new run's held-out loss before any step is the starting point to compare against."""
        return self.found is None

    @property
    def strict_resume(self) -> bool:
        return not self.s.lora

    def check_settings(self) -> None:
        super().check_settings()
        s = self.s
        if s.truncate not in (None, "left", "right"):
            raise OpenGLMError(f"--truncate takes left or right, got {s.truncate!r}")
        if s.lora and (s.lora_r < 1 or not 0.0 <= s.lora_dropout < 1.0):
            raise OpenGLMError("--lora-r must be >= 1 and --lora-dropout in [0, 1)")

    def prepare(self) -> None:
        from ..data.chat import chat_template_of
        from ..data.tokenizer import load_tokenizer
        from ..model.checkpoint import checkpoint_dir

        s = self.s
        self.base_dir = checkpoint_dir(s.model)
        self.config = Config.from_file(self.base_dir)
        self.balance_rate = balance_rate(s.balance_rate, self.config, s.lora)
        check_aux_loss_coef(s.aux_loss_coef, self.config, s.lora)
        self.tok = load_tokenizer(self.base_dir)
        self.template = chat_template_of(self.base_dir)
        show = s.progress and self.world.is_main
        self.train_file = train = tokenize_file(s.data, self.tok, self.template, s.seq_len, show, s.truncate)
        if self.world.is_main:
            print(f"{s.data}: {len(train.samples)} conversations, {train.truncated} truncated "
                  f"({s.truncate or 'off'}), {train.skipped} left out (longer than {s.seq_len} tokens"
                  f"{'' if s.truncate else ': use --truncate left|right to keep them'}, or no assistant turn)",
                  file=sys.stderr)
        self.val_samples = tokenize_file(s.val, self.tok, self.template, s.seq_len, show, s.truncate).samples \
            if s.val else []
        if (s.keep_best or s.early_stop) and not self.val_samples:
            raise OpenGLMError("--keep-best and --early-stop need held-out conversations (--val)")
        self.pad_id = self.tok.token_id("<|endoftext|>")

    def build_model(self):
        from ..model.checkpoint import load_model

        s = self.s
        lm = load_model(self.base_dir, device=self.world.device, dtype=torch.float32).train()
        lm.requires_grad_(not s.lora)
        self.config = lm.config
        self.peft_model = add_lora(lm, s, _base_reference(s.model)) if s.lora else None
        return lm  # peft injects its layers into lm in place

    def make_loader(self) -> ChatBatches:
        return ChatBatches(self.train_file.samples, self.s.seq_len, self.pad_id, seed=self.s.seed)

    def validation_batches(self):
        if not self.val_samples:
            return None
        return _validation_batches(self.val_samples, self.s, self.pad_id, self.world, self.two_d)

    def throughput(self, step: int, steps: int, seconds: float, targets: int) -> tuple[dict, dict, str]:
        targets_per_s = targets / max(seconds, 1e-9)
        return ({"epoch": self.loader.epoch, "targets_per_s": targets_per_s}, {"epoch": self.loader.epoch},
                f"{targets_per_s:,.0f} target tokens/s")

    def checkpoint_weights(self, model_state: dict) -> dict:
        if self.s.lora:  # the frozen base is in the base checkpoint already
            return {k: v for k, v in model_state.items() if "lora_" in k}
        return model_state

    def export(self, model_state: dict) -> None:
        if self.s.lora:
            # From the gathered full state, not the module's own parameters: under FSDP those are
            # shards whose storage peft cannot read. Names as peft's own state dict gives them.
            adapters = {"base_model.model." + k.removeprefix("lm."): v for k, v in model_state.items()}
            # no embedding check: peft would look the base up as a transformers model or on the Hub
            self.peft_model.save_pretrained(str(self.run_dir / ADAPTER), state_dict=adapters,
                                            save_embedding_layers=False)
        else:
            export_chat_model(export_weights(self.config, model_state), self.run_dir / MODEL, self.tok,
                              self.base_dir, self.template)

    def finish(self, step, loss, val_loss, interrupted) -> FinetuneResult:
        s, run_dir = self.s, self.run_dir
        early = not interrupted and self.stopped_early()
        if self.world.is_main:
            if step < s.steps and not early:
                print(f"stopped at step {step}; checkpoint saved in {run_dir / checkpointing.CHECKPOINT}; "
                      f"continue with --resume", file=sys.stderr)
            else:
                if s.lora and s.merge:
                    merge_adapter(run_dir / ADAPTER, run_dir / MODEL)
                where = run_dir / (MODEL if not s.lora or s.merge else ADAPTER)
                print(f"fine-tuned {step} steps{' (stopped early)' if early else ''}; saved in {where}",
                      file=sys.stderr)
        return FinetuneResult(step, loss, val_loss, interrupted, self.train_file.skipped, self.train_file.truncated)


def finetune(s: FinetuneSettings) -> FinetuneResult:
    """Fine-tune (or, with ``s.resume``, continue) a run; see the module docstring for what it writes."""
    return FineTuning(s).execute()
