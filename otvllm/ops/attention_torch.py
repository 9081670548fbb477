"""Torch reference for the paged KV cache and attention.

Used on CPU and as the reference the Triton kernels are tested against.

Layouts (shared by every backend):
  k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
  slot_mapping:     [num_tokens] int, slot = block_id * block_size + offset; -1 skips the token
  block_tables:     [num_seqs, max_blocks_per_seq] int32, -1 pads unused entries
  cu_seqlens_q/k:   [num_seqs + 1] int32 prefix sums of new tokens / context lengths
  context_lens:     [num_seqs] int32, tokens in the cache for each sequence (the new one included)
"""

import torch
import torch.nn.functional as F


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the cache slots."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[keep].to(v_cache.dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [q_len, H, D] against k/v [kv_len, KVH, D]; query i sits at position kv_len - q_len + i."""
    q_len, num_heads, _ = q.shape
    kv_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
    k_pos = torch.arange(kv_len, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = F.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal varlen attention of new tokens q [num_tokens, H, D] over each sequence's paged
    context (prefix-cached tokens and the new ones, already stored in the cache)."""
    out = torch.empty_like(q)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(starts_q) - 1):
        q_lo, q_hi = starts_q[i], starts_q[i + 1]
        kv_len = starts_k[i + 1] - starts_k[i]
        k = gather_context(k_cache, block_tables[i], kv_len)
        v = gather_context(v_cache, block_tables[i], kv_len)
        out[q_lo:q_hi] = _attend(q[q_lo:q_hi], k, v, scale)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One new token per sequence, q [num_seqs, H, D], over its paged context."""
    out = torch.empty_like(q)
    for i, kv_len in enumerate(context_lens.tolist()):
        k = gather_context(k_cache, block_tables[i], kv_len)
        v = gather_context(v_cache, block_tables[i], kv_len)
        out[i:i + 1] = _attend(q[i:i + 1], k, v, scale)
    return out
