"""Megatron-style tensor-parallel layers over torch.distributed's default process group.

Each of N ranks holds a slice of the weights. Column-parallel projections (q/k/v, gate/up:
`MergedLinear` with a rank's rows) need no communication, each rank computing its own heads
or features; row-parallel ones (o_proj, down_proj) give partial sums, all-reduced. The
embedding and the output head split the vocabulary into N ranges of equal size (the last one
padded): each rank looks up or scores its own range, the lookups are all-reduced and the
scores gathered on rank 0, the only rank that samples. With N = 1 a model uses the single-device
layers (`row_linear`, `embedding`, `lm_head` choose), so nothing here runs."""

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from otvllm.layers.basic import Linear, SiluAndMul


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the ranks a model is split over."""

    rank: int = 0
    size: int = 1


SINGLE = TensorParallel()


class CollectiveTime:
    """The collectives this process ran since the last `take()`, and their time: host time on
    the CPU; on CUDA from events around each (none inside a CUDA graph, whose replays are not
    timed), summed only once they have all completed (never waited for). Untraced engines set
    `timed` False: then they are only counted."""

    def __init__(self):
        self.timed = True
        self.count = 0
        self.host_ns = 0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def run(self, collective, tensor: torch.Tensor, *args, **kwargs) -> None:
        self.count += 1
        if not self.timed:
            collective(tensor, *args, **kwargs)
        elif not tensor.is_cuda:
            start = time.perf_counter_ns()
            collective(tensor, *args, **kwargs)
            self.host_ns += time.perf_counter_ns() - start
        elif torch.cuda.is_current_stream_capturing():
            collective(tensor, *args, **kwargs)
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            collective(tensor, *args, **kwargs)
            end.record()
            self.events.append((start, end))

    def take(self) -> tuple[int, float | None]:
        """(collectives, their milliseconds or None where the device has not finished them)."""
        events, count = self.events, self.count
        ms = self.host_ns / 1e6
        if events:
            ms = sum(s.elapsed_time(e) for s, e in events) if all(e.query() for _, e in events) else None
        self.count, self.host_ns, self.events = 0, 0, []
        return count, ms


COLLECTIVES = CollectiveTime()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    COLLECTIVES.run(dist.all_reduce, x)
    return x


class RowParallelLinear(nn.Linear):
    """A projection whose input features are split over the ranks: partial sums, all-reduced.
    The bias (whole on every rank) is added once, by rank 0."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(in_features // tp.size, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(F.linear(x, self.weight, self.bias if self.tp.rank == 0 else None))

    def forward_silu_and_mul(self, gate_up: torch.Tensor, act: SiluAndMul) -> torch.Tensor:
        return self(act(gate_up))   # as Linear's, which may fuse the two


def vocab_range(vocab_size: int, tp: TensorParallel) -> tuple[int, int]:
    """(first token id, ids per rank) of this rank's slice of the vocabulary."""
    per_rank = -(-vocab_size // tp.size)
    return tp.rank * per_rank, per_rank


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        self.start, per_rank = vocab_range(vocab_size, tp)
        super().__init__(per_rank, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(local * inside, self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(x)


class ParallelLMHead(nn.Module):
    """Scores of this rank's slice of the vocabulary, gathered on rank 0 (None elsewhere)."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel):
        super().__init__()
        _, per_rank = vocab_range(vocab_size, tp)
        self.vocab_size, self.tp = vocab_size, tp
        self.weight = nn.Parameter(torch.zeros(per_rank, hidden_size))   # padding rows stay 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = F.linear(hidden, self.weight)
        parts = [torch.empty_like(logits) for _ in range(self.tp.size)] if self.tp.rank == 0 else None
        COLLECTIVES.run(dist.gather, logits, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :self.vocab_size] if parts is not None else None


def row_linear(in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> nn.Module:
    if tp.size == 1:
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, tp)


def embedding(vocab_size: int, hidden_size: int, tp: TensorParallel) -> nn.Module:
    if tp.size == 1:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size, tp)


def lm_head(hidden_size: int, vocab_size: int, tp: TensorParallel) -> nn.Module:
    if tp.size == 1:
        return nn.Linear(hidden_size, vocab_size, bias=False)
    return ParallelLMHead(hidden_size, vocab_size, tp)


def split_dim(module: nn.Module, param_name: str) -> tuple[int, bool] | None:
    """How a checkpoint tensor of `module` is split over the ranks: (its split dimension, whether
    the last rank's slice may be short, padded), or None where each rank holds it whole. The
    merged column-parallel projections split each of their parts along its rows (the loader's
    business: their checkpoint tensors are per part)."""
    if isinstance(module, RowParallelLinear):
        return (1, False) if param_name == "weight" else None
    if isinstance(module, (VocabParallelEmbedding, ParallelLMHead)):
        return 0, True
    return None
