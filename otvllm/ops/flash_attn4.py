"""FlashAttention-4 (`pip install flash-attn-4`, import `flash_attn.cute`) over otvllm's paged cache.

FA4 reads the cache layout of ops/attention_torch.py as it is: its `page_table` is our block
table and a block is its page. It only attends; storing new K/V stays with the Triton kernel.
On sm90 a page of 128 tokens loads by TMA, which reads every row of a sequence's last page:
the engine zeroes the cache once so that the unused rows are finite."""

import functools
import importlib

import torch

_MODULE = "flash_attn.cute"


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FA4 cannot serve this engine, or None when it can. Never raises."""
    if device.type != "cuda":
        return f"it needs a CUDA device, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10, 11):
        return f"its paged attention needs a Hopper or Blackwell GPU (sm90/sm100), this one is sm{major}{minor}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it computes in float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    fits = head_dim % 8 == 0 and (8 <= head_dim <= (256 if major == 9 else 128) or head_dim == 256)
    if not fits:
        return f"head_dim={head_dim} is not one it supports on sm{major}{minor}"
    try:
        importlib.import_module(_MODULE)
    except Exception as e:   # not installed, or installed against another CUDA/torch
        return f"`import {_MODULE}` failed ({type(e).__name__}: {e}); install it with pip install flash-attn-4"
    return None


@functools.cache
def _varlen_func():
    return importlib.import_module(_MODULE).flash_attn_varlen_func


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, max_seqlen_q: int) -> torch.Tensor:
    """Causal attention of the new tokens q [num_tokens, H, D] over each sequence's whole paged
    context; FA4 aligns the causal mask to the end of the context, so prefix-cached tokens
    are attended in full."""
    out, _ = _varlen_func()(q, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, seqused_k=context_lens,
                            page_table=block_tables, max_seqlen_q=max_seqlen_q, softmax_scale=scale,
                            causal=True)
    return out


@functools.cache
def _decode_num_splits(device_index: int) -> int:
    # FA4 splits the context across CTAs only on Blackwell (its sm90 kernel refuses split-KV);
    # 0 asks for its heuristic, which reads host-side shapes only, so CUDA graphs can capture it.
    return 0 if torch.cuda.get_device_capability(device_index)[0] >= 10 else 1


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence, q [num_seqs, H, D], over its paged context."""
    out, _ = _varlen_func()(q.unsqueeze(1), k_cache, v_cache, seqused_k=context_lens, page_table=block_tables,
                            softmax_scale=scale, num_splits=_decode_num_splits(q.device.index))
    return out.squeeze(1)
