"""Benchmark otvllm's Triton attention kernels on CUDA.

(a) device copy bandwidth (a large tensor copy, read + write bytes);
(b) paged decode attention: KV bytes read per second and the ratio to the copy rate;
(c) paged causal prefill attention: TFLOP/s against torch SDPA (cuDNN, flash backends);
(d) q/k norm + rotary + KV store between the qkv projection and attention: the fused Triton
    kernel against the unfused path (torch.compile'd q_norm, k_norm and rotary, then the
    Triton KV store), microseconds per layer replayed from CUDA graphs.
Where FlashAttention-4 can run (`flash_attn.cute`), (b) and (c) time it on the same paged
inputs as well, as the engine's `flash_attn` backend calls it.

    python benchmarks/kernels.py [--json results.json] [--sweep] [--only rope_store]

``--sweep`` also times a grid of tile configurations at the headline shapes (tuning aid).
Timings never gate tests; compare them only within one run on one machine.
"""

import argparse
import json
import sys

import torch

try:  # run from a checkout without installing
    import otvllm  # noqa: F401
except Exception:  # pragma: no cover - the package __init__ may need optional deps
    import os
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton
import triton.testing

from otvllm.layers import basic
from otvllm.ops import flash_attn4, triton_decode, triton_kvcache, triton_prefill, triton_rope_store
from otvllm.ops.query_tiles import query_tiles

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B
DTYPE = torch.bfloat16
FA4 = torch.cuda.is_available() and flash_attn4.unavailable_reason(torch.device("cuda"), DTYPE, HEAD_DIM) is None


def bench(fn, warmup=25, rep=100):
    """Median time in ms (triton.testing.do_bench: CUDA events, L2 flushed between runs)."""
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


# ---------------------------------------------------------------- (a) copy

def copy_bandwidth(gib: float = 2.0) -> dict:
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return dict(bytes=moved, ms=ms, gbps=moved / ms / 1e6)


# ---------------------------------------------------------------- (b) decode

def _paged(lens, block_size, kvh, d, gen_seed=0):
    """A paged cache holding each sequence's tokens in randomly placed blocks."""
    need = [triton.cdiv(n, block_size) for n in lens]
    num_blocks = sum(need)
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    k = torch.randn(num_blocks, block_size, kvh, d, device="cuda", dtype=DTYPE, generator=g)
    v = torch.randn(num_blocks, block_size, kvh, d, device="cuda", dtype=DTYPE, generator=g)
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    table = torch.full((len(lens), max(need)), -1, dtype=torch.int32, device="cuda")
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[at:at + n]
        at += n
    return k, v, table


