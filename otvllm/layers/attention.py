from dataclasses import dataclass

import torch
from torch import nn

from otvllm.ops.backend import AttentionBackend


@dataclass
class ForwardContext:
    """How the flattened batch maps onto sequences and KV-cache slots (see ops/attention_torch.py)."""

    is_prefill: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None   # prefill
    cu_seqlens_k: torch.Tensor | None = None   # prefill
    max_seqlen_q: int = 0                      # prefill, known on the host
    context_lens: torch.Tensor | None = None   # tokens in the cache per sequence (flash_attn prefill, decode)
    max_context_len: int = 0                   # decode, known on the host
    query_tiles: torch.Tensor | None = None    # prefill on Triton: its work list (ops/query_tiles.py)


class Attention(nn.Module):
    """Attends each new token over its sequence's context in the paged cache, which already
    holds this step's K/V (written by `store`, or by a kernel fused with rotary)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_index: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.layer_index = layer_index
        self.k_cache = self.v_cache = torch.tensor([])
        self.backend: AttentionBackend | None = None

    def store(self, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> None:
        self.backend.store_kvcache(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)

    def forward(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        backend = self.backend
        if ctx.is_prefill:
            return backend.prefill(q, self.k_cache, self.v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k,
                                   ctx.context_lens, ctx.block_tables, ctx.max_seqlen_q, ctx.query_tiles,
                                   self.scale)
        return backend.decode(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens,
                              ctx.max_context_len, self.scale)
