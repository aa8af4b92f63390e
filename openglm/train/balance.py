"""Auxiliary-loss-free load balancing of MoE routers (DeepSeek-V3, as GLM-4.5 trains) and the load metrics.

After each optimizer step, outside ``forward``, every MoE layer's ``e_score_correction_bias`` moves by
``rate`` up for the experts that got fewer tokens than the layer's mean in that step and down for
those that got more (``bias += rate * sign(mean load - load)``). The loads are the routers' expert
counts summed over the step's micro-batches and over data-parallel ranks, so every rank applies the
same update. The bias is a buffer, not an optimizer parameter: it only changes which experts are
chosen, never the weights of their outputs, and it travels with the model's state dict.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import Config
from ..errors import OpenGLMError
from .parallel import Distributed

DEFAULT_RATE = 1e-3


def balance_rate(requested: float | None, config: Config, lora: bool = False) -> float:
    """The rate a run uses: ``requested`` (None: ``DEFAULT_RATE`` for an MoE model, 0 for a dense one
    or a LoRA run, whose checkpoints hold the adapters only and so could not resume the biases)."""
    if requested is None:
        return DEFAULT_RATE if config.num_experts and not lora else 0.0
    if not requested >= 0:
        raise OpenGLMError(f"--balance-rate must be >= 0, got {requested}")
    if requested and not config.num_experts:
        raise OpenGLMError(f"--balance-rate applies to mixture-of-experts models only; {config.name} is dense")
    if requested and lora:
        raise OpenGLMError("--balance-rate needs full fine-tuning: a LoRA run saves only its adapters, "
                           "not the routers' correction biases")
    return requested


def check_aux_loss_coef(coef: float, config: Config, lora: bool = False) -> None:
    if not coef >= 0:
        raise OpenGLMError(f"--aux-loss-coef must be >= 0, got {coef}")
    if coef and not config.num_experts:
        raise OpenGLMError(f"--aux-loss-coef applies to mixture-of-experts models only; {config.name} is dense")
    if coef and lora:
        raise OpenGLMError("--aux-loss-coef needs full fine-tuning: LoRA leaves the routers frozen")


def routers(module: nn.Module) -> list[nn.Module]:
    """The MoE routers of a model (wrapped or not), in layer order."""
    from ..model.glm import Router

    return [m for m in module.modules() if isinstance(m, Router)]


class LoadBalancer:
    """Collects the routers' expert counts of each micro-batch, updates the correction biases after the
    optimizer step, and keeps the counts since the last log for ``moe_load`` / ``moe_imbalance``."""

    def __init__(self, module: nn.Module, rate: float, world: Distributed, aux_loss_coef: float = 0.0):
        self.routers, self.rate, self.world, self.aux_loss_coef = routers(module), rate, world, aux_loss_coef
        self.step_counts: torch.Tensor | None = None  # (L, E) of the current step, this rank
        self.interval_counts: torch.Tensor | None = None  # (L, E) since the last report, all ranks
        self.aux_sum, self.aux_num = 0.0, 0  # auxiliary losses since the last report, this rank
        for router in self.routers:
            router.keep_routing = aux_loss_coef > 0

    def __bool__(self) -> bool:
        return bool(self.routers)

    def collect(self) -> None:
        """Add the counts of the forward just run (called after each micro-batch's forward, before its
        backward: recomputing activations in backward runs the routers again)."""
        counts = torch.stack([r.expert_counts for r in self.routers])
        self.step_counts = counts if self.step_counts is None else self.step_counts + counts

    def aux_loss(self, seq_len: int) -> torch.Tensor | None:
        """DeepSeek-V3's complementary sequence-wise balance loss of the forward just run, times the
        coefficient (None when it is 0): per row of ``seq_len`` tokens and MoE layer,
        ``sum_i f_i * P_i`` with ``f_i = E / (k * T) * (tokens routed to expert i)`` and ``P_i`` the mean
        over the row of expert i's score normalised over all experts; averaged over rows, summed over layers."""
        if not self.aux_loss_coef:
            return None
        total = None
        for router in self.routers:
            scores, experts = router.routing
            router.routing = None
            N, E = scores.shape
            k = experts.shape[1]
            rows = experts.view(-1, seq_len * k)  # (B, T*k)
            counts = torch.zeros(rows.shape[0], E, device=scores.device).scatter_add_(
                1, rows, torch.ones(rows.shape, device=scores.device))  # (B, E)
            f = counts * (E / (k * seq_len))
            p = (scores / scores.sum(-1, keepdim=True)).view(-1, seq_len, E).mean(1)  # (B, E)
            loss = (f * p).sum(-1).mean()
            total = loss if total is None else total + loss
        total = total * self.aux_loss_coef
        self.aux_sum, self.aux_num = self.aux_sum + total.item(), self.aux_num + 1
        return total

    @torch.no_grad()
    def step(self) -> None:
        """After the optimizer step: move the biases toward the under-used experts."""
        if self.step_counts is None:
            return
        counts = self.step_counts.to(torch.float64)
        self.step_counts = None
        if self.world.world_size > 1:
            dist.all_reduce(counts)
        self.interval_counts = counts if self.interval_counts is None else self.interval_counts + counts
        if self.rate:
            direction = torch.sign(counts.mean(-1, keepdim=True) - counts)  # (L, E)
            for router, d in zip(self.routers, direction):
                bias = router.e_score_correction_bias
                bias.add_(d.to(device=bias.device, dtype=bias.dtype), alpha=self.rate)

    def report(self) -> dict:
        """``moe_load`` (per MoE layer, each expert's share of the routed tokens) and ``moe_imbalance``
        (max load / mean load, averaged over layers) since the last report; {} when nothing was routed."""
        counts, self.interval_counts = self.interval_counts, None
        if counts is None:
            return {}
        load = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        imbalance = (counts.max(-1).values / counts.mean(-1).clamp_min(1e-12)).mean()
        record = {"moe_imbalance": float(imbalance), "moe_load": [[round(float(x), 5) for x in row] for row in load]}
        if self.aux_num:  # mean over this rank's micro-batches (times the coefficient)
            record["moe_aux_loss"] = self.aux_sum / self.aux_num
            self.aux_sum, self.aux_num = 0.0, 0
        return record
