"""Forwards replayed from CUDA graphs: decodes, one graph per padded batch size, and prefill or
mixed steps, one per padded token count.

A step of a small model is a few hundred kernels; launching them one by one from Python costs
more than running them (on the H200 a 1024-token prefill's eager launches took 22 ms, its
kernels 3 ms). Each graph reads its inputs from static buffers, so a step copies the batch in
and replays the graph of the smallest captured size that holds it (padded rows write to slot -1
and are ignored). All graphs share one memory pool: they replay one at a time."""

import torch

from otvllm.layers.attention import ForwardContext
from otvllm.ops.query_tiles import IDLE, max_tiles


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class _Graphs:
    """One graph per size in `sizes` (batch rows or tokens) of `model`'s forward, which reads
    its tokens from static buffers and writes its rows of the static `hidden`."""

    def __init__(self, model, sizes: list[int], hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.sizes = sizes
        n = sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _load_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor) -> int:
        """Copies the step's tokens in; returns the size of the graph that holds them, whose
        padded rows write to slot -1."""
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = slot_mapping
        self.slot_mapping[n:size] = -1
        return size

    def _args(self, size: int) -> tuple:
        """The model's arguments for a graph of `size`: views of the static buffers."""
        raise NotImplementedError

    @torch.inference_mode()
    def capture(self, pool=None):
        """Returns the memory pool, for other graphs to share."""
        for size in reversed(self.sizes):   # largest first: the smaller graphs reuse its memory
            args = self._args(size)
            self.hidden[:size] = self.model(*args)   # warm-up: compiles kernels outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.hidden[:size] = self.model(*args)
            pool = graph.pool()
            self.graphs[size] = graph
            torch.cuda.synchronize()
        return pool


class DecodeGraphs(_Graphs):
    def __init__(self, model, max_batch: int, max_blocks_per_seq: int, max_model_len: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__(model, graph_batch_sizes(max_batch), hidden_size, dtype, device)
        self.max_model_len = max_model_len
        n = self.sizes[-1]
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)

    def _args(self, bs: int) -> tuple:
        # max_context_len is fixed at capture: it only chooses the kernel's split count.
        ctx = ForwardContext(is_prefill=False, slot_mapping=self.slot_mapping[:bs],
                             block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs],
                             max_context_len=self.max_model_len)
        return self.input_ids[:bs], self.positions[:bs], ctx

    def fits(self, num_tokens: int, ctx: ForwardContext) -> bool:
        return num_tokens <= self.sizes[-1] and ctx.block_tables.shape[1] <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states of the batch's tokens: [num_seqs, hidden_size]."""
        n = input_ids.shape[0]
        bs = self._load_tokens(input_ids, positions, ctx.slot_mapping)
        width = ctx.block_tables.shape[1]
        self.context_lens[:n] = ctx.context_lens
        self.context_lens[n:bs] = 0
        self.block_tables[:n, :width] = ctx.block_tables
        self.graphs[bs].replay()
        return self.hidden[:n]


def prefill_graph_tokens(max_tokens: int) -> list[int]:
    """Token counts of the prefill graphs: powers of two from 16, then also 1.5 times them from
    1024 (padding costs at most half a step's GPU work there, where eager launches would cost
    more), up to and including `max_tokens`."""
    sizes, size = [], 16
    while size < max_tokens:
        sizes.append(size)
        if size >= 1024 and size * 3 // 2 < max_tokens:
            sizes.append(size * 3 // 2)
        size *= 2
    return sizes + [max_tokens]


class PrefillGraphs(_Graphs):
    """Steps with prompt tokens (prefills, and mixed steps whose decodes are one-token queries)
    on the Triton prefill kernel, whose launch depends only on the token count: its work list
    (ops/query_tiles.py) is padded with idle entries to the graph's length."""

    def __init__(self, model, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, tokens_per_tile: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device):
        super().__init__(model, prefill_graph_tokens(max_tokens), hidden_size, dtype, device)
        self.max_seqs = max_seqs
        self.num_tiles = {t: max_tiles(t, max_seqs, tokens_per_tile) for t in self.sizes}
        self.tiles = torch.full((self.num_tiles[self.sizes[-1]],), IDLE, dtype=torch.int64, device=device)
        self.cu_seqlens_q = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.cu_seqlens_k = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)

    def _args(self, tokens: int) -> tuple:
        # The work list is idle while capturing: the attention computes nothing until a replay fills it.
        ctx = ForwardContext(is_prefill=True, slot_mapping=self.slot_mapping[:tokens],
                             block_tables=self.block_tables, cu_seqlens_q=self.cu_seqlens_q,
                             cu_seqlens_k=self.cu_seqlens_k, max_seqlen_q=tokens,
                             query_tiles=self.tiles[:self.num_tiles[tokens]])
        return self.input_ids[:tokens], self.positions[:tokens], ctx

    def fits(self, num_tokens: int, ctx: ForwardContext) -> bool:
        return (num_tokens <= self.sizes[-1] and ctx.cu_seqlens_q.shape[0] - 1 <= self.max_seqs
                and ctx.block_tables.shape[1] <= self.block_tables.shape[1] and ctx.query_tiles is not None)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states of the step's tokens: [num_tokens, hidden_size]."""
        tokens = self._load_tokens(input_ids, positions, ctx.slot_mapping)
        seqs, tiles = ctx.cu_seqlens_q.shape[0] - 1, ctx.query_tiles.shape[0]
        rows, width = ctx.block_tables.shape
        self.cu_seqlens_q[:seqs + 1] = ctx.cu_seqlens_q
        self.cu_seqlens_k[:seqs + 1] = ctx.cu_seqlens_k
        self.block_tables[:rows, :width] = ctx.block_tables
        self.tiles[:tiles] = ctx.query_tiles
        self.tiles[tiles:self.num_tiles[tokens]] = IDLE
        self.graphs[tokens].replay()
        return self.hidden[:input_ids.shape[0]]
