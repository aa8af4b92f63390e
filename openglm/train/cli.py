"""``openglm pretrain``: train a GLM from a named config on prepared token shards."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Pretrain a GLM on token shards written by `openglm data prepare`, with GLM's blank-infilling
objective: from random weights (--config: a named config such as glm-tiny, a config.json or a
checkpoint directory; --set key=value changes fields), or continued from existing weights (--init: a
bundled name, a run directory or any Hugging Face GLM checkpoint). Writes RUN_DIR/metrics.jsonl,
RUN_DIR/checkpoint/ (continue with --resume; Ctrl-C saves one and stops) and RUN_DIR/model/ (Hugging
Face layout, loadable with openglm.load_model). Under torchrun the same command trains data-parallel (--parallel ddp|fsdp),
and a MoE model can shard its experts over the processes (--expert-parallel N); --batch-size is then the global
number of rows per micro-batch."""


def settings_option(parser, defaults):
    """``option(flag, help, **kwargs)``: adds a flag whose default is the ``defaults`` field of the same name."""

    def option(flag, help, **kwargs):
        field = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, default=getattr(defaults, field), help=f"{help} (default %(default)s)", **kwargs)

    return option


def add_optimizer_options(parser, option, rows: str) -> None:
    """The steps, batch and optimizer flags pretraining and fine-tuning share; ``rows`` names what a row holds."""
    option("--steps", "optimizer steps in all", type=int)
    option("--batch-size", f"{rows} per micro-batch, over all processes", type=int)
    option("--seq-len", "tokens per row", type=int)
    option("--grad-accum", "micro-batches per optimizer step", type=int)
    option("--lr", "peak learning rate", type=float)
    parser.add_argument("--min-lr", type=float, help="final learning rate (default: lr / 10)")
    option("--warmup", "linear warmup steps", type=int)
    option("--weight-decay", "AdamW decay of matrices and embeddings", type=float)
    option("--clip", "gradient norm clip, 0 for none", type=float)


def add_run_options(parser, option) -> None:
    """Precision, device, retention, early stopping and tracking flags pretraining and fine-tuning share."""
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights and optimizer stay fp32)")
    precision.add_argument("--fp16", action="store_true",
                           help="float16 autocast with a gradient scaler (GPUs without bfloat16)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: this process's GPU if any, else cpu)")
    option("--keep", "checkpoints kept: the latest and the N-1 before it, as RUN_DIR/checkpoint-STEP",
           type=int, metavar="N")
    parser.add_argument("--keep-best", action="store_true",
                        help="also keep the checkpoint with the lowest validation loss (saved at each new best)")
    option("--early-stop", "stop after N evaluations without a lower validation loss, 0 for never",
           type=int, metavar="N")
    parser.add_argument("--log-to", metavar="TRACKERS",
                        help="also log the metrics to tensorboard, wandb (offline) and/or mlflow (a file store in "
                             "RUN_DIR), comma-separated; each needs its package (extras of the same name)")
    parser.add_argument("--balance-rate", type=float, metavar="R",
                        help="MoE models: step of the routers' correction bias toward under-used experts after each "
                             "optimizer step, 0 to turn balancing off (default 1e-3; dense models and LoRA: 0)")
    option("--aux-loss-coef", "MoE models: weight of DeepSeek-V3's sequence-wise balance loss, 0 for none",
           type=float, metavar="C")
    option("--expert-parallel", "MoE models under torchrun: shard the routed experts over groups of N processes, "
                                "tokens sent to their experts' process and back (all-to-all); with --parallel ddp",
           type=int, metavar="N")


def register(subparsers) -> None:
    from .settings import PretrainSettings

    d = PretrainSettings(config=None, data="", out="")
    p = subparsers.add_parser("pretrain", help="pretrain a GLM on prepared token shards", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    option = settings_option(p, d)

    p.add_argument("--config", help="config name (see `openglm info`, e.g. glm-tiny), config.json file or "
                                    "checkpoint directory: the model to train from random weights")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from these weights (and their config): bundled name, run directory or checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a config field, e.g. --set num_layers=4 (repeatable)")
    p.add_argument("--data", required=True, metavar="DIR", help="directory from `openglm data prepare` (train/, val/)")
    p.add_argument("--tokenizer", metavar="PATH_OR_NAME",
                   help="tokenizer the data was made with (default: the one stored with the data)")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run directory")
    add_optimizer_options(p, option, rows="rows")
    option("--objective", "weights of GLM's token, sentence and document blanks and of plain causal LM")
    option("--mask-ratio", "share of tokens blanked by token and sentence spans", type=float)
    p.add_argument("--no-eos", dest="append_eos", action="store_false", help="do not end documents with <|endoftext|>")
    add_run_options(p, option)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute layer activations in backward")
    option("--emb-shrink", "GLM-130B embedding gradient shrink, 0.1 there; 1 is off", type=float, metavar="ALPHA")
    option("--eval-every", "steps between validation losses, 0 for the end only", type=int)
    option("--eval-tokens", "tokens of the fixed validation set (the same for every batch size)", type=int)
    option("--save-every", "steps between checkpoints, 0 for the end only", type=int)
    p.add_argument("--keep-previous", action="store_true", help="keep the one before the last as checkpoint.prev")
    option("--log-every", "steps between metrics lines", type=int)
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="save and exit after N steps of this invocation (e.g. to fit a job time limit)")
    option("--seed", "seed of weights, data order and masking", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    option("--parallel", "data parallelism under torchrun", choices=["ddp", "fsdp"])
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .loop import pretrain
    from .settings import PretrainSettings

    from ..errors import OpenGLMError

    if not args.config and not args.init:
        raise OpenGLMError("give --config (a new model) or --init (weights to continue from)")
    fields = set(PretrainSettings.__dataclass_fields__) - {"out"}
    settings = PretrainSettings(out=args.output, **{k: v for k, v in vars(args).items() if k in fields})
    result = pretrain(settings)
    return 130 if result.interrupted else 0
