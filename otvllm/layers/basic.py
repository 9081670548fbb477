"""The small layers of a Llama-family decoder, computed the way transformers computes them.

Their math lives in plain functions over tensors. On CUDA the model runner swaps in
`torch.compile`d versions (`use_compiled_kernels`): unfused, a decode step would launch
hundreds of tiny elementwise kernels, which costs more than the step's real work."""

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual): the residual add fused with the next norm."""
    x = x + residual
    return rms_norm(x, weight, eps), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor):
    cos = cos[positions].to(q.dtype).unsqueeze(1)
    sin = sin[positions].to(q.dtype).unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


_kernels = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "silu_and_mul": silu_and_mul,
            "apply_rotary": apply_rotary}
_eager = dict(_kernels)


def use_compiled_kernels(enabled: bool) -> None:
    """Swap the elementwise functions for torch.compile'd ones (fused; CUDA) or back."""
    if enabled == (_kernels["rms_norm"] is not rms_norm):
        return
    for name, fn in _eager.items():
        _kernels[name] = torch.compile(fn, dynamic=True) if enabled else fn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x), or with `residual`: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return _kernels["rms_norm"](x, self.weight, self.eps)
        return _kernels["add_rms_norm"](x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    """silu(gate) * up, for the gate and up projections computed as one matrix product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _kernels["silu_and_mul"](x)


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
        return _kernels["apply_rotary"](q, k, self.cos, self.sin, positions)
