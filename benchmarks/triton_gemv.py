"""Triton matrix-vector product for the few-token case: y = x @ W.T (+ bias), x [M, K] with M small.

An experiment for issue 13, timed against cuBLAS by benchmarks/gemv.py; the engine does not use
it. Measured on the H200 (2026-12-01) at Qwen3-0.6B's weights, it beats cuBLAS only on o_proj
(K=2048, N=1024) at 1-4 tokens (5.2 against 12.9 us at one token); cuBLAS is as fast or faster on
qkv, gate_up, down and lm_head, so a per-shape choice would be needed to use it.

A decode step at batch 1-8 is a handful of GEMVs per layer, bound by reading the weights once.
For these shapes cuBLAS picks tall-skinny tiles that reach about a quarter of the H200's copy
rate (issue 13's profile). Here each program owns BLOCK_N weight rows, reads them across K in
wide, coalesced strips and reduces in float32 with a broadcast multiply (no tensor cores: at
M <= 8 they would idle), and SPLIT_K programs share a row block when N alone gives too few
programs to keep every SM streaming. The split-K partial sums meet in a float32 buffer.
"""

import torch
import triton
import triton.language as tl

MAX_TOKENS = 8   # rows of x this kernel is meant for; past it, tensor-core GEMMs win


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_ym,
                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    K_PER_SPLIT: tl.constexpr = K // SPLIT_K
    k_begin = pid_k * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        k = k_begin + k0 + ks
        k_ok = (k0 + ks) < K_PER_SPLIT
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + k[None, :],
                    mask=(rows[:, None] < N) & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + ms[:, None] * stride_xm + k[None, :], mask=(ms[:, None] < M) & k_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    out = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    mask = (ms[:, None] < M) & (rows[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(out, acc, mask=mask)


def _config(n: int, k: int, num_sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K): enough programs for every SM to stream a strip of weights."""
    block_n, block_k = 8, 512
    while block_k > k:
        block_k //= 2
    split_k = 1
    while triton.cdiv(n, block_n) * split_k < 2 * num_sms and k % (2 * split_k * block_k) == 0 and split_k < 8:
        split_k *= 2
    return block_n, block_k, split_k


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         config: tuple[int, int, int] | None = None, num_warps: int = 4) -> torch.Tensor:
    """x [M, K] (M <= MAX_TOKENS, last dim contiguous) @ weight[N, K].T + bias -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_TOKENS and weight.shape[1] == k and x.stride(-1) == 1 and weight.stride(-1) == 1
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    block_n, block_k, split_k = config or _config(n, k, num_sms)
    assert k % split_k == 0, (k, split_k)
    if split_k == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k)
    _gemv_kernel[grid](x, weight, bias if bias is not None else weight, y, m, n, x.stride(0), weight.stride(0),
                       y.stride(0), K=k, BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=block_n,
                       BLOCK_K=block_k, SPLIT_K=split_k, HAS_BIAS=bias is not None, num_warps=num_warps)
    return y if split_k == 1 else y.to(x.dtype)
