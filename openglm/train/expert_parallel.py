"""Expert parallelism: the routed experts of each MoE layer sharded over the ranks of a process group.

With ``--expert-parallel N`` under torchrun (N dividing the number of processes W), ranks form
expert-parallel groups of N consecutive ranks, and in each group rank i holds experts
``[i*E/N, (i+1)*E/N)`` of every MoE layer. A layer's tokens, grouped by their chosen experts, go to
the ranks holding those experts (``torch.distributed.all_to_all_single``), are computed there one
matmul per expert, and come back by the reverse exchange to be weighted and summed: the layer computes
what ``Experts.forward`` does on one process. Both exchanges carry gradients.

Everything else (attention, routers, shared experts, embeddings) stays replicated and data-parallel
(DDP over all W ranks, which is told to leave the experts alone). Each rank reads its own rows of the
batch, as under plain DDP; an expert's gradient then holds the tokens of its whole expert-parallel
group, and is summed over the W/N ranks holding the same expert (its expert-data-parallel group).

Checkpoints hold the full experts in the Hugging Face layout: the shards (and their AdamW moments)
are gathered to save and sliced again to resume, so a run resumes with any N, or on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..errors import OpenGLMError
from .parallel import Distributed

PROJECTIONS = ("gate_up_proj", "down_proj")


class _Exchange(torch.autograd.Function):
    """``all_to_all_single`` with a gradient: rows ``x [sum(send), ...]`` go out in blocks of ``send[r]``
    to each rank r of ``group``; ``recv[r]`` rows come in from each. Backward sends the gradients back
    the way the rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return back, None, None, None


class ShardedExperts(nn.Module):
    """This rank's ``E/N`` experts of one MoE layer, in place of its ``Experts``: the same parameter
    names (``gate_up_proj [E/N, 2I, C]``, ``down_proj [E/N, C, I]``), the same ``forward``."""

    def __init__(self, experts: nn.Module, group, size: int, index: int):
        super().__init__()
        self.num_experts = experts.gate_up_proj.shape[0]
        self.local = self.num_experts // size
        self.group, self.size, self.first = group, size, index * self.local
        for name in PROJECTIONS:
            full = getattr(experts, name)
            setattr(self, name, nn.Parameter(full.detach()[self.first : self.first + self.local].clone()))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``x [N, C]``, the router's ``weights, experts [N, k]`` -> weighted sum of the chosen experts ``[N, C]``."""
        from ..model.glm import expert_products

        N, k = experts.shape
        flat = experts.flatten()  # (N*k,) one slot per (token, choice)
        order = flat.argsort(stable=True)  # slots grouped by expert, hence by the rank holding it
        counts = torch.bincount(flat, minlength=self.num_experts)  # (E,)
        token = order // k  # (N*k,) the token of each grouped slot
        # arrived[s, e]: slots rank s sends to this rank's local expert e
        arrived = torch.empty_like(counts)
        dist.all_to_all_single(arrived, counts, group=self.group)
        arrived = arrived.view(self.size, self.local)
        send, recv = counts.view(self.size, self.local).sum(1).tolist(), arrived.sum(1).tolist()
        h = _Exchange.apply(x[token], send, recv, self.group)  # (M, C) by source rank, then by local expert
        # regroup the arrivals by local expert (stable: source rank order within an expert)
        expert_of = torch.arange(self.local, device=x.device).repeat(self.size).repeat_interleave(arrived.flatten())
        regroup = expert_of.argsort(stable=True)
        local_counts = arrived.sum(0)  # (E/N,)
        gate, up = expert_products(h[regroup], self.gate_up_proj, local_counts).chunk(2, dim=-1)  # (M, I) each
        y = expert_products(up * F.silu(gate), self.down_proj, local_counts)  # (M, C)
        y = _Exchange.apply(y[regroup.argsort()], recv, send, self.group)  # (N*k, C) back in grouped-slot order
        y = (y * weights.flatten()[order, None]).to(x.dtype)  # float32 weights, as transformers multiplies
        return torch.zeros_like(x).index_add_(0, token, y)


