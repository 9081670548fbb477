"""Decode forwards replayed from CUDA graphs, one per padded batch size.

A decode step of a small model is a few hundred tiny kernels; launching them one by one
from Python costs more than running them. Each graph reads its inputs from static
buffers, so a step copies the batch in and replays the graph of the smallest captured
size that holds it (padded rows write to slot -1 and are ignored)."""

import torch

from otvllm.layers.attention import ForwardContext


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, model, max_batch: int, max_blocks_per_seq: int, max_model_len: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.sizes = graph_batch_sizes(max_batch)
        self.max_model_len = max_model_len
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _context(self, bs: int) -> ForwardContext:
        # max_context_len is fixed at capture: it only chooses the kernel's split count.
        return ForwardContext(is_prefill=False, slot_mapping=self.slot_mapping[:bs],
                              block_tables=self.block_tables[:bs], context_lens=self.context_lens[:bs],
                              max_context_len=self.max_model_len)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):   # largest first: the smaller graphs reuse its memory pool
            ctx = self._context(bs)
            args = (self.input_ids[:bs], self.positions[:bs], ctx)
            self.hidden[:bs] = self.model(*args)   # warm-up: compiles kernels outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.hidden[:bs] = self.model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()

    def fits(self, num_seqs: int, block_table_width: int) -> bool:
        return num_seqs <= self.sizes[-1] and block_table_width <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states of the batch's tokens: [num_seqs, hidden_size]."""
        n = input_ids.shape[0]
        bs = next(b for b in self.sizes if b >= n)
        width = ctx.block_tables.shape[1]
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping[:n] = ctx.slot_mapping
        self.slot_mapping[n:bs] = -1
        self.context_lens[:n] = ctx.context_lens
        self.context_lens[n:bs] = 0
        self.block_tables[:n, :width] = ctx.block_tables
        self.graphs[bs].replay()
        return self.hidden[:n]
