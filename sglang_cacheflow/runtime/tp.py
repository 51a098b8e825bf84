"""Tensor parallelism for the reference runtime, on ``torch.distributed``.

:func:`shard_model` slices a Llama/Qwen2 model in place for one rank (Megatron style):
q/k/v and gate/up projections keep this rank's heads and columns, o and down projections
keep the matching rows and sum their outputs over the group. Each rank therefore holds
its KV-head shard: its KV cache, its pages in the tiers (``Namespace.tp_rank``) and its
loads are ``1/tp`` of the bytes, and a recompute runs on all ranks in lockstep. Embedding,
norms and the LM head stay whole. The plan of a round is made on rank 0 and broadcast
(:meth:`TPGroup.broadcast_object`); failed pages are agreed on with a MAX all-reduce so
every rank repairs the same cells. Backends: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class TPGroup:
    """This process's place in a tensor-parallel group (``group`` None: the default)."""

    rank: int
    size: int
    group: Any = None

    @classmethod
    def init(
        cls,
        rank: int,
        size: int,
        port: int,
        backend: str | None = None,
        host: str = "127.0.0.1",
    ) -> TPGroup:
        """Join (or create) the default process group over TCP on ``host:port``."""
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(
                backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=size
            )
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        return cls(rank, size)

    @classmethod
    def from_env(cls) -> TPGroup:
        """From an already initialised default group (``torchrun``); size 1 otherwise."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(int(os.environ.get("RANK", 0)), 1)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_reduce_max_mask(self, mask: np.ndarray) -> np.ndarray:
        """Element-wise OR of a boolean mask over the group."""
        if self.size == 1:
            return mask
        t = torch.from_numpy(mask.astype(np.uint8))
        if dist.get_backend(self.group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.cpu().numpy().astype(bool)

    def broadcast_object(self, obj: Any) -> Any:
        """``obj`` of rank 0 on every rank."""
        if self.size == 1:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's ``[lo, hi)`` of ``n`` items split evenly."""
        if n % self.size:
            raise ValueError(f"{n} cannot be split evenly over tp={self.size}")
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per


class RowParallelLinear(nn.Module):
    """A row shard of a linear layer whose partial outputs are summed over the group."""

    def __init__(self, linear: nn.Linear, lo: int, hi: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(linear.weight.data[:, lo:hi].clone(), requires_grad=False)
        bias = linear.bias
        # the bias is added once, after the sum
        self.bias = None if bias is None else nn.Parameter(bias.data.clone(), requires_grad=False)
        self.in_features = hi - lo
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce_sum(nn.functional.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


def _column(linear: nn.Linear, lo: int, hi: int) -> nn.Linear:
    out = nn.Linear(
        linear.in_features, hi - lo, bias=linear.bias is not None,
        device=linear.weight.device, dtype=linear.weight.dtype,
    )  # fmt: skip
    out.weight.data.copy_(linear.weight.data[lo:hi])
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data[lo:hi])
    out.requires_grad_(False)
    return out


def shard_model(model: nn.Module, tp: TPGroup) -> nn.Module:
    """Keep this rank's shard of every decoder layer of ``model`` (in place); returns it."""
    if tp.size == 1:
        return model
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if kv_heads % tp.size:
        raise ValueError(f"tp={tp.size} must divide the {kv_heads} KV heads")
    for layer in model.model.layers:
        attn = layer.self_attn
        hd = attn.head_dim
        q0, q1 = tp.shard(heads)
        k0, k1 = tp.shard(kv_heads)
        attn.q_proj = _column(attn.q_proj, q0 * hd, q1 * hd)
        attn.k_proj = _column(attn.k_proj, k0 * hd, k1 * hd)
        attn.v_proj = _column(attn.v_proj, k0 * hd, k1 * hd)
        attn.o_proj = RowParallelLinear(attn.o_proj, q0 * hd, q1 * hd, tp)
        mlp = layer.mlp
        i0, i1 = tp.shard(mlp.gate_proj.out_features)
        mlp.gate_proj = _column(mlp.gate_proj, i0, i1)
        mlp.up_proj = _column(mlp.up_proj, i0, i1)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, i0, i1, tp)
    return model
