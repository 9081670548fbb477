"""Triton flash-attention prefill over the paged KV cache.

Same signature and semantics as :func:`otvllm.ops.attention_torch.prefill_attention`:
causal variable-length attention of the new tokens ``q [num_tokens, H, D]`` of each
sequence over its whole context (prefix-cached tokens plus the new ones, already written
into the cache), reading K/V through ``block_tables``. Query ``i`` of sequence ``b`` sits
at position ``ctx_len_b - q_len_b + i``.

Kernel layout: one program per (tile of query tokens, kv head); the tiles come from a list
built on the host (ops/query_tiles.py), so the grid depends on the token count alone. The tile packs
all ``G = H // KVH`` query heads of the kv head's group (rows ``token * G + head``), so
each K/V tile loaded from the cache serves the whole group. Online softmax in float32
with ``exp2``; the key loop is split into the fully visible part (no mask) and the causal
diagonal (masked).
"""

import numpy as np
import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older triton: pointer loads only
    TensorDescriptor = None

from otvllm.ops.triton_interpreter import interpreting
from otvllm.ops.query_tiles import query_tiles

_LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(base, desc, kvh, bt_row, start, offs_n, tile_offs, d, n_ok, stride_b, stride_s,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """K or V rows ``start + offs_n`` of one kv head from the paged cache: [BLOCK_N, D].
    ``tile_offs`` is the loop-invariant ``offs_n[:, None] * stride_s + d[None, :]``.
    With USE_TMA (needs PAGE >= BLOCK_N) ``desc`` is a tensor descriptor over the cache seen
    as [num_blocks * PAGE, KVH * D]; rows past the context are not masked (the caller masks
    the scores and zeroes V's rows)."""
    if USE_TMA:
        blk = tl.load(bt_row + start // PAGE)
        tile = desc.load([blk * PAGE + start % PAGE, kvh * HEAD_DIM])
    else:
        if PAGE >= BLOCK_N:
            # the tile lies in one page (start is a multiple of BLOCK_N, PAGE a multiple of it)
            blk = tl.load(bt_row + start // PAGE).to(tl.int64)
            ptrs = base + (blk * stride_b + (start % PAGE) * stride_s) + tile_offs
        else:
            n = start + offs_n
            if MASKED:
                blk = tl.load(bt_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)
            else:
                blk = tl.load(bt_row + n // PAGE).to(tl.int64)
            ptrs = base + (blk * stride_b + (n % PAGE) * stride_s)[:, None] + d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=n_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


# The block table's width varies from step to step: no specialising on it (a recompile).
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    Q, K, V, O, K_desc, V_desc, tiles_ptr, cu_q_ptr, cu_k_ptr, bt_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOK_M: tl.constexpr,
    DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    tile = tl.load(tiles_ptr + tl.program_id(0))
    if tile < 0:   # padding of the list
        return
    seq = (tile >> 32).to(tl.int32)
    tok0 = (tile & 0xFFFFFFFF).to(tl.int32)
    kvh = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    kv_len = tl.load(cu_k_ptr + seq + 1) - tl.load(cu_k_ptr + seq)
    past = kv_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = (rows < TOK_M * GROUP) & (tok < q_len)
    pos = past + tok
    d = tl.arange(0, HEAD_DIM)

    q_ptrs = Q + (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(K.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    k_tile = offs_n[:, None] * stride_ks + d[None, :]
    v_tile = offs_n[:, None] * stride_vs + d[None, :]
    # keys [0, past + tok0] are visible to every row of the tile
    full_end = ((past + tok0 + 1) // BLOCK_N) * BLOCK_N
    last_tok = tl.minimum(tok0 + TOK_M, q_len) - 1
    hi = past + last_tok + 1

    for start in range(0, full_end, BLOCK_N):
        k = _load_kv_tile(k_base, K_desc, kvh, bt_row, start, offs_n, k_tile, d, offs_n, stride_kb,
                          stride_ks, PAGE, BLOCK_N, HEAD_DIM, False, USE_TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_base, V_desc, kvh, bt_row, start, offs_n, v_tile, d, offs_n, stride_vb,
                          stride_vs, PAGE, BLOCK_N, HEAD_DIM, False, USE_TMA)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(V.dtype.element_ty), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    for start in range(full_end, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < hi
        k = _load_kv_tile(k_base, K_desc, kvh, bt_row, start, offs_n, k_tile, d, n_ok, stride_kb,
                          stride_ks, PAGE, BLOCK_N, HEAD_DIM, True, USE_TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        visible = (n[None, :] <= pos[:, None]) & n_ok[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_base, V_desc, kvh, bt_row, start, offs_n, v_tile, d, n_ok, stride_vb,
                          stride_vs, PAGE, BLOCK_N, HEAD_DIM, True, USE_TMA)
        if USE_TMA:
            v = tl.where(n_ok[:, None], v, 0.0)  # stale slots past the context may hold NaN
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(V.dtype.element_ty), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes and launch settings (override through ``prefill_attention(config=...)``)."""
    if interpreting(device):
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1, tma=False)
    # tensor-descriptor (TMA) loads measured no faster than pointer loads on the H100
    # (387 vs 392 TFLOP/s): off by default, available through config=dict(tma=True)
    tma = False
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, tma=False)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=tma)
    if head_dim <= 128:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, tma=tma)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, tma=False)


def _tma_ok(cache: torch.Tensor, page: int, block_n: int) -> bool:
    """The cache can be seen as [num_blocks * page, KVH * D] rows for a tensor descriptor."""
    nb, bs, kvh, d = cache.shape
    return (TensorDescriptor is not None and page >= block_n and cache.stride(3) == 1
            and cache.stride(2) == d and cache.stride(1) == kvh * d and cache.stride(0) == bs * kvh * d
            and cache.data_ptr() % 16 == 0 and (kvh * d * cache.element_size()) % 16 == 0)


def _launch_config(group: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                   config: dict | None) -> tuple[dict, int]:
    """The settings and the rows of a tile (all the group's heads of its tokens)."""
    cfg = {**prefill_config(head_dim, dtype, device), **(config or {})}
    return cfg, max(cfg["BLOCK_M"], triton.next_power_of_2(group))


def tokens_per_tile(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device, config: dict | None = None) -> int:
    """Query tokens of one program: what ops/query_tiles.py lists the tiles in."""
    group = num_heads // num_kv_heads
    return _launch_config(group, head_dim, dtype, device, config)[1] // group


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      block_tables: torch.Tensor, scale: float, *,
                      tiles: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      config: dict | None = None) -> torch.Tensor:
    """Causal varlen attention of new tokens q [num_tokens, H, D] over each sequence's paged
    context. ``tiles``, the kernel's work list (ops/query_tiles.py, for this head count and
    ``config``; it may be padded with -1) avoids a device sync when given. ``out`` may be a
    preallocated [num_tokens, H, D] tensor. ``config`` overrides the tile sizes (see
    :func:`prefill_config`)."""
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, page, num_kv_heads, head_dim_k = k_cache.shape
    assert head_dim_k == head_dim and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, (
        f"triton prefill_attention needs a power-of-two head_dim >= 16, got {head_dim}")
    assert page & (page - 1) == 0, f"block size must be a power of two, got {page}"
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads not a multiple of {num_kv_heads} kv heads"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    group = num_heads // num_kv_heads
    num_seqs = cu_seqlens_q.shape[0] - 1
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    cfg, block_m = _launch_config(group, head_dim, q.dtype, q.device, config)
    block_n = cfg["BLOCK_N"]
    tok_m = block_m // group
    if tiles is None:
        cu_q, cu_k = cu_seqlens_q.cpu().numpy(), cu_seqlens_k.cpu().numpy()
        query_lens = np.diff(cu_q)
        tiles = torch.from_numpy(query_tiles(query_lens, np.diff(cu_k) - query_lens, tok_m)).to(q.device)
    grid = (tiles.shape[0], num_kv_heads)
    dot_prec = "ieee" if q.dtype == torch.float32 or k_cache.dtype == torch.float32 else "tf32"
    use_tma = bool(cfg.get("tma", False)) and _tma_ok(k_cache, page, block_n) and _tma_ok(v_cache, page, block_n)
    if use_tma:
        rows = num_blocks * page
        k_desc = TensorDescriptor(k_cache, [rows, num_kv_heads * head_dim], [num_kv_heads * head_dim, 1],
                                  [block_n, head_dim])
        v_desc = TensorDescriptor(v_cache, [rows, num_kv_heads * head_dim], [num_kv_heads * head_dim, 1],
                                  [block_n, head_dim])
    else:
        k_desc, v_desc = k_cache, v_cache  # unused
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, k_desc, v_desc, tiles, cu_seqlens_q, cu_seqlens_k, block_tables,
        scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, TOK_M=tok_m, DOT_PREC=dot_prec, USE_TMA=use_tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
