"""One Triton kernel for what runs between the qkv projection and attention: q/k RMSNorm over
each head (Qwen3; off for Llama, Qwen2, Mistral), rotary embedding, and the K/V cache store.

Unfused these are three to five small kernels per layer, each reading and writing the activations.
The results are the unfused eager path's (transformers'), rounded where it rounds (see
`_round`): the norm in float32, cast to the model dtype, times the weight; rotary in the model
dtype with cos/sin cast to it. Without q/k norm they are bit-identical. With it, the norm's
float32 sum, taken in another order, now and then rounds an element of a normed head the
other way (1 ulp), which rotary carries into its partner; an output mixes two such elements,
so every element is within 2 ulps of its head's largest (in fp16 under the interpreter,
99.998% of them bit-identical; on the H200 in bf16 at 16,384 tokens, one element in 50
million was more than 1 ulp away). The
kernel is compiled without multiply-add contraction, which would skip those roundings. The
torch.compile'd path does not round between the operations it fuses, so it differs from
both in the last bits of about half the elements.

One program per token and group of heads (four, eight for a prefill): a
program of query heads writes q, one of key heads writes their K and V to the token's slot
(slot -1 skips the store). No host synchronisation
(CUDA-graph capturable).
"""

import torch
import triton
import triton.language as tl

from otvllm.ops import pdl