def _graph_time_ms(fn, replays=20):
    """Time ``fn`` replayed from a CUDA graph (as the engine runs decode): ms per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    del graph
    return sorted(times)[len(times) // 2]


def decode_point(batch, ctx_len, block_size=256, heads=HEADS, kvh=KV_HEADS, d=HEAD_DIM,
                 num_splits=None, config=None):
    """Decode over ``layers`` distinct caches (together much larger than L2, like a model's
    layers), replayed from one CUDA graph; reports per-layer time and KV read rate."""
    lens = [ctx_len] * batch
    kv_bytes = 2 * sum(lens) * kvh * d * torch.finfo(DTYPE).bits // 8
    layers = max(1, min(28, triton.cdiv(256 << 20, kv_bytes)))
    caches = [_paged(lens, block_size, kvh, d, gen_seed=i) for i in range(layers)]
    table = caches[0][2]
    q = torch.randn(batch, heads, d, device="cuda", dtype=DTYPE)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    splits = num_splits or triton_decode.decode_num_splits(batch, kvh, ctx_len)
    ws = triton_decode.decode_workspace(batch, heads, d, splits)
    out = torch.empty_like(q)

    def fn():
        for k, v, _ in caches:
            triton_decode.decode_attention(q, k, v, table, ctx, d ** -0.5, max_context_len=ctx_len,
                                           num_splits=splits, out=out, workspace=ws, config=config)

    ms = _graph_time_ms(fn) / layers
    res = dict(batch=batch, ctx=ctx_len, block_size=block_size, heads=heads, kv_heads=kvh,
               splits=splits, layers=layers, ms=ms, kv_bytes=kv_bytes, gbps=kv_bytes / ms / 1e6,
               config=config)
    if FA4 and config is None and num_splits is None:
        def fa4():
            for k, v, _ in caches:
                out.copy_(flash_attn4.decode_attention(q, k, v, table, ctx, d ** -0.5))

        res["fa4_ms"] = _graph_time_ms(fa4) / layers
        res["fa4_gbps"] = kv_bytes / res["fa4_ms"] / 1e6
    del caches
    torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------- (c) prefill

def _causal_flops(lens, heads, d):
    return 2 * 2 * heads * d * sum(n * n for n in lens) / 2


def prefill_point(seq_len, total_tokens=16384, block_size=256, heads=HEADS, kvh=KV_HEADS,
                  d=HEAD_DIM, config=None, with_sdpa=True):
    batch = max(1, total_tokens // seq_len)
    lens = [seq_len] * batch
    k_cache, v_cache, table = _paged(lens, block_size, kvh, d, gen_seed=1)
    q = torch.randn(sum(lens), heads, d, device="cuda", dtype=DTYPE)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(torch.tensor(lens, device="cuda"), 0)
    scale = d ** -0.5
    out = torch.empty_like(q)
    # the work list, as the engine builds it on the host before the step
    per_tile = triton_prefill.tokens_per_tile(heads, kvh, d, DTYPE, q.device, config)
    tiles = torch.tensor(query_tiles([seq_len] * batch, [0] * batch, per_tile), device="cuda")

    def fn():
        triton_prefill.prefill_attention(q, k_cache, v_cache, cu, cu, table, scale,
                                         tiles=tiles, out=out, config=config)

    flops = _causal_flops(lens, heads, d)
    res = dict(seq_len=seq_len, batch=batch, block_size=block_size, heads=heads, kv_heads=kvh,
               config=config)
    res["triton_ms"] = bench(fn)
    res["triton_tflops"] = flops / res["triton_ms"] / 1e9
    if FA4 and with_sdpa:
        lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
        res["fa4_ms"] = bench(lambda: flash_attn4.prefill_attention(q, k_cache, v_cache, cu, lens_t, table, scale,
                                                                    max_seqlen_q=seq_len))
        res["fa4_tflops"] = flops / res["fa4_ms"] / 1e9
    if with_sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        group = heads // kvh
        # the same tokens in SDPA's [B, H, L, D] layout, K/V expanded to every query head
        idx = table[:, :, None] * block_size + torch.arange(block_size, device="cuda")
        idx = idx.flatten(1)[:, :seq_len].long()
        kk = k_cache.flatten(0, 1)[idx].permute(0, 2, 1, 3).repeat_interleave(group, 1).contiguous()
        vv = v_cache.flatten(0, 1)[idx].permute(0, 2, 1, 3).repeat_interleave(group, 1).contiguous()
        qq = q.view(batch, seq_len, heads, d).transpose(1, 2).contiguous()
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    ref = sdpa(qq, kk, vv, is_causal=True, scale=scale)
                    ms = bench(lambda: sdpa(qq, kk, vv, is_causal=True, scale=scale))
                res[f"{name}_ms"] = ms
                res[f"{name}_tflops"] = flops / ms / 1e9
                fn()
                err = (out.view(batch, seq_len, heads, d).transpose(1, 2).float() - ref.float()).abs().max()
                res[f"max_abs_diff_vs_{name}"] = float(err)
            except Exception as e:  # backend not available on this GPU/build
                res[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
        del kk, vv, qq
    del k_cache, v_cache
    torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------- (d) q/k norm + rotary + KV store

ROPE_STORE_TOKENS = (1, 64, 256, 16384)
ROPE_STORE_GROUPS = (1, 2, 4, 8)   # heads per program


def rope_store_point(num_tokens, block_size=256, heads=HEADS, kvh=KV_HEADS, d=HEAD_DIM, max_positions=40960):
    """The fused kernel and the unfused path over ``layers`` distinct inputs and caches (as a
    model's layers, together larger than L2), each replayed from one CUDA graph: us per layer."""
    width = (heads + 2 * kvh) * d
    itemsize = torch.finfo(DTYPE).bits // 8
    moved = num_tokens * (width + heads * d + 2 * kvh * d) * itemsize   # read qkv; write q, k, v
    layers = max(1, min(28, triton.cdiv(256 << 20, moved)))
    num_blocks = triton.cdiv(num_tokens, block_size)
    inv_freq = 1.0 / (1000000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    rotary = basic.RotaryEmbedding(inv_freq, 1.0, max_positions).cuda()
    positions = torch.randint(0, max_positions, (num_tokens,), device="cuda")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    q_weight, k_weight = (torch.rand(d, device="cuda", dtype=DTYPE) + 0.5 for _ in range(2))
    inputs = [(torch.randn(num_tokens, width, device="cuda", dtype=DTYPE),
               torch.zeros(num_blocks, block_size, kvh, d, device="cuda", dtype=DTYPE),
               torch.zeros(num_blocks, block_size, kvh, d, device="cuda", dtype=DTYPE)) for _ in range(layers)]
    compiled = basic.Kernels.compiled()

    def fused(group):
        for qkv, k_cache, v_cache in inputs:
            triton_rope_store.norm_rope_store(qkv, positions, rotary.cos, rotary.sin, q_weight, k_weight, 1e-6,
                                              k_cache, v_cache, slots, heads, kvh, group=group)

    def unfused():
        for qkv, k_cache, v_cache in inputs:
            q, k, v = qkv.split([heads * d, kvh * d, kvh * d], dim=-1)
            q, k, v = q.view(-1, heads, d), k.view(-1, kvh, d), v.view(-1, kvh, d)
            q, k = compiled.rms_norm(q, q_weight, 1e-6), compiled.rms_norm(k, k_weight, 1e-6)
            q, k = compiled.apply_rotary(q, k, rotary.cos, rotary.sin, positions)
            triton_kvcache.store_kvcache(k, v, k_cache, v_cache, slots)

    default = triton_rope_store.heads_per_program(num_tokens, heads, kvh)
    res = dict(tokens=num_tokens, heads=heads, kv_heads=kvh, layers=layers, bytes=moved,
               heads_per_program=default, fused_us_by_heads_per_program={})
    for group in ROPE_STORE_GROUPS:
        res["fused_us_by_heads_per_program"][group] = _graph_time_ms(lambda: fused(group)) / layers * 1e3
    res["fused_us"] = res["fused_us_by_heads_per_program"][default]
    res["unfused_us"] = _graph_time_ms(unfused) / layers * 1e3
    for name in ("fused", "unfused"):
        res[f"{name}_gbps"] = moved / res[f"{name}_us"] / 1e3
    del inputs
    torch.cuda.empty_cache()
    return res


def rope_store(copy_gbps):
    print(f"\n# q/k norm + rotary + KV store (CUDA graph, per layer), {HEADS} heads / {KV_HEADS} kv heads / "
          f"head {HEAD_DIM}, bf16; fused: heads per program as the engine picks them, then each of "
          f"{'/'.join(map(str, ROPE_STORE_GROUPS))}")
    print(f"{'tokens':>6} {'fused us':>9} {'unfused us':>11} {'speed-up':>9} {'fused GB/s':>11} {'of copy':>8}  "
          f"fused us by heads per program")
    rows = []
    for n in ROPE_STORE_TOKENS:
        r = rope_store_point(n)
        rows.append(r)
        by_group = " ".join(f"{g}:{us:.2f}" for g, us in r["fused_us_by_heads_per_program"].items())
        print(f"{n:>6} {r['fused_us']:>9.2f} {r['unfused_us']:>11.2f} {r['unfused_us'] / r['fused_us']:>8.2f}x "
              f"{r['fused_gbps']:>11.0f} {r['fused_gbps'] / copy_gbps:>8.1%}  {by_group} "
              f"(picks {r['heads_per_program']})")
    return rows


# ---------------------------------------------------------------- sweep

def sweep(copy_gbps):
    rows = []
    print("\n# decode sweep (batch 256, ctx 1024)")
    for bs in (256, 16):
        for bn, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2), (256, 4, 2),
                                  (256, 8, 2)):
            cfg = dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)
            try:
                r = decode_point(256, 1024, block_size=bs, config=cfg, num_splits=1)
                print(f"  block {bs} {cfg}: {r['gbps']:.0f} GB/s ({r['gbps'] / copy_gbps:.0%})")
                rows.append(dict(kind="decode", **r))
            except Exception as e:
                print(f"  block {bs} {cfg}: failed {type(e).__name__}: {str(e)[:100]}")
    for batch, ctx in ((256, 1024), (64, 2048), (16, 4096), (4, 4096), (1, 4096), (1, 1024)):
        line = []
        for splits in (1, 2, 4, 8, 16, 32, 64):
            if batch >= 64 and splits > 4:
                continue
            r = decode_point(batch, ctx, num_splits=splits)
            line.append(f"{splits}:{r['gbps']:.0f}")
            rows.append(dict(kind="decode", **r))
        heur = triton_decode.decode_num_splits(batch, KV_HEADS, ctx)
        print(f"  batch {batch} ctx {ctx} (heuristic {heur}) splits:GB/s  " + "  ".join(line))
    print("\n# prefill sweep (len 4096 x 4, block 256)")
    configs = []
    for tma in (True, False):
        for bm, bn, warps in ((128, 128, 8), (128, 64, 8), (64, 64, 4), (128, 128, 4), (128, 32, 4)):
            for stages in (2, 3, 4):
                configs.append(dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, tma=tma))
    for cfg in configs:
        try:
            r = prefill_point(4096, config=cfg, with_sdpa=False)
            print(f"  {cfg}: {r['triton_tflops']:.0f} TFLOP/s")
            rows.append(dict(kind="prefill", **r))
        except Exception as e:
            print(f"  {cfg}: failed {type(e).__name__}: {str(e)[:100]}")
    return rows


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of tile configurations")
    ap.add_argument("--sweep-only", action="store_true", help="copy bandwidth and the sweep alone")
    ap.add_argument("--only", choices=("rope_store",), help="copy bandwidth and this section alone")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA device")
    torch.manual_seed(0)
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=triton.__version__)

    cp = copy_bandwidth()
    results["copy"] = cp
    print(f"# device: {results['device']}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"copy bandwidth: {cp['gbps']:.0f} GB/s ({cp['bytes'] / 2**30:.1f} GiB read+write in {cp['ms']:.3f} ms)")

    if args.sweep_only or args.only:
        if args.sweep_only:
            results["sweep"] = sweep(cp["gbps"])
        else:
            results["rope_store"] = rope_store(cp["gbps"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        return results

    print(f"\n# decode attention (CUDA graph, per layer), {HEADS} heads / {KV_HEADS} kv heads / head {HEAD_DIM}, bf16")
    print(f"{'batch':>6} {'ctx':>6} {'block':>6} {'heads':>6} {'splits':>6} {'ms':>9} {'KV GB/s':>9} {'of copy':>8}"
          + (f" {'FA4 GB/s':>9} {'of copy':>8}" if FA4 else ""))
    decode = []
    points = [(256, 1024, 256, HEADS), (256, 1024, 16, HEADS), (256, 512, 256, HEADS),
              (128, 2048, 256, HEADS), (32, 4096, 256, HEADS), (8, 4096, 256, HEADS),
              (1, 4096, 256, HEADS), (256, 1024, 256, 32)]
    for batch, ctx, bs, heads in points:
        r = decode_point(batch, ctx, block_size=bs, heads=heads)
        r["ratio_to_copy"] = r["gbps"] / cp["gbps"]
        decode.append(r)
        fa4 = f" {r['fa4_gbps']:>9.0f} {r['fa4_gbps'] / cp['gbps']:>8.1%}" if "fa4_gbps" in r else ""
        print(f"{batch:>6} {ctx:>6} {bs:>6} {heads:>6} {r['splits']:>6} {r['ms']:>9.3f} {r['gbps']:>9.0f} "
              f"{r['ratio_to_copy']:>8.1%}{fa4}")
    results["decode"] = decode

    print(f"\n# causal prefill attention, ~16k tokens, {HEADS} heads / {KV_HEADS} kv heads / head {HEAD_DIM}, bf16")
    print(f"{'len':>6} {'batch':>6} {'block':>6} {'triton':>8} {'cudnn':>8} {'flash':>8} "
          f"{'tri/cudnn':>9} {'tri/flash':>9}" + (f" {'FA4':>8} {'FA4/cudnn':>9}" if FA4 else "") + "  (TFLOP/s)")
    prefill = []
    for seq_len, bs in ((1024, 256), (2048, 256), (4096, 256), (4096, 16), (512, 256)):
        r = prefill_point(seq_len, block_size=bs)
        prefill.append(r)
        t, c, f = (r.get(k) for k in ("triton_tflops", "cudnn_tflops", "flash_tflops"))
        fmt = lambda x: f"{x:8.0f}" if x else f"{'n/a':>8}"  # noqa: E731
        rc = f"{t / c:9.1%}" if c else f"{'n/a':>9}"
        rf = f"{t / f:9.1%}" if f else f"{'n/a':>9}"
        f4 = r.get("fa4_tflops")
        fa4 = (f" {fmt(f4)} " + (f"{f4 / c:9.1%}" if c else f"{'n/a':>9}")) if f4 else ""
        print(f"{seq_len:>6} {r['batch']:>6} {bs:>6} {fmt(t)} {fmt(c)} {fmt(f)} {rc} {rf}{fa4}  "
              f"max|diff| {r.get('max_abs_diff_vs_cudnn', r.get('max_abs_diff_vs_flash', float('nan'))):.3g}")
    results["prefill"] = prefill
    results["rope_store"] = rope_store(cp["gbps"])

    if args.sweep:
        results["sweep"] = sweep(cp["gbps"])

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
