"""The small layers of a Llama-family decoder, computed the way transformers computes them.

Their math lives in plain functions over tensors, which the layers call through their
`Kernels`. An engine that compiles (by default, on CUDA) gives its model `torch.compile`d
versions (`use_kernels`): unfused, a decode step would launch hundreds of tiny elementwise
kernels, which costs more than the step's real work. The choice is the model's, not the process's."""

from collections.abc import Callable
from dataclasses import dataclass, fields

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


@dataclass(frozen=True)
class Kernels:
    """The elementwise functions a model's small layers call."""

    rms_norm: Callable
    add_rms_norm: Callable
    silu_and_mul: Callable
    apply_rotary: Callable

    @classmethod
    def compiled(cls) -> "Kernels":
        """Fused by torch.compile (each compiles on its first call; engines share the compiled code)."""
        return cls(**{f.name: torch.compile(getattr(EAGER, f.name), dynamic=True) for f in fields(cls)})


EAGER = Kernels(rms_norm, add_rms_norm, silu_and_mul, apply_rotary)


def use_kernels(model: nn.Module, kernels: Kernels) -> None:
    """Make the small layers of `model`, and only of it, call `kernels`."""
    for module in model.modules():
        if isinstance(module, (RMSNorm, SiluAndMul, RotaryEmbedding)):
            module.kernels = kernels


class RMSNorm(nn.Module):
    kernels = EAGER

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x), or with `residual`: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    """silu(gate) * up, for the gate and up projections computed as one matrix product."""

    kernels = EAGER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_and_mul(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gemv_tokens: frozenset) -> torch.Tensor:
    """F.linear, or the Triton GEMV for the token counts in `gemv_tokens`."""
    if x.shape[0] in gemv_tokens:
        from otvllm.ops import triton_gemv
        return triton_gemv.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose products of few tokens go to the Triton GEMV for the token counts in
    `gemv_tokens`, which start-up sets where it measured the GEMV faster than cuBLAS."""

    gemv_tokens: frozenset = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.gemv_tokens)

    def forward_silu_and_mul(self, gate_up: torch.Tensor, act: SiluAndMul) -> torch.Tensor:
        """self(act(gate_up)); on the GEMV, one kernel that applies the activation as it reads."""
        if gate_up.shape[0] in self.gemv_tokens:
            from otvllm.ops import triton_gemv
            return triton_gemv.gemv(gate_up, self.weight, self.bias, silu_and_mul=True)
        return self(act(gate_up))


class MergedLinear(nn.Module):
    """Several projections of the same input stacked into one weight (q/k/v, gate/up).

    `shards` maps each checkpoint name (`q_proj`, ...) to its number of output rows.
    """

    gemv_tokens: frozenset = frozenset()   # as Linear's

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
        return linear(x, self.weight, self.bias, self.gemv_tokens)

    def forward_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                         norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(normed), residual stream) where `norm(x, residual)` gives (normed, residual
        stream), or without `residual` (norm(x), x); on the GEMV, one kernel that adds and
        normalises as it reads its input."""
        if x.shape[0] in self.gemv_tokens:
            from otvllm.ops import triton_gemv
            return triton_gemv.gemv_rms_norm(x, residual, norm.weight, norm.eps, self.weight, self.bias)
        x, residual = (norm(x), x) if residual is None else norm(x, residual)
        return self(x), residual

    def shard(self, param_name: str, shard_name: str) -> torch.Tensor:
        start, rows = self.offsets[shard_name]
        return getattr(self, param_name).data[start:start + rows]


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, built once; applied with the rotate-half convention."""

    kernels = EAGER

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int):
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq.float().to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.kernels.apply_rotary(q, k, self.cos, self.sin, positions)
