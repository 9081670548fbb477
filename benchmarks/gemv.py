"""The few-token matrix products of a decode step on CUDA: cuBLAS (x @ W.T, and W @ x.T), cuBLASLt and
a Triton GEMV.

For each weight of Qwen3-0.6B (qkv, o, gate_up, down, lm_head) and 1-8 tokens, the time per
product replayed from a CUDA graph (as decode runs), with the weights rotated through enough
copies that they come from HBM, not L2 (a decode step reads ~0.9 GB of weights), and the
weight-read rate against the device's copy rate. For the products that follow a norm (q/k/v,
gate/up), the residual add + RMSNorm before them too, as a decode step runs it: the
torch.compile'd norm then cuBLAS or the GEMV, against the GEMV that does the norm as it reads
(``norm+cublas``, ``norm+triton``, ``triton_norm``), and the down product with the SiLU-and-mul
inside (``triton_silu``). ``--sweep`` also times a grid of the Triton kernel's configurations
(BLOCK_N, BLOCK_K, num_warps, num_stages) at 1 and 8 tokens, each product called as the step calls
it, and reports the best per shape. ``--chain`` also times the four products of all 28 layers one
after the other, each reading the one before's output, as a decode step runs them (on the H200
the Triton kernels launch with PDL, each fetching its weights while the one before ends): cuBLAS
with the norms and the SiLU-and-mul as kernels of their own, against the GEMV with them inside. A
product can win alone and lose in the chain, or the other way round.

    python benchmarks/gemv.py [--tokens 1,2,4,8] [--sweep] [--chain] [--json OUT]
"""

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from otvllm.core.gemv_choice import replay_ms  # noqa: E402
from otvllm.layers.basic import Kernels  # noqa: E402
from otvllm.ops import triton_gemv  # noqa: E402

# Qwen3-0.6B: hidden 1024, 16 heads / 8 KV heads of 128, intermediate 3072, vocab 151936
SHAPES = {"qkv_proj": (4096, 1024), "o_proj": (1024, 2048), "gate_up_proj": (6144, 1024),
          "down_proj": (1024, 3072), "lm_head": (151936, 1024)}
NORMED = ("qkv_proj", "gate_up_proj")   # their input is rms_norm(x + residual)
ROTATE_BYTES = 512 << 20
CHAIN_LAYERS = 28   # Qwen3-0.6B's
EPS = 1e-6


def graph_time_us(fn, calls: int) -> float:
    """µs per call of fn(i) for i in range(calls), captured once in a CUDA graph and replayed."""
    return replay_ms(lambda: [fn(i) for i in range(calls)], replays=20) * 1e3 / calls


def copy_rate_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = graph_time_us(lambda i: dst.copy_(src), 1)
    return 2 * src.numel() / us / 1e3


def chain_us(m: int, layers: list, kernels, triton: bool) -> float:
    """us per layer of a decode step's products at m tokens over `layers`, replayed from a CUDA graph."""
    x = torch.randn(m, layers[0]["qkv_proj"].shape[1], device="cuda", dtype=layers[0]["qkv_proj"].dtype)
    residual = torch.zeros_like(x)
    heads = layers[0]["o_proj"].shape[1]

    def step(_):
        h, r = x, residual
        for w in layers:
            if triton:
                qkv, r = triton_gemv.gemv_rms_norm(h, r, w["input_norm"], EPS, w["qkv_proj"])
                h = triton_gemv.gemv(qkv[:, :heads], w["o_proj"])   # stands for attention, reading q
                gate_up, r = triton_gemv.gemv_rms_norm(h, r, w["post_norm"], EPS, w["gate_up_proj"])
                h = triton_gemv.gemv(gate_up, w["down_proj"], silu_and_mul=True)
            else:
                normed, r = kernels.add_rms_norm(h, r, w["input_norm"], EPS)
                qkv = torch.nn.functional.linear(normed, w["qkv_proj"])
                h = torch.nn.functional.linear(qkv[:, :heads], w["o_proj"])
                normed, r = kernels.add_rms_norm(h, r, w["post_norm"], EPS)
                gate_up = torch.nn.functional.linear(normed, w["gate_up_proj"])
                h = torch.nn.functional.linear(kernels.silu_and_mul(gate_up), w["down_proj"])
        return h

    return graph_time_us(step, 1) / len(layers)


