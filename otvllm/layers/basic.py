"""The small layers of a Llama-family decoder, computed the way transformers computes them."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SiluAndMul(nn.Module):
    """silu(gate) * up, for the gate and up projections computed as one matrix product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class MergedLinear(nn.Module):
    """Several projections of the same input stacked into one weight (q/k/v, gate/up).

    `shards` maps each checkpoint name (`q_proj`, ...) to its number of output rows.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool):
        super().__init__()
        self.offsets = {}
        start = 0
        for name, rows in shards.items():
            self.offsets[name] = (start, rows)
            start += rows
        self.weight = nn.Parameter(torch.empty(start, in_features))
        self.bias = nn.Parameter(torch.zeros(start)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def shard(self, param_name: str, shard_name: str) -> torch.Tensor:
        start, rows = self.offsets[shard_name]
        return getattr(self, param_name).data[start:start + rows]


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, built once; applied with the rotate-half convention."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int):
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq.float().to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
