"""GLM pretraining: a ``Run`` (``openglm.train.run``) over token shards with the blank-infilling objective.

``pretrain(PretrainSettings(...))`` trains a model (a new one from a config, or existing weights with
``init``) on token shards written by ``openglm data prepare``. Besides what every run writes
(``run.json``, ``metrics.jsonl``, checkpoints; see ``openglm.train.run``) the run directory holds::

    model/            the latest weights in the Hugging Face layout, with the tokenizer

AdamW, the warmup + cosine schedule, accumulation, clipping, exact resume, Ctrl-C and the progress
line are the shared skeleton's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config
from ..data.objective import IGNORE_INDEX, SpecialIds, collate, pack
from ..errors import OpenGLMError
from . import checkpointing
from .balance import balance_rate, check_aux_loss_coef
from .data import PackedBatches, parse_objective, sentence_end_ids
from .run import Run, batch_inputs, export_weights
from .settings import PretrainSettings

# Settings that fix the model and the data stream: a resumed run must keep them.
RESUME_FIXED = ("config", "init", "overrides", "seq_len", "batch_size", "grad_accum", "seed", "objective",
                "mask_ratio", "append_eos")

@dataclass
class PretrainResult:
    step: int
    loss: float | None  # of the last step run
    val_loss: float | None  # of the last evaluation
    interrupted: bool


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
    batches = [batch_inputs(collate(rows[i : i + s.batch_size][world.rank :: world.world_size]), two_d, world.device)
               for i in range(0, len(rows), s.batch_size)]
    return batches, num_targets




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


class Pretraining(Run):
    """``openglm pretrain``: a model from a config (or ``--init`` weights) trained on token shards."""

    fixed = RESUME_FIXED

    def check_settings(self) -> None:
        super().check_settings()
        s = self.s
        if not 0.0 < s.emb_shrink <= 1.0:
            raise OpenGLMError(f"--emb-shrink must be in (0, 1], got {s.emb_shrink}")
        if (s.bf16 and self.world.device.type == "cpu" and self.world.is_main
                and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            print("warning: this CPU has no native bfloat16 matmul (AVX512-BF16 or AMX): --bf16 steps run many "
                  "times slower than fp32 here", file=sys.stderr)

    def prepare(self) -> None:
        s = self.s
        self.weights = parse_objective(s.objective)
        self.train, self.val, self.tok = _load_data(s)
        self.special = SpecialIds.from_tokenizer(self.tok)
        self.sentence_ends = sentence_end_ids(self.tok)
        if self.weights["sentence"] > 0 and not self.sentence_ends:
            raise OpenGLMError("the tokenizer has none of '。！？.!?\\n' as a single token: give sentence weight 0")
        self.config, self.init_dir, note = model_config(s, self.tok)
        self.balance_rate = balance_rate(s.balance_rate, self.config)
        check_aux_loss_coef(s.aux_loss_coef, self.config)
        _check_data_fits(s, self.config, [self.train] + ([self.val] if self.val is not None else []))
        if (s.keep_best or s.early_stop) and (self.val is None or not s.eval_tokens):
            raise OpenGLMError("--keep-best and --early-stop need validation data (a val split and --eval-tokens > 0)")
        if note:
            self.notes.append(note)

    def build_model(self) -> nn.Module:
        from ..model.glm import GLMForCausalLM

        s, device = self.s, self.world.device
        if self.init_dir is not None:
            from ..model.checkpoint import load_model

            lm = load_model(self.init_dir, device=device, dtype=torch.float32).train()
            if getattr(lm, "quantization", None) is not None:
                raise OpenGLMError(f"{self.init_dir} is quantized; continue pretraining from full-precision weights")
            lm.config = self.config
        else:
            lm = GLMForCausalLM.from_config(self.config, device=device, seed=s.seed)
        if s.emb_shrink < 1.0:
            embedding_gradient_shrink(lm.model.embed_tokens, s.emb_shrink)
        return lm

    def make_loader(self) -> PackedBatches:
        s = self.s
        return PackedBatches(self.train, s.seq_len, self.special, seed=s.seed, weights=self.weights,
                             sentence_end_ids=self.sentence_ends, mask_ratio=s.mask_ratio, append_eos=s.append_eos)

    def validation_batches(self):
        if self.val is None or not self.s.eval_tokens:
            return None
        return _validation_batches(self.val, self.s, self.special, self.sentence_ends, self.weights, self.world,
                                   self.two_d)

    def throughput(self, step: int, steps: int, seconds: float, targets: int) -> tuple[dict, dict, str]:
        tokens_per_step = self.s.batch_size * self.s.grad_accum * self.s.seq_len
        tokens_per_s = tokens_per_step * steps / max(seconds, 1e-9)  # tokens/s counts training time only
        return ({"tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s},
                {"tok_s": f"{tokens_per_s:,.0f}"}, f"{tokens_per_s:,.0f} tokens/s")

    def export(self, model_state: dict) -> None:
        """The weights in the Hugging Face layout that ``openglm.load_model`` reads, with the tokenizer."""
        from ..model.checkpoint import save_model

        save_model(export_weights(self.config, model_state), self.run_dir / "model", tokenizer=self.tok)

    def finish(self, step, loss, val_loss, interrupted) -> PretrainResult:
        if self.world.is_main:
            run_dir, s = self.run_dir, self.s
            if step < s.steps and not interrupted and self.stopped_early():
                print(f"stopped early at step {step}; model saved in {run_dir / 'model'}", file=sys.stderr)
            elif step < s.steps:
                print(f"stopped at step {step}; checkpoint saved in {run_dir / checkpointing.CHECKPOINT}; "
                      f"continue with --resume", file=sys.stderr)
            else:
                print(f"trained {step} steps; model saved in {run_dir / 'model'}", file=sys.stderr)
        return PretrainResult(step, loss, val_loss, interrupted)


def pretrain(s: PretrainSettings) -> PretrainResult:
    """Train (or, with ``s.resume``, continue) a run; see the module docstring for what it writes."""
    return Pretraining(s).execute()
