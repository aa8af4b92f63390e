"""``openglm finetune``: supervised fine-tuning of a checkpoint on chat conversations, and LoRA merging.

``FinetuneSettings`` lives here, free of torch imports, so that building the CLI stays fast;
``openglm.train.finetune`` re-exports it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .cli import add_optimizer_options, add_run_options, settings_option

DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj"

DESCRIPTION = """\
Fine-tune MODEL (a checkpoint directory or a bundled name such as glm-tiny) on conversations in
OpenAI chat format: one {"messages": [...], "tools": [...]?} object a line, roles system / user /
assistant (with tool_calls) / tool. Conversations are rendered with the model's chat template; only
the assistant's tokens and the token ending each assistant turn are trained on. Several
conversations share a row (--seq-len tokens) without seeing each other; longer ones are skipped
or, with --truncate left|right, cut to fit (the counts are printed).

Writes into RUN_DIR: run.json, metrics.jsonl, checkpoint/ (continue with --resume; Ctrl-C saves one
and stops), and model/: a plain checkpoint (weights, tokenizer, chat template, generation config
whose eos ids end an assistant turn) that openglm.load_model reads. With --lora only low-rank
adapters train; RUN_DIR/adapter/ holds them (peft format) and at the end they are merged into
RUN_DIR/model/ (unless --no-merge).

  openglm finetune merge RUN_DIR -o OUT    merge RUN_DIR/adapter (or an adapter directory) into
                                           its base model and save a plain checkpoint in OUT"""


@dataclass
class FinetuneSettings:
    """Everything a fine-tuning run is made of; the ``openglm finetune`` flags map onto these fields."""

    model: str  # checkpoint directory or bundled name
    data: str  # train conversations (JSONL)
    out: str
    val: str | None = None  # held-out conversations (JSONL)
    steps: int = 1000
    batch_size: int = 8  # packed rows per micro-batch, over all ranks
    seq_len: int = 512
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float | None = None  # default lr / 10
    warmup: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0
    bf16: bool = False
    fp16: bool = False
    device: str | None = None
    grad_checkpointing: bool = False
    lora: bool = False
    balance_rate: float | None = None  # MoE correction-bias step per optimizer step (None: 1e-3 for full MoE runs)
    aux_loss_coef: float = 0.0  # MoE sequence-wise balance loss weight
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = DEFAULT_LORA_TARGETS
    merge: bool = True  # merge the adapter into RUN_DIR/model at the end of a LoRA run
    eval_every: int = 100  # 0: evaluate at the end only
    eval_tokens: int = 0  # the first rows of packed held-out conversations holding this many tokens; 0: all
    save_every: int = 200  # 0: save at the end only
    keep_previous: bool = False
    keep: int = 1
    keep_best: bool = False
    early_stop: int = 0
    log_to: str | None = None
    truncate: str | None = None  # "left" or "right": cut conversations longer than seq_len instead of leaving them out
    log_every: int = 10
    resume: bool = False
    stop_after: int | None = None
    seed: int = 0
    threads: int | None = None
    parallel: str = "ddp"
    expert_parallel: int = 1  # MoE: ranks each expert-parallel group shards the routed experts over (1: none)
    progress: bool = True


def register(subparsers) -> None:
    d = FinetuneSettings(model="", data="", out="")
    p = subparsers.add_parser("finetune", help="fine-tune a model on chat conversations (full or LoRA)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="%(prog)s MODEL --data TRAIN.jsonl -o RUN_DIR [options]\n"
                                    "       %(prog)s merge RUN_DIR -o OUT")

    option = settings_option(p, d)

    p.add_argument("model", metavar="MODEL", help="checkpoint directory or bundled name; or the word `merge`")
    p.add_argument("run", nargs="?", metavar="RUN_DIR", help=argparse.SUPPRESS)
    p.add_argument("--data", metavar="TRAIN.jsonl", help="training conversations")
    p.add_argument("--val", metavar="VAL.jsonl", help="held-out conversations for the validation loss")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run directory (merge: output checkpoint)")
    add_optimizer_options(p, option, rows="packed rows")
    add_run_options(p, option)
    option("--truncate", "cut conversations longer than --seq-len from the left (oldest turns, keeping the system "
                         "turn) or the right, instead of leaving them out", choices=["left", "right"])
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute layer activations in backward")
    p.add_argument("--lora", action="store_true", help="train low-rank adapters only (peft), base weights frozen")
    option("--lora-r", "adapter rank", type=int)
    option("--lora-alpha", "adapter scale numerator (scale = alpha / r)", type=float)
    option("--lora-dropout", "dropout on the adapter input", type=float)
    option("--lora-targets", "comma-separated module names that get adapters")
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="LoRA: keep only RUN_DIR/adapter, do not write the merged RUN_DIR/model")
    option("--eval-every", "steps between validation losses, 0 for the end only", type=int)
    option("--eval-tokens", "tokens of held-out conversations to validate on (whole rows, the same for every "
                            "batch size), 0 for all", type=int)
    option("--save-every", "steps between checkpoints, 0 for the end only", type=int)
    p.add_argument("--keep-previous", action="store_true", help="keep the one before the last as checkpoint.prev")
    option("--log-every", "steps between metrics lines", type=int)
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint")
    p.add_argument("--stop-after", type=int, metavar="N", help="save and exit after N steps of this invocation")
    option("--seed", "seed of data order and adapter initialisation", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    option("--parallel", "data parallelism under torchrun", choices=["ddp", "fsdp"])
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..errors import OpenGLMError

    if args.model == "merge":
        if not args.run:
            raise OpenGLMError("usage: openglm finetune merge RUN_DIR -o OUT")
        from .finetune import merge_adapter

        out = merge_adapter(args.run, args.output)
        print(f"merged checkpoint saved in {out}")
        return 0
    if args.run:
        raise OpenGLMError(f"unexpected argument {args.run!r} (only `openglm finetune merge` takes a RUN_DIR)")
    if not args.data:
        raise OpenGLMError("--data TRAIN.jsonl is required")
    from .finetune import finetune

    fields = set(FinetuneSettings.__dataclass_fields__) - {"out"}
    settings = FinetuneSettings(out=args.output, **{k: v for k, v in vars(args).items() if k in fields})
    result = finetune(settings)
    return 130 if result.interrupted else 0
