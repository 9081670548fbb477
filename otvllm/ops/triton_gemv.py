"""Triton matrix-vector product for the few-token case: y = x @ W.T (+ bias), x [M, K] with M small.

A decode step at batch 1-4 is a handful of GEMVs per layer, bound by reading the weights once.
For some of these shapes cuBLAS picks tiles that leave most of the device idle: on the H200,
Qwen3-0.6B's o_proj (K=2048, N=1024) at one token took 12.9 us in cuBLAS and 5.2 us here, while
for its other weights cuBLAS was as fast (benchmarks/gemv.py). So the engine times both at
start-up (core/gemv_choice.py) and uses this kernel only where it wins.

Each program owns BLOCK_N weight rows and reads them across K in wide, coalesced strips,
reducing in float32 with a broadcast multiply (no tensor cores: at M <= 8 they would idle).
SPLIT_K programs can share a row block, meeting in a float32 buffer (a tuning option: on the
H200 one program per row block was always at least as fast).
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


def _config(k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K): the H200's best for Qwen3-0.6B's o_proj and down_proj, the
    weights where this kernel can beat cuBLAS."""
    block_k = 512
    while block_k > k:
        block_k //= 2
    return 4, block_k, 1


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         config: tuple[int, int, int] | None = None, num_warps: int = 4) -> torch.Tensor:
    """x [M, K] (M <= MAX_TOKENS, last dim contiguous) @ weight[N, K].T + bias -> [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_TOKENS and weight.shape[1] == k and x.stride(-1) == 1 and weight.stride(-1) == 1
    block_n, block_k, split_k = config or _config(k)
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
