"""Triton matrix-vector product for the few-token case: y = x @ W.T (+ bias), x [M, K] with M small.

A decode step at batch 1-4 is a handful of GEMVs per layer, bound by reading the weights once.
For some of these shapes cuBLAS picks tiles that leave most of the device idle: on the H200,
Qwen3-0.6B's o_proj (K=2048, N=1024) at one token took 12.6 us in cuBLAS and 3.4 us here, while
for gate_up cuBLAS was as fast (benchmarks/gemv.py). So the engine times both at start-up
(core/gemv_choice.py) and uses this kernel only where it wins.

Each program owns BLOCK_N weight rows and reads them across K in wide, coalesced strips,
pipelined over NUM_STAGES loads. Products accumulate elementwise in float32 and are summed
across K once at the end (no tensor cores); reducing every strip instead was ~10% slower on the
H200 for the K=2048 and 3072 weights, with the same strips. A tensor-core path for 5-16 tokens
(`tl.dot` over 16-row tiles) was tried and removed: alone it was near cuBLAS, but with the norm
or the SiLU-and-mul inside, as a step calls it, it took 8.6-42 us at its best tiles where cuBLAS
took 7.4-8.8, the norm kernel included (H200, 8 tokens).

Launched with PDL (ops/pdl.py), each program first asks for its rows of the weight to be brought
into L2, while the kernel before it finishes.
"""

import torch
import triton
import triton.language as tl

from otvllm.ops import pdl

MAX_TOKENS = 8   # rows of x this kernel is meant for; past it, tensor-core GEMMs win
# float32 elements a program accumulates (BLOCK_M x BLOCK_N x BLOCK_K): 128 registers a thread at 4 warps
ACCUMULATOR = 4 * 4 * 1024


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, nw_ptr, h_ptr, M, N, stride_xm, stride_wn, stride_ym,
                 stride_rm, stride_hm, eps,
                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_AND_MUL: tl.constexpr,
                 RMS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
                 PREFETCH_LINE: tl.constexpr, PREFETCH_LINES: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if PREFETCH_LINES > 0:   # the weights are not the kernel before's: into L2 while it finishes
        cols = tl.minimum(tl.arange(0, PREFETCH_LINES) * PREFETCH_LINE, K - 1)
        pdl.prefetch_l2(w_ptr + tl.minimum(rows, N - 1)[:, None].to(tl.int64) * stride_wn + cols[None, :])
    pdl.wait_for_previous(USE_PDL)
    ms = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k = k0 + ks
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + k[None, :],
                    mask=(rows[:, None] < N) & (k[None, :] < K), other=0.0)
        x_ptrs = x_ptr + ms[:, None] * stride_xm + k[None, :]
        x_ok = (ms[:, None] < M) & (k[None, :] < K)
        x = tl.load(x_ptrs, mask=x_ok, other=0.0).to(tl.float32)
        if SILU_AND_MUL:   # x holds [gate, up]: the product's input is silu(gate) * up, rounded as stored
            up = tl.load(x_ptrs + K, mask=x_ok, other=0.0).to(tl.float32)
            x = (x * tl.sigmoid(x) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
        if RMS_NORM:   # the input is rms_norm(x + residual): its weight now, its 1/rms once K is summed
            if HAS_RESIDUAL:   # the residual stream, rounded as stored; the first program writes it out
                r = tl.load(r_ptr + ms[:, None] * stride_rm + k[None, :], mask=x_ok, other=0.0).to(tl.float32)
                x = (x + r).to(x_ptr.dtype.element_ty).to(tl.float32)
                tl.store(h_ptr + ms[:, None] * stride_hm + k[None, :], x.to(h_ptr.dtype.element_ty),
                         mask=x_ok & (tl.program_id(0) == 0))
            sum_sq += tl.sum(x * x, axis=1)
            x = x * tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)[None, :]
        acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    if RMS_NORM:
        y *= tl.rsqrt(sum_sq / K + eps)[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + ms[:, None] * stride_ym + rows[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(ms[:, None] < M) & (rows[None, :] < N))


def _config(m: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): the H200's best at 1-4 tokens for the Qwen3-0.6B
    weights where this kernel beats cuBLAS (benchmarks/gemv.py --sweep), the strip narrowed so
    the accumulator stays in registers at more tokens."""
    block_n = 4
    block_k = min(1024, triton.next_power_of_2(k), ACCUMULATOR // (block_n * triton.next_power_of_2(m)))
    return block_n, block_k, 4, 3


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, silu_and_mul: bool = False,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_TOKENS, last dim contiguous) @ weight[N, K].T + bias -> [M, N] in x's dtype.
    With `silu_and_mul`, x is [M, 2K] = [gate, up] and the product is of silu(gate) * up: the
    activation is applied as the kernel reads its input, not by a kernel of its own."""
    m, n = x.shape[0], weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _launch(x, weight, bias, y, config, silu_and_mul=silu_and_mul)
    return y


def gemv_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) @ weight.T + bias, x + residual), in one kernel: the residual add
    and the norm happen as the product reads its input (a decode step of few tokens otherwise
    spends a kernel on them before each of its q/k/v and gate/up products). Without `residual`,
    (rms_norm(x) @ weight.T + bias, x). The norm's 1/rms scales the sums, so the normalised input
    is not rounded to x's dtype before the product as the unfused layers round it."""
    m, k, n = x.shape[0], weight.shape[1], weight.shape[0]
    assert x.shape == (m, k) and norm_weight.shape == (k,) and (residual is None or residual.shape == x.shape)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    h = torch.empty_like(x) if residual is not None else x
    _launch(x, weight, bias, y, config, norm=(residual, norm_weight, eps, h))
    return y, h


def _launch(x, weight, bias, y, config, silu_and_mul: bool = False, norm: tuple | None = None) -> None:
    m, k, n = x.shape[0], weight.shape[1], weight.shape[0]
    assert m <= MAX_TOKENS and x.shape[1] == (2 * k if silu_and_mul else k)
    assert x.stride(-1) == 1 and weight.stride(-1) == 1
    residual, norm_weight, eps, h = norm if norm is not None else (None, None, 0.0, None)
    assert residual is None or (residual.stride(-1) == 1 and h.stride(-1) == 1)
    block_n, block_k, num_warps, num_stages = config or _config(m, k)
    unused = weight   # a pointer for the arguments a variant does not read
    use_pdl = pdl.enabled(x.device)
    line = 128 // weight.element_size()
    prefetch_lines = triton.next_power_of_2(triton.cdiv(k, line)) if use_pdl else 0
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else unused, y,
        residual if residual is not None else unused, norm_weight if norm_weight is not None else unused,
        h if residual is not None else unused, m, n, x.stride(0), weight.stride(0), y.stride(0),
        residual.stride(0) if residual is not None else 0, h.stride(0) if residual is not None else 0, eps,
        K=k, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages,
        HAS_BIAS=bias is not None, SILU_AND_MUL=silu_and_mul, RMS_NORM=norm is not None,
        HAS_RESIDUAL=residual is not None, USE_PDL=use_pdl, PREFETCH_LINE=line, PREFETCH_LINES=prefetch_lines,
        num_warps=num_warps, launch_pdl=use_pdl)