class ExpertParallel:
    """The expert shards of a training module and what they need around the optimizer step:
    gradient reduction, the gradient norm's share, and full state dicts to save and resume."""

    def __init__(self, size: int, world: Distributed):
        self.size, self.world = size, world
        self.index = world.rank % size
        # Every rank creates every group, in the same order, as torch.distributed requires.
        self.group = self.replicas = None
        for first in range(0, world.world_size, size):
            group = dist.new_group(list(range(first, first + size)))
            if first <= world.rank < first + size:
                self.group = group
        for index in range(size):
            group = dist.new_group(list(range(index, world.world_size, size)))
            if index == self.index:
                self.replicas = group
        self.names: list[str] = []  # parameter names of the shards in the training module
        self.params: list[nn.Parameter] = []

    @classmethod
    def shard(cls, module: nn.Module, size: int, world: Distributed) -> "ExpertParallel":
        """Replace every MoE layer's ``Experts`` in ``module`` by this rank's ``ShardedExperts``."""
        from ..model.glm import MoE

        layers = [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]
        if not layers:
            raise OpenGLMError("--expert-parallel needs a mixture-of-experts model")
        ep = cls(size, world)
        for name, moe in layers:
            moe.experts = ShardedExperts(moe.experts, ep.group, size, ep.index)
            ep.names += [f"{name}.experts.{p}" for p in PROJECTIONS]
            ep.params += [getattr(moe.experts, p) for p in PROJECTIONS]
        return ep

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum each shard's gradient over the ranks holding the same experts, then divide by all W ranks:
        the training objective is scaled by W because DDP averages the replicated parameters' gradients."""
        for p in self.params:
            if p.grad is None:  # no token came to these experts: on one process the stacked tensor gets zeros
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        if self.world.world_size > self.size:
            for g in grads:
                dist.all_reduce(g, group=self.replicas)
        torch._foreach_div_(grads, self.world.world_size)

    def squared_norm(self, norms: torch.Tensor) -> torch.Tensor:
        """The sum over the expert-parallel group of this rank's squared shard norms ``norms`` (float64)."""
        total = norms.square().sum()
        dist.all_reduce(total, group=self.group)
        return total

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        device = t.device
        t = t.to(self.world.device)  # NCCL gathers on the GPU
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts).to(device)

    def full_state(self, model_state: dict, optimizer_state: dict, optimizer) -> tuple[dict, dict]:
        """The state dicts of ``get_state_dict`` (filled on rank 0 only) with the full experts and their
        AdamW moments, gathered from every rank's shards; every rank of the group must call it."""
        for name, p in zip(self.names, self.params):
            weight = self._gather(p.detach())
            moments = {k: self._gather(v) for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.dim()}
            if name in model_state:
                model_state[name] = weight.to(model_state[name].device)
                optimizer_state["state"][name].update(
                    {k: v.to(optimizer_state["state"][name][k].device) for k, v in moments.items()})
        return model_state, optimizer_state

    def local_state(self, model_state: dict, optimizer_state: dict) -> tuple[dict, dict]:
        """Full state dicts (as saved) cut down to this rank's shards; the inputs are left as they are."""
        model_state, state = dict(model_state), dict(optimizer_state["state"])
        for name in self.names:
            model_state[name] = self._cut(model_state[name])
            if name in state:
                state[name] = {k: self._cut(v) if torch.is_tensor(v) and v.dim() > 0 else v
                               for k, v in state[name].items()}
        return model_state, {**optimizer_state, "state": state}

    def _cut(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0] // self.size
        return t[self.index * n : (self.index + 1) * n]


def check_expert_parallel(size: int, world: Distributed, config, parallel: str, lora: bool = False) -> None:
    """One-line errors for an ``--expert-parallel`` that cannot run, before any work."""
    if size == 1:
        return
    if not config.num_experts:
        raise OpenGLMError(f"--expert-parallel needs a mixture-of-experts model; {config.name} is dense")
    if world.world_size % size:
        raise OpenGLMError(f"--expert-parallel {size} must divide the {world.world_size} processes (start them with "
                           f"torchrun --nproc-per-node)")
    if config.num_experts % size:
        raise OpenGLMError(f"--expert-parallel {size} must divide the model's {config.num_experts} experts")
    if parallel != "ddp":
        raise OpenGLMError("--expert-parallel composes with --parallel ddp only")
    if lora:
        raise OpenGLMError("--expert-parallel needs full fine-tuning (LoRA trains no expert weights)")
