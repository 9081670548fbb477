"""Triton paged decode attention (split-K, "flash decoding").

Same signature and semantics as :func:`otvllm.ops.attention_torch.decode_attention`: one
new token per sequence, ``q [num_seqs, H, D]``, attending to the first
``context_lens[b]`` tokens of its paged cache (the new token's K/V already stored).

Stage 1: one program per (sequence, kv head, split) computes, for all ``G = H // KVH``
query heads of the group at once (one K/V load serves the group), the normalised partial
output and log-sum-exp of its share of the context. Each sequence's context is divided
among the splits at run time (``cdiv(context_len, num_splits)`` rounded up to the key
tile), so the number of splits only affects speed, never the result, and a launch
captured in a CUDA graph stays correct for any context length. With a single split,
stage 1 writes the output directly and stage 2 is skipped.

Stage 2: one program per (sequence, query head) merges the splits.

CUDA graphs: pass ``max_context_len`` (host int: any value is correct; it only picks the
split count) or ``num_splits``; then the call does no host synchronisation. Intermediates
are sized from shapes and ints alone; pass ``workspace`` (see :func:`decode_workspace`)
to reuse one preallocated buffer. Run the function once before capturing (Triton
compiles on first use).
"""

import torch
import triton
import triton.language as tl

from otvllm.ops import pdl
from otvllm.ops.triton_interpreter import interpreting

_LOG2E = 1.4426950408889634
MAX_SPLITS = 64
MIN_TOKENS_PER_SPLIT = 128

_SM_COUNT: dict = {}


