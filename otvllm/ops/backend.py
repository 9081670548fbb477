"""The one attention entry point: `torch` (reference, any device), `triton` (CUDA) or
`flash_attn` (FlashAttention-4 on Hopper/Blackwell, when installed)."""

import importlib.util

import torch

from otvllm.ops import ATTENTION_BACKENDS, attention_torch, flash_attn4


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """`auto` takes FlashAttention-4 where it can serve this model, else Triton on CUDA, else torch."""
    if device.type != "cuda":
        if requested not in ("auto", "torch"):
            raise ValueError(f"attention_backend={requested!r} needs a CUDA device; on {device.type} use 'torch'")
        return "torch"
    if requested in ("flash_attn", "auto"):
        why_not = flash_attn4.unavailable_reason(device, dtype, head_dim) if triton_available() else \
            "its cache writes use the Triton kernel, and triton is not installed"
        if why_not is None:
            return "flash_attn"
        if requested == "flash_attn":
            raise ValueError(f"attention_backend='flash_attn' cannot be used: {why_not}")
        return "triton" if triton_available() else "torch"
    if requested == "triton" and not triton_available():
        raise ValueError("attention_backend='triton' but triton is not installed (pip install triton)")
    return requested


class AttentionBackend:
    """Calls one implementation of the three paged-cache operations. `norm_rope_store`: the
    kernel that a model on this backend runs for its q/k norm, rotary and K/V store, or None
    where it runs them layer by layer (the torch reference)."""

    def __init__(self, name: str):
        self.name = name
        self.norm_rope_store = None
        if name == "torch":
            self._store, self._prefill, self._decode = (attention_torch.store_kvcache,
                                                        attention_torch.prefill_attention,
                                                        attention_torch.decode_attention)
        elif name == "triton":
            from otvllm.ops import triton_decode, triton_kvcache, triton_prefill, triton_rope_store
            self._store = triton_kvcache.store_kvcache
            self.norm_rope_store = triton_rope_store.norm_rope_store
            self._prefill = triton_prefill.prefill_attention
            self._decode = triton_decode.decode_attention
        elif name == "flash_attn":
            from otvllm.ops import triton_kvcache, triton_rope_store
            self._store = triton_kvcache.store_kvcache
            self.norm_rope_store = triton_rope_store.norm_rope_store
            self._prefill = flash_attn4.prefill_attention
            self._decode = flash_attn4.decode_attention
        else:
            raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")

    def store_kvcache(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        self._store(k, v, k_cache, v_cache, slot_mapping)

    def tokens_per_tile(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        device: torch.device) -> int | None:
        """Where the prefill takes a work list of query tiles (ops/query_tiles.py), the tokens
        of a tile; else None."""
        if self.name != "triton":
            return None
        from otvllm.ops import triton_prefill
        return triton_prefill.tokens_per_tile(num_heads, num_kv_heads, head_dim, dtype, device)

    def prefill(self, q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, context_lens, block_tables,
                max_seqlen_q: int, query_tiles, scale: float) -> torch.Tensor:
        if self.name == "torch":
            return self._prefill(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_tables, scale)
        if self.name == "flash_attn":
            return self._prefill(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale,
                                 max_seqlen_q=max_seqlen_q)
        return self._prefill(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_tables, scale,
                             tiles=query_tiles)

    def decode(self, q, k_cache, v_cache, block_tables, context_lens, max_context_len: int,
               scale: float) -> torch.Tensor:
        if self.name == "triton":
            return self._decode(q, k_cache, v_cache, block_tables, context_lens, scale,
                                max_context_len=max_context_len)
        return self._decode(q, k_cache, v_cache, block_tables, context_lens, scale)
