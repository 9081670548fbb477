"""Triton KV-store / prefill / decode kernels against the torch reference.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below
before triton is imported by this module) on tiny shapes in float32/float16: the
interpreter's bf16 ``tl.dot`` is wrong (docs/design.md, "Facts the code relies on"). With
CUDA the same small tests run on the GPU, and the ``gpu``-marked tests check real sizes in
bf16 and CUDA graphs.
"""

import importlib
import os
import sys

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")


def _fix_interpreter_index():
    """triton 3.6's interpreter turns a scalar into an int with ``int(array)``, which NumPy
    >= 2.4 refuses for its 1-element scalars: loops with run-time bounds
    (``range(lo, hi, BLOCK)``) then fail. Patch ``__index__`` to read the element."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_otvllm_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._otvllm_patched = True
    interpreter._patch_lang_tensor = patched


if not HAS_CUDA:
    _fix_interpreter_index()

_MODULES = ("otvllm.ops.triton_kvcache", "otvllm.ops.triton_prefill", "otvllm.ops.triton_decode")


def _load_kernels():
    """Import the kernel modules; re-import them if something imported them before the
    interpreter was switched on (their @triton.jit functions are built at import time)."""
    mods = []
    for name in _MODULES:
        if not HAS_CUDA and name in sys.modules:
            mod = importlib.reload(sys.modules[name])
        else:
            mod = importlib.import_module(name)
        mods.append(mod)
    return mods


triton_kvcache, triton_prefill, triton_decode = _load_kernels()
from otvllm.ops import attention_torch as ref  # noqa: E402
from otvllm.ops.query_tiles import IDLE, max_tiles, query_tiles  # noqa: E402
from tests.paged_cases import DEVICE, REAL_SHAPES, paged_inputs  # noqa: E402
from tests.paged_cases import block_tables as _block_tables  # noqa: E402
from tests.paged_cases import cu as _cu  # noqa: E402
from tests.paged_cases import make_cache as _make_cache  # noqa: E402
from tests.paged_cases import rand_lens as _rand_lens  # noqa: E402
from tests.paged_cases import tol as _tol  # noqa: E402

# ---------------------------------------------------------------- helpers

def _prefill_case(q_lens, ctx_lens, heads, kvh, d, block_size, dtype, seed=0, config=None):
    q, k_cache, v_cache, bt = paged_inputs(sum(q_lens), ctx_lens, heads, kvh, d, block_size, dtype, seed)
    cu_q, cu_k = _cu(q_lens), _cu(ctx_lens)
    scale = d ** -0.5
    want = ref.prefill_attention(q, k_cache, v_cache, cu_q, cu_k, bt, scale)
    got = triton_prefill.prefill_attention(q, k_cache, v_cache, cu_q, cu_k, bt, scale, config=config)
    torch.testing.assert_close(got, want, **_tol(dtype))
    # The work list as a CUDA graph holds it: in another order, padded with idle entries.
    tok_m = triton_prefill.tokens_per_tile(heads, kvh, d, dtype, q.device, config)
    lens = np.array(q_lens)
    tiles = query_tiles(lens, np.array(ctx_lens) - lens, tok_m)[::-1]
    padded = np.concatenate([tiles, np.full(max_tiles(sum(q_lens), len(q_lens), tok_m) - len(tiles) + 3, IDLE)])
    got2 = triton_prefill.prefill_attention(q, k_cache, v_cache, cu_q, cu_k, bt, scale, config=config,
                                            tiles=torch.from_numpy(padded).to(q.device))
    torch.testing.assert_close(got2, got, atol=0, rtol=0)


def _decode_case(ctx_lens, heads, kvh, d, block_size, dtype, seed=0, **kw):
    q, k_cache, v_cache, bt = paged_inputs(len(ctx_lens), ctx_lens, heads, kvh, d, block_size, dtype, seed)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    scale = d ** -0.5
    want = ref.decode_attention(q, k_cache, v_cache, bt, ctx, scale)
    got = triton_decode.decode_attention(q, k_cache, v_cache, bt, ctx, scale, **kw)
    torch.testing.assert_close(got, want, **_tol(dtype))
    return got


# ---------------------------------------------------------------- store_kvcache

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kvcache(dtype, block_size):
    gen = torch.Generator().manual_seed(1)
    kvh, d, n, num_blocks = 2, 64, 11, 4
    qkv = torch.randn(n, (4 + 2 * kvh) * d, generator=gen).to(dtype).to(DEVICE)
    key = qkv[:, 4 * d:(4 + kvh) * d].view(n, kvh, d)        # strided views, like a fused qkv
    value = qkv[:, (4 + kvh) * d:].view(n, kvh, d)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(torch.int64)
    slots[[2, 7]] = -1
    slots = slots.to(DEVICE)
    k1 = torch.zeros(num_blocks, block_size, kvh, d, dtype=dtype, device=DEVICE)
    v1 = torch.zeros_like(k1)
    k2, v2 = k1.clone(), v1.clone()
    ref.store_kvcache(key, value, k1, v1, slots)
    triton_kvcache.store_kvcache(key, value, k2, v2, slots.to(torch.int32))
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_store_kvcache_casts_to_cache_dtype():
    gen = torch.Generator().manual_seed(2)
    key = torch.randn(3, 2, 16, generator=gen).to(DEVICE)
    value = torch.randn(3, 2, 16, generator=gen).to(DEVICE)
    slots = torch.tensor([5, -1, 0], dtype=torch.int32, device=DEVICE)
    k1 = torch.zeros(2, 4, 2, 16, dtype=torch.float16, device=DEVICE)
    v1 = torch.zeros_like(k1)
    k2, v2 = k1.clone(), v1.clone()
    ref.store_kvcache(key, value, k1, v1, slots)
    triton_kvcache.store_kvcache(key, value, k2, v2, slots)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


# ---------------------------------------------------------------- prefill

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kvh", [(2, 2), (4, 2), (4, 1)])
def test_prefill_gqa(dtype, heads, kvh):
    # fresh prompts (ctx == q_len), one of length 1, lengths around the key tile
    _prefill_case([1, 17, 40], [1, 17, 40], heads, kvh, 32, 16, dtype)


@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_prefill_prefix_cached(block_size):
    # context longer than the new tokens: prefix-cached blocks; a 1-token "prefill" too
    _prefill_case([5, 1, 30, 16], [37, 20, 30, 80], 4, 2, 16, block_size, torch.float16)


def test_prefill_head_dim_128_fp32():
    _prefill_case([9, 33], [9, 50], 2, 1, 128, 16, torch.float32)


def test_prefill_page_smaller_than_key_tile():
    # key tile (32) spans two 16-token pages: per-row block lookup
    _prefill_case([19, 41], [51, 41], 4, 2, 32, 16, torch.float16,
                  config=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1))


@pytest.mark.parametrize("block_size", [16, 64])
def test_prefill_tensor_descriptor_loads(block_size):
    # the TMA path (used on Hopper); stale NaNs in unused slots must not leak into the output
    gen = torch.Generator().manual_seed(9)
    q_lens, ctx_lens = [5, 1, 23], [37, 1, 23]
    num_blocks = sum((c + block_size - 1) // block_size for c in ctx_lens) + 2
    k_cache, v_cache = _make_cache(num_blocks, block_size, 2, 32, torch.float16, gen)
    bt = _block_tables(ctx_lens, block_size, num_blocks, gen)
    for i, c in enumerate(ctx_lens):  # poison the slots after each context
        for pos in range(c, bt.shape[1] * block_size):
            blk = int(bt[i, pos // block_size])
            if blk >= 0:
                k_cache[blk, pos % block_size] = float("nan")
                v_cache[blk, pos % block_size] = float("nan")
    q = torch.randn(sum(q_lens), 4, 32, generator=gen).to(torch.float16).to(DEVICE)
    cu_q, cu_k = _cu(q_lens), _cu(ctx_lens)
    want = ref.prefill_attention(q, k_cache, v_cache, cu_q, cu_k, bt, 0.2)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2, tma=True)
    got = triton_prefill.prefill_attention(q, k_cache, v_cache, cu_q, cu_k, bt, 0.2, config=cfg)
    torch.testing.assert_close(got, want, **_tol(torch.float16))


def test_prefill_non_power_of_two_group():
    # 6 heads over 2 kv heads (group 3): tile rows are padded
    _prefill_case([7, 12], [20, 12], 6, 2, 16, 16, torch.float32)


def test_prefill_rejects_odd_head_dim():
    q = torch.zeros(2, 2, 48, device=DEVICE)
    cache = torch.zeros(2, 16, 2, 48, device=DEVICE)
    cu = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
    bt = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(AssertionError, match="power-of-two head_dim"):
        triton_prefill.prefill_attention(q, cache, cache, cu, cu, bt, 1.0)


# ---------------------------------------------------------------- decode

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kvh", [(2, 2), (4, 2), (8, 2)])
def test_decode_gqa(dtype, heads, kvh):
    _decode_case([1, 15, 16, 17, 70], heads, kvh, 32, 16, dtype)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_splits(block_size, num_splits):
    # more splits than tiles for short contexts: empty splits must be ignored
    _decode_case([1, 33, 100, 130], 4, 2, 16, block_size, torch.float16, num_splits=num_splits)


def test_decode_page_smaller_than_key_tile():
    _decode_case([3, 47, 90], 4, 1, 32, 16, torch.float16, num_splits=2,
                 config=dict(BLOCK_N=32, num_warps=4, num_stages=1))


def test_decode_head_dim_128_fp32_and_workspace():
    ctx = [5, 60, 200]
    n = triton_decode.decode_workspace_numel(len(ctx), 4, 128, 4)
    ws = torch.empty(n + 7, dtype=torch.float32, device=DEVICE)
    _decode_case(ctx, 4, 2, 128, 32, torch.float32, num_splits=4, workspace=ws)


def test_decode_max_context_len_is_only_a_hint():
    a = _decode_case([40, 200], 4, 2, 16, 16, torch.float32, max_context_len=1)
    b = _decode_case([40, 200], 4, 2, 16, 16, torch.float32, max_context_len=100000)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_decode_empty_context_gives_zeros():
    # padded entries of a CUDA-graph batch have context length 0
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = _make_cache(4, 16, 2, 16, torch.float32, gen)
    q = torch.randn(2, 4, 16, generator=gen).to(DEVICE)
    bt = torch.tensor([[0, 1], [-1, -1]], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor([20, 0], dtype=torch.int32, device=DEVICE)
    for splits in (1, 4):
        out = triton_decode.decode_attention(q, k_cache, v_cache, bt, ctx, 0.25, num_splits=splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        want = ref.decode_attention(q[:1], k_cache, v_cache, bt[:1], ctx[:1], 0.25)
        torch.testing.assert_close(out[:1], want, **_tol(torch.float32))


def test_decode_num_splits_heuristic():
    cpu = torch.device("cpu")
    assert triton_decode.decode_num_splits(256, 8, 1024, cpu) == 1
    s = triton_decode.decode_num_splits(1, 8, 4096, cpu)
    assert 1 <= s <= triton_decode.MAX_SPLITS and s & (s - 1) == 0


# ---------------------------------------------------------------- GPU, real sizes

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("heads,kvh,d", REAL_SHAPES)
@pytest.mark.parametrize("block_size", [16, 256])
def test_gpu_store_kvcache_bf16(heads, kvh, d, block_size):
    gen = torch.Generator().manual_seed(4)
    n, num_blocks = 5000, 64 * 256 // block_size
    key = torch.randn(n, kvh, d, generator=gen).to(torch.bfloat16).cuda()
    value = torch.randn(n, kvh, d, generator=gen).to(torch.bfloat16).cuda()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].to(torch.int32)
    slots[::7] = -1
    slots = slots.cuda()
    k1 = torch.zeros(num_blocks, block_size, kvh, d, dtype=torch.bfloat16, device="cuda")
    v1 = torch.zeros_like(k1)
    k2, v2 = k1.clone(), v1.clone()
    ref.store_kvcache(key, value, k1, v1, slots)
    triton_kvcache.store_kvcache(key, value, k2, v2, slots)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


@gpu
@needs_cuda
@pytest.mark.parametrize("heads,kvh,d", REAL_SHAPES)
@pytest.mark.parametrize("block_size", [16, 256])
def test_gpu_prefill_bf16(heads, kvh, d, block_size):
    gen = torch.Generator().manual_seed(5)
    q_lens = [1, 7, 100, 1024, 2048, 513]
    ctx_lens = [1, 300, 100, 1024 + 256, 2048, 4096]  # some prefix-cached
    _prefill_case(q_lens, ctx_lens, heads, kvh, d, block_size, torch.bfloat16, seed=5)
    # many short prompts
    q_lens = _rand_lens(64, 1, 300, gen)
    _prefill_case(q_lens, q_lens, heads, kvh, d, block_size, torch.bfloat16, seed=6)


@gpu
@needs_cuda
@pytest.mark.parametrize("heads,kvh,d", REAL_SHAPES)
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("batch,max_ctx", [(256, 1024), (4, 4096), (64, 4096)])
def test_gpu_decode_bf16(heads, kvh, d, block_size, batch, max_ctx):
    gen = torch.Generator().manual_seed(7)
    ctx = _rand_lens(batch, 1, max_ctx, gen)
    ctx[0] = max_ctx
    _decode_case(ctx, heads, kvh, d, block_size, torch.bfloat16, seed=7, max_context_len=max_ctx)


@gpu
@needs_cuda
@pytest.mark.parametrize("heads,kvh,d", REAL_SHAPES)
def test_gpu_fp32_and_fp16(heads, kvh, d):
    for dtype in (torch.float32, torch.float16):
        _decode_case([1, 500, 2000], heads, kvh, d, 16, dtype, max_context_len=2000)
        _prefill_case([3, 300], [3, 700], heads, kvh, d, 16, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
def test_gpu_decode_cuda_graph(block_size):
    heads, kvh, d, batch, max_ctx = 16, 8, 128, 64, 4096
    gen = torch.Generator().manual_seed(8)
    max_blocks = max_ctx // block_size
    num_blocks = batch * max_blocks
    k_cache, v_cache = _make_cache(num_blocks, block_size, kvh, d, torch.bfloat16, gen)
    scale = d ** -0.5
    q = torch.zeros(batch, heads, d, dtype=torch.bfloat16, device="cuda")
    bt = torch.full((batch, max_blocks), -1, dtype=torch.int32, device="cuda")
    ctx = torch.zeros(batch, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    splits = triton_decode.decode_num_splits(batch, kvh, max_ctx)
    ws = triton_decode.decode_workspace(batch, heads, d, splits)

    def fill(seed, n_real):
        g = torch.Generator().manual_seed(seed)
        lens = _rand_lens(n_real, 1, max_ctx, g) + [0] * (batch - n_real)
        q.copy_(torch.randn(batch, heads, d, generator=g).to(torch.bfloat16))
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        table = _block_tables([max(1, c) for c in lens], block_size, num_blocks, g, extra_cols=0)
        bt.fill_(-1)
        bt[:, :table.shape[1]].copy_(table)
        return n_real

    def run():
        triton_decode.decode_attention(q, k_cache, v_cache, bt, ctx, scale, max_context_len=max_ctx,
                                       out=out, workspace=ws)

    fill(0, batch)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed, n_real in ((1, batch), (2, 5), (3, 40)):
        fill(seed, n_real)
        graph.replay()
        torch.cuda.synchronize()
        want = ref.decode_attention(q[:n_real], k_cache, v_cache, bt[:n_real], ctx[:n_real], scale)
        torch.testing.assert_close(out[:n_real], want, **_tol(torch.bfloat16))
        assert torch.equal(out[n_real:], torch.zeros_like(out[n_real:]))