def step_call(name: str, m: int, k: int, dtype):
    """The GEMV as a decode step calls it for this projection, taking (weight, config): with the
    residual add + RMSNorm inside for q/k/v and gate/up, the SiLU-and-mul inside for down."""
    if name in NORMED:
        x, residual = torch.randn(2, m, k, device="cuda", dtype=dtype)
        norm_weight = torch.rand(k, device="cuda", dtype=dtype) + 0.5
        return lambda w, cfg: triton_gemv.gemv_rms_norm(x, residual, norm_weight, EPS, w, config=cfg)
    if name == "down_proj":
        gate_up = torch.randn(m, 2 * k, device="cuda", dtype=dtype)
        return lambda w, cfg: triton_gemv.gemv(gate_up, w, silu_and_mul=True, config=cfg)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    return lambda w, cfg: triton_gemv.gemv(x, w, config=cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,2,4,8")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="also time a grid of Triton tile configurations")
    parser.add_argument("--chain", action="store_true", help="also time 28 layers' products as a decode step runs them")
    parser.add_argument("--json")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    dtype = torch.bfloat16
    copy = copy_rate_gbps()
    print(f"copy rate {copy:.0f} GB/s", flush=True)
    kernels = Kernels.compiled()
    add_rms_norm = kernels.add_rms_norm
    results = {"copy_gbps": copy, "points": []}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        weight_bytes = n * k * 2
        copies = max(1, -(-ROTATE_BYTES // weight_bytes))
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5 for _ in range(copies)]
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            reference = (x.float() @ weights[0].float().T)
            point = {"shape": name, "n": n, "k": k, "tokens": m}

            def timed(label, op, expected=reference):
                err = ((op(x, weights[0]).float() - expected).abs().max() / expected.abs().max()).item()
                us = graph_time_us(lambda i: op(x, weights[i % copies]), copies)
                point[label] = {"us": us, "gbps": weight_bytes / us / 1e3, "rel_err": err}

            torch.backends.cuda.preferred_blas_library("cublas")
            timed("cublas", torch.nn.functional.linear)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            timed("cublaslt", torch.nn.functional.linear)
            torch.backends.cuda.preferred_blas_library("cublas")
            # the same product asked the other way round (W @ x.T): cuBLAS picks among other kernels
            timed("cublas_wx", lambda x, w: (w @ x.T).T)
            if m <= triton_gemv.MAX_TOKENS:
                timed("triton", triton_gemv.gemv)
                if name in NORMED:
                    residual = torch.randn(m, k, device="cuda", dtype=dtype)
                    norm_weight = torch.rand(k, device="cuda", dtype=dtype) + 0.5

                    def normed(product):
                        return lambda x, w: product(add_rms_norm(x, residual, norm_weight, EPS)[0], w)

                    h = x.float() + residual.float()
                    expected = (norm_weight.float() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
                                @ weights[0].float().T)
                    timed("norm+cublas", normed(torch.nn.functional.linear), expected)
                    timed("norm+triton", normed(triton_gemv.gemv), expected)
                    timed("triton_norm", lambda x, w: triton_gemv.gemv_rms_norm(x, residual, norm_weight, EPS, w)[0],
                          expected)
                if name == "down_proj":   # as the step calls it: x is [gate, up], the SiLU-and-mul inside
                    gate_up = torch.randn(m, 2 * k, device="cuda", dtype=dtype)
                    gate, up = gate_up.float().chunk(2, dim=-1)
                    expected = (torch.nn.functional.silu(gate) * up).to(dtype).float() @ weights[0].float().T
                    timed("triton_silu", lambda x, w: triton_gemv.gemv(gate_up, w, silu_and_mul=True), expected)
                if args.sweep and m in (1, triton_gemv.MAX_TOKENS):
                    step_op = step_call(name, m, k, dtype)
                    best = None
                    for cfg in itertools.product((4, 8), (256, 512, 1024), (4, 8), (1, 3)):
                        us = graph_time_us(lambda i: step_op(weights[i % copies], cfg), copies)
                        if best is None or us < best[0]:
                            best = (us, cfg)
                    point["triton_best"] = {"us": best[0], "gbps": weight_bytes / best[0] / 1e3,
                                            "config": list(best[1])}
            line = f"{name:13s} N={n:6d} K={k:5d} M={m}: " + "  ".join(
                f"{label} {v['us']:7.1f} us {v['gbps']:5.0f} GB/s" for label, v in point.items()
                if isinstance(v, dict))
            if "triton_best" in point:
                line += " (BLOCK_N, BLOCK_K, warps, stages) " + str(point['triton_best']['config'])
            print(line, flush=True)
            results["points"].append(point)
        weights = x = None
        torch.cuda.empty_cache()
    if args.chain:
        layers = [{name: torch.randn(*SHAPES[name], device="cuda", dtype=dtype) / SHAPES[name][1] ** 0.5
                   for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")} |
                  {norm: torch.rand(SHAPES["qkv_proj"][1], device="cuda", dtype=dtype) + 0.5
                   for norm in ("input_norm", "post_norm")} for _ in range(CHAIN_LAYERS)]
        results["chain"] = []
        for m in [m for m in tokens if m <= triton_gemv.MAX_TOKENS]:
            cublas, triton = chain_us(m, layers, kernels, False), chain_us(m, layers, kernels, True)
            results["chain"].append({"tokens": m, "cublas_us_per_layer": cublas, "triton_us_per_layer": triton})
            print(f"chain of {CHAIN_LAYERS} layers, M={m}: cuBLAS + norm/SiLU kernels {cublas:6.1f} us a layer, "
                  f"GEMV with them inside {triton:6.1f} us a layer", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
