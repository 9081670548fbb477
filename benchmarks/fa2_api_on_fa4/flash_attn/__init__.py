"""The two flash-attn 2 functions nano-vllm calls, served by FlashAttention-4.

flash-attn 2 cannot be built on the GPU machine; FA4 (`flash_attn.cute`) runs there. Put this
directory first on sys.path to run nano-vllm unchanged on FA4 kernels, as the README's nano-vllm
figures were measured. `__path__` is extended so that `flash_attn.cute` still resolves to the
installed FA4 package."""

import pkgutil

__path__ = pkgutil.extend_path(__path__, __name__)


def flash_attn_varlen_func(q, k, v, *, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k,
                           softmax_scale=None, causal=False, block_table=None):
    from flash_attn.cute import flash_attn_varlen_func as fa4
    if block_table is None:
        out, _ = fa4(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                     max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=causal)
        return out
    # Paged: FA4 takes each sequence's context length instead of cumulative key offsets.
    out, _ = fa4(q, k, v, cu_seqlens_q=cu_seqlens_q, seqused_k=cu_seqlens_k[1:] - cu_seqlens_k[:-1],
                 page_table=block_table, max_seqlen_q=max_seqlen_q, softmax_scale=softmax_scale, causal=causal)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table, softmax_scale=None, causal=False):
    from flash_attn.cute import flash_attn_varlen_func as fa4
    out, _ = fa4(q, k_cache, v_cache, seqused_k=cache_seqlens, page_table=block_table, softmax_scale=softmax_scale,
                 causal=causal)
    return out
