"""Random paged KV caches and batches for the attention kernel tests (Triton and FlashAttention-4)."""

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
REAL_SHAPES = [(16, 8, 128), (32, 8, 128)]  # (heads, kv heads, head_dim): Qwen3-0.6B, 8B-like


def make_cache(num_blocks, block_size, kvh, d, dtype, gen):
    dev_gen = torch.Generator(device=DEVICE).manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
    shape = (num_blocks, block_size, kvh, d)
    k = torch.randn(shape, generator=dev_gen, device=DEVICE).to(dtype)
    v = torch.randn(shape, generator=dev_gen, device=DEVICE).to(dtype)
    return k, v


def block_tables(ctx_lens, block_size, num_blocks, gen, extra_cols=1):
    """Random disjoint blocks per sequence, -1 padded (with some spare -1 columns)."""
    need = [(c + block_size - 1) // block_size for c in ctx_lens]
    width = max(need) + extra_cols
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(ctx_lens), width), -1, dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    return table.to(DEVICE)


def cu(lens):
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(lens), 0)
    return out.to(DEVICE)


def tol(dtype):
    return {torch.float32: dict(atol=2e-5, rtol=2e-5) if not HAS_CUDA else dict(atol=1e-4, rtol=1e-4),
            torch.float16: dict(atol=3e-3, rtol=3e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]


def rand_lens(n, lo, hi, gen):
    return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()


def paged_inputs(num_queries, ctx_lens, heads, kvh, d, block_size, dtype, seed):
    """Queries [num_queries, heads, d] and a paged cache holding `ctx_lens` tokens per sequence
    in random blocks (three spare): (q, k_cache, v_cache, block_tables)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum((c + block_size - 1) // block_size for c in ctx_lens) + 3
    k_cache, v_cache = make_cache(num_blocks, block_size, kvh, d, dtype, gen)
    bt = block_tables(ctx_lens, block_size, num_blocks, gen)
    q = torch.randn(num_queries, heads, d, generator=gen).to(dtype).to(DEVICE)
    return q, k_cache, v_cache, bt