# The block table's width varies from step to step: no specialising on it (a recompile).
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_stage1(
    Q, K, V, bt_ptr, ctx_ptr, MID_O, MID_LSE, O, qk_scale,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.wait_for_previous(USE_PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq)
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, ctx)

    h = tl.arange(0, BLOCK_H)
    h_ok = h < GROUP
    head = kvh * GROUP + h
    d = tl.arange(0, HEAD_DIM)
    seq64 = seq.to(tl.int64)
    q = tl.load(Q + seq64 * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=h_ok[:, None], other=0.0).to(K.dtype.element_ty)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    bt_row = bt_ptr + seq64 * stride_bt
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    k_tile = offs_n[:, None] * stride_ks + d[None, :]
    v_tile = offs_n[:, None] * stride_vs + d[None, :]
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < hi
        if PAGE >= BLOCK_N:
            # the tile lies in one page (start is a multiple of BLOCK_N)
            blk = tl.load(bt_row + start // PAGE).to(tl.int64)
            k_ptrs = k_base + (blk * stride_kb + (start % PAGE) * stride_ks) + k_tile
            v_ptrs = v_base + (blk * stride_vb + (start % PAGE) * stride_vs) + v_tile
        else:
            blk = tl.load(bt_row + n // PAGE, mask=n_ok, other=0).to(tl.int64)
            k_ptrs = k_base + (blk * stride_kb + (n % PAGE) * stride_ks)[:, None] + d[None, :]
            v_ptrs = v_base + (blk * stride_vb + (n % PAGE) * stride_vs)[:, None] + d[None, :]
        k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(V.dtype.element_ty), v, acc, input_precision=DOT_PREC)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(O + seq64 * stride_ob + head[:, None] * stride_oh + d[None, :],
                 out.to(O.dtype.element_ty), mask=h_ok[:, None])
    else:
        # MID_O [B, H, S, D], MID_LSE [B, H, S], contiguous
        row = (seq64 * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(MID_O + row[:, None] * HEAD_DIM + d[None, :], out, mask=h_ok[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(MID_LSE + row, lse, mask=h_ok)


@triton.jit
def _decode_stage2(
    MID_O, MID_LSE, O, stride_ob, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl.wait_for_previous(USE_PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, HEAD_DIM)
    row0 = (seq * NUM_HEADS + head) * NUM_SPLITS
    lse = tl.load(MID_LSE + row0 + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(MID_O + (row0 + s)[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den > 0, den, 1.0)
    tl.store(O + seq * stride_ob + head * stride_oh + d, out.to(O.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if interpreting(device):
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int,
                      device: torch.device | str = "cuda") -> int:
    """Splits per sequence: enough (sequence, kv head, split) programs to fill the GPU
    (about two per SM), each split covering at least MIN_TOKENS_PER_SPLIT tokens; a power
    of two up to MAX_SPLITS."""
    device = torch.device(device)
    programs = max(1, num_seqs * num_kv_heads)
    want = triton.cdiv(2 * _num_sms(device), programs)
    by_len = triton.cdiv(max(1, max_context_len), MIN_TOKENS_PER_SPLIT)
    splits = max(1, min(want, by_len, MAX_SPLITS))
    return min(triton.next_power_of_2(splits), MAX_SPLITS)


def decode_workspace_numel(num_seqs: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    """float32 elements the split intermediates need (0 when num_splits == 1)."""
    return 0 if num_splits <= 1 else num_seqs * num_heads * num_splits * (head_dim + 1)


def decode_workspace(num_seqs: int, num_heads: int, head_dim: int, num_splits: int = MAX_SPLITS,
                     device: torch.device | str = "cuda") -> torch.Tensor:
    """A float32 buffer large enough for any call with at most these sizes."""
    return torch.empty(max(1, decode_workspace_numel(num_seqs, num_heads, head_dim, num_splits)),
                       dtype=torch.float32, device=device)


def decode_config(head_dim: int, page: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Key tile and launch settings (override through ``decode_attention(config=...)``)."""
    if interpreting(device):
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=128 if head_dim <= 128 else 64, num_warps=4, num_stages=2)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
                     max_context_len: int | None = None, num_splits: int | None = None,
                     out: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                     config: dict | None = None) -> torch.Tensor:
    """One new token per sequence, q [num_seqs, H, D], over its paged context.

    ``max_context_len``: host-side bound used to choose the split count (no sync; any
    value gives a correct result). ``num_splits``: force the split count (power of two
    preferred, <= MAX_SPLITS). ``out``: preallocated [num_seqs, H, D] output.
    ``workspace``: float32 buffer of >= decode_workspace_numel(...) elements.
    ``config``: override BLOCK_N / num_warps / num_stages."""
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, page, num_kv_heads, head_dim_k = k_cache.shape
    assert head_dim_k == head_dim and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape, v_cache.shape)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, (
        f"triton decode_attention needs a power-of-two head_dim >= 16, got {head_dim}")
    assert page & (page - 1) == 0, f"block size must be a power of two, got {page}"
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads not a multiple of {num_kv_heads} kv heads"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max().item())
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_context_len, q.device)
    num_splits = max(1, int(num_splits))
    cfg = dict(decode_config(head_dim, page, q.dtype, q.device))
    if config:
        cfg.update(config)
    block_n = cfg["BLOCK_N"]
    dot_prec = "ieee" if q.dtype == torch.float32 or k_cache.dtype == torch.float32 else "tf32"
    need = decode_workspace_numel(num_seqs, num_heads, head_dim, num_splits)
    if num_splits > 1:
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=q.device)
        assert workspace.dtype == torch.float32 and workspace.numel() >= need, (
            f"decode workspace too small: {workspace.numel()} < {need} float32 elements")
        n_o = num_seqs * num_heads * num_splits * head_dim
        mid_o = workspace[:n_o]
        mid_lse = workspace[n_o:need]
    else:
        mid_o = mid_lse = out  # unused
    use_pdl = pdl.enabled(q.device)
    _decode_stage1[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, mid_o, mid_lse, out, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, PAGE=page, BLOCK_N=block_n, NUM_SPLITS=num_splits, DOT_PREC=dot_prec,
        USE_PDL=use_pdl, launch_pdl=use_pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if num_splits > 1:
        _decode_stage2[(num_seqs, num_heads)](
            mid_o, mid_lse, out, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), USE_PDL=use_pdl, launch_pdl=use_pdl,
            num_warps=4 if head_dim >= 128 else 2,
        )
    return out
