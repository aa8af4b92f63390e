"""The settings of a pretraining run: one dataclass whose fields the ``openglm pretrain`` flags fill.

Kept free of torch imports so that building the CLI stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PretrainSettings:
    """Everything a run is made of; the CLI flags of ``openglm pretrain`` map onto these fields."""

    config: str | None  # a registry name, a config.json file or a checkpoint directory (None: --init's)
    data: str
    out: str
    init: str | None = None  # weights to start from: a bundled name, a run directory or a checkpoint
    overrides: list[str] = field(default_factory=list)  # "key=value" config fields (--set)
    tokenizer: str | None = None  # default: the tokenizer the shards were made with
    steps: int = 1000
    batch_size: int = 8  # rows per micro-batch, over all ranks
    seq_len: int = 512
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    bf16: bool = False
    fp16: bool = False  # float16 autocast with a gradient scaler
    device: str | None = None  # default: cuda (this process's GPU) when available, else cpu
    grad_checkpointing: bool = False
    emb_shrink: float = 1.0  # GLM-130B uses 0.1; 1.0 leaves the embedding gradient as is
    balance_rate: float | None = None  # MoE correction-bias step per optimizer step (None: 1e-3 for MoE, 0 dense)
    aux_loss_coef: float = 0.0  # MoE sequence-wise balance loss weight
    objective: str = "token=0.5,sentence=0.3,document=0.2,causal=0"
    mask_ratio: float = 0.15
    append_eos: bool = True
    eval_every: int = 200
    eval_tokens: int = 16384  # size of the fixed validation set, whatever the batch size
    save_every: int = 500
    keep_previous: bool = False
    keep: int = 1  # checkpoints kept: the latest and the keep - 1 before it
    keep_best: bool = False  # also keep the checkpoint with the lowest validation loss
    early_stop: int = 0  # stop after this many evaluations without a lower validation loss (0: never)
    log_to: str | None = None  # comma-separated trackers: tensorboard, wandb, mlflow
    log_every: int = 10
    resume: bool = False
    stop_after: int | None = None  # steps to run in this invocation before saving and exiting
    seed: int = 0
    threads: int | None = None
    compile: bool = False
    parallel: str = "ddp"
    expert_parallel: int = 1  # MoE: ranks each expert-parallel group shards the routed experts over (1: none)
    progress: bool = True
