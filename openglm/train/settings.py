"""The settings of a pretraining run: one dataclass whose fields the ``openglm pretrain`` flags fill.

Kept free of torch imports so that building the CLI stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PretrainSettings:
    """Everything a run is made of; the CLI flags of ``openglm pretrain`` map onto these fields."""

    config: str
    data: str
    out: str
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
    grad_checkpointing: bool = False
    emb_shrink: float = 1.0  # GLM-130B uses 0.1; 1.0 leaves the embedding gradient as is
    objective: str = "token=0.5,sentence=0.3,document=0.2,causal=0"
    mask_ratio: float = 0.15
    append_eos: bool = True
    eval_every: int = 200
    eval_batches: int = 4
    save_every: int = 500
    keep_previous: bool = False
    log_every: int = 10
    resume: bool = False
    stop_after: int | None = None  # steps to run in this invocation before saving and exiting
    seed: int = 0
    threads: int | None = None
    compile: bool = False
    parallel: str = "ddp"
    progress: bool = True