PREFILL_TOKENS = 1024   # from here on, programs of eight heads (see heads_per_program)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x rounded to the model dtype, kept in float32: where the unfused path holds a tensor
    of the model dtype, so must the fused one, or the results drift apart."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rope_store_kernel(
    qkv_ptr, stride_qkv, positions_ptr, cos_ptr, sin_ptr, stride_table,
    q_weight_ptr, k_weight_ptr, eps, slot_ptr, q_out_ptr, stride_qt, stride_qh,
    k_cache_ptr, v_cache_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr,
    HALF_BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr, QK_NORM: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.wait_for_previous(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    # The heads of the row, query heads first then key heads, in groups that divide both.
    first = tl.program_id(1) * HEADS_PER_PROGRAM
    is_query = first < NUM_HEADS
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if (first >= NUM_HEADS) & (slot < 0):
        return
    dtype = qkv_ptr.dtype.element_ty
    half: tl.constexpr = HEAD_DIM // 2
    # rotate-half pairs element i with i + half: hold the two halves apart
    h = tl.arange(0, HEADS_PER_PROGRAM)[:, None]
    d = tl.arange(0, HALF_BLOCK)[None, :]
    mask = d < half
    row = qkv_ptr + token * stride_qkv + (first + h) * HEAD_DIM
    x1 = tl.load(row + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + half + d, mask=mask, other=0.0).to(tl.float32)

    if QK_NORM:
        if is_query:
            w1 = tl.load(q_weight_ptr + d, mask=mask).to(tl.float32)
            w2 = tl.load(q_weight_ptr + half + d, mask=mask).to(tl.float32)
        else:
            w1 = tl.load(k_weight_ptr + d, mask=mask).to(tl.float32)
            w2 = tl.load(k_weight_ptr + half + d, mask=mask).to(tl.float32)
        rstd = tl.math.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
        x1 = _round(w1 * _round(x1 * rstd, dtype), dtype)
        x2 = _round(w2 * _round(x2 * rstd, dtype), dtype)

    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos_row, sin_row = cos_ptr + pos * stride_table, sin_ptr + pos * stride_table
    cos1 = _round(tl.load(cos_row + d, mask=mask), dtype)
    cos2 = _round(tl.load(cos_row + half + d, mask=mask), dtype)
    sin1 = _round(tl.load(sin_row + d, mask=mask), dtype)
    sin2 = _round(tl.load(sin_row + half + d, mask=mask), dtype)
    # x * cos + rotate_half(x) * sin, each product rounded as the unfused path rounds it
    y1 = (_round(x1 * cos1, dtype) + _round(-x2 * sin1, dtype)).to(dtype)
    y2 = (_round(x2 * cos2, dtype) + _round(x1 * sin2, dtype)).to(dtype)

    if is_query:
        dst = q_out_ptr + token * stride_qt + (first + h) * stride_qh
        tl.store(dst + d, y1, mask=mask)
        tl.store(dst + half + d, y2, mask=mask)
    else:
        kv_head = first - NUM_HEADS + h
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + kv_head * stride_kch
        tl.store(k_dst + d, y1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_dst + half + d, y2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v_src = qkv_ptr + token * stride_qkv + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM
        v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + kv_head * stride_vch
        for i in tl.static_range(2):
            v = tl.load(v_src + i * half + d, mask=mask)
            tl.store(v_dst + i * half + d, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def heads_per_program(num_tokens: int, num_heads: int, num_kv_heads: int) -> int:
    """Four heads a program, eight from PREFILL_TOKENS tokens (the largest power of two up to
    that dividing both head counts). Measured on the H200 at Qwen3-0.6B's 16 + 8 heads
    (`benchmarks/kernels.py --only rope_store`, us per layer for 1 / 2 / 4 / 8 heads a program):
    1 token 1.90 / 2.28 / 1.83 / 2.02, 64 tokens 2.33 / 2.66 / 2.12 / 2.26, 256 tokens
    5.43 / 4.91 / 4.07 / 4.17, 16,384 tokens 242 / 146 / 119 / 90."""
    group = 4 if num_tokens < PREFILL_TOKENS else 8
    while num_heads % group or num_kv_heads % group:
        group //= 2
    return group


def norm_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    num_heads: int, num_kv_heads: int, group: int | None = None) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim], normed (when the weights are given) and rotated;
    k, likewise, and v stored in the cache slots (-1 skips a token's store).

    qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], rows of any stride;
    cos/sin: [max_positions, head_dim] (RotaryEmbedding's tables); caches:
    [num_blocks, block_size, num_kv_heads, head_dim]. `group`: heads per program (a power of
    two dividing both head counts; default heads_per_program)."""
    num_tokens, width = qkv.shape
    head_dim = width // (num_heads + 2 * num_kv_heads)
    assert width == (num_heads + 2 * num_kv_heads) * head_dim and head_dim % 2 == 0, (
        f"qkv rows of {width} are not {num_heads} + 2 x {num_kv_heads} heads of an even head_dim")
    assert qkv.stride(1) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1 and cos.stride(0) == sin.stride(0)
    assert cos.shape[1] == head_dim, f"rotary tables of width {cos.shape[1]} for head_dim {head_dim}"
    assert k_cache.shape == v_cache.shape and tuple(k_cache.shape[2:]) == (num_kv_heads, head_dim), (
        f"cache {tuple(k_cache.shape)} does not hold {num_kv_heads} kv heads of dim {head_dim}")
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache head_dim must be contiguous"
    assert slot_mapping.shape[0] == num_tokens and positions.shape[0] == num_tokens
    qk_norm = q_norm_weight is not None
    if qk_norm:
        assert k_norm_weight is not None and q_norm_weight.dtype == qkv.dtype == k_norm_weight.dtype, (
            "the q/k norm weights must be given together, in the activations' dtype")
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    group = group or heads_per_program(num_tokens, num_heads, num_kv_heads)
    assert num_heads % group == 0 and num_kv_heads % group == 0 and group & (group - 1) == 0, group
    half_block = triton.next_power_of_2(head_dim // 2)
    use_pdl = pdl.enabled(qkv.device)
    _rope_store_kernel[(num_tokens, (num_heads + num_kv_heads) // group)](
        qkv, qkv.stride(0), positions, cos, sin, cos.stride(0),
        q_norm_weight, k_norm_weight, eps, slot_mapping, q, q.stride(0), q.stride(1),
        k_cache, v_cache, *k_cache.stride()[:3], *v_cache.stride()[:3],
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PER_PROGRAM=group,
        HALF_BLOCK=half_block, BLOCK_SIZE=k_cache.shape[1], QK_NORM=qk_norm, USE_PDL=use_pdl,
        launch_pdl=use_pdl, num_warps=min(4, max(1, group * half_block // 64)),
        enable_fp_fusion=False,   # an fma would skip the rounding of x * cos that the reference does
    )
    return q
