"""Where the decoder's weight products run the Triton GEMV instead of cuBLAS, at the few-token
batch sizes of decode: measured at start-up, on this device, for this model.

For a product of 1-4 tokens cuBLAS sometimes picks a kernel far below the copy rate
(Qwen3-0.6B's o_proj on the H200: 12.6 us, against the GEMV's 3.4 us) and is sometimes the
best there is; which one depends on the device and the shape. So both are timed for each
projection of the layers (q/k/v, o, gate/up, down), each over every layer's weight in turn as a
decode step reads them (together they do not fit in L2), replayed from a CUDA graph.

The plain products are timed. Where the GEMV wins for q/k/v or gate/up it also does the norm
before them, and for down the SiLU-and-mul, each a kernel the cuBLAS path runs apart: the
timing leaves those out, which only favours cuBLAS (benchmarks/gemv.py times them together)."""

import torch
import torch.nn.functional as F
from torch import nn

from otvllm.layers.basic import Linear, MergedLinear
from otvllm.ops.backend import triton_available

# Products of up to this many tokens are timed. At 8, o_proj and down_proj alone were faster on the
# GEMV (H200: 5.2 against 5.8 us, 6.1 against 7.4), yet a batch-8 decode step on them was slower:
# time per output token 1.63 against 1.54 ms (benchmarks/latency.py, old and new code alternating).
MAX_TOKENS = 4
MARGIN = 0.95      # the GEMV must be 5% faster (gate_up_proj on the H200: ~7%): a tie is not worth a second code path


def choose_gemv(layers: nn.ModuleList, token_counts: list[int]) -> dict[str, list[int]]:
    """Sets each projection's `gemv_tokens` to the counts (of `token_counts`, up to MAX_TOKENS)
    where the GEMV won; returns {projection (e.g. 'self_attn.o_proj'): those counts} for the
    projections that use it."""
    if not triton_available():
        return {}
    from otvllm.ops import triton_gemv
    counts = [n for n in token_counts if n <= MAX_TOKENS]
    chosen = {}
    for role, first in layers[0].named_modules():
        if not isinstance(first, (Linear, MergedLinear)):
            continue
        modules = [layer.get_submodule(role) for layer in layers]
        wins = []
        for n in counts:
            x = torch.randn(n, first.weight.shape[1], dtype=first.weight.dtype, device=first.weight.device)
            cublas = replay_ms(lambda: [F.linear(x, m.weight, m.bias) for m in modules])
            gemv = replay_ms(lambda: [triton_gemv.gemv(x, m.weight, m.bias) for m in modules])
            if gemv < MARGIN * cublas:
                wins.append(n)
        for m in modules:
            m.gemv_tokens = frozenset(wins)
        if wins:
            chosen[role] = wins
    return chosen


@torch.inference_mode()
def replay_ms(fn, replays: int = 10) -> float:
    """ms per replay of `fn` captured in a CUDA graph (run once before, outside the capture, to compile);
    benchmarks/gemv.py times with it too."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays
