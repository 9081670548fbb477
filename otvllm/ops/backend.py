"""The one attention entry point: `torch` (reference, any device) or `triton` (CUDA).
A FlashAttention-4 backend (`flash_attn`) is planned behind the same interface."""

import importlib.util
from typing import TYPE_CHECKING

import torch

from otvllm.ops import attention_torch

if TYPE_CHECKING:
    from otvllm.layers.attention import ForwardContext

BACKENDS = ("torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_backend(requested: str, device: torch.device) -> str:
    if device.type != "cuda":
        if requested not in ("auto", "torch"):
            raise ValueError(f"attention_backend={requested!r} needs a CUDA device; on {device.type} use 'torch'")
        return "torch"
    if requested == "flash_attn":
        raise ValueError("attention_backend='flash_attn' is not implemented yet: use 'triton' (the default on CUDA)")
    if requested == "auto":
        return "triton" if triton_available() else "torch"
    if requested == "triton" and not triton_available():
        raise ValueError("attention_backend='triton' but triton is not installed (pip install triton)")
    return requested


class AttentionBackend:
    """Calls one implementation of the three paged-cache operations."""

    def __init__(self, name: str):
        self.name = name
        if name == "torch":
            self._store, self._prefill, self._decode = (attention_torch.store_kvcache,
                                                        attention_torch.prefill_attention,
                                                        attention_torch.decode_attention)
        elif name == "triton":
            from otvllm.ops import triton_decode, triton_kvcache, triton_prefill
            self._store = triton_kvcache.store_kvcache
            self._prefill = triton_prefill.prefill_attention
            self._decode = triton_decode.decode_attention
        else:
            raise ValueError(f"unknown attention backend {name!r}: choose one of {', '.join(BACKENDS)}")

    def store_kvcache(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        self._store(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k_cache, v_cache, ctx: "ForwardContext", scale: float) -> torch.Tensor:
        if self.name == "torch":
            return self._prefill(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.block_tables, scale)
        return self._prefill(q, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.block_tables, scale,
                             max_seqlen_q=ctx.max_seqlen_q)

    def decode(self, q, k_cache, v_cache, ctx: "ForwardContext", scale: float) -> torch.Tensor:
        if self.name == "torch":
            return self._decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale)
        return self._decode(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale,
                            max_context_len=ctx.max_context_len)
