"""Where the decoder's weight products run the Triton GEMV instead of cuBLAS, at the few-token
batch sizes of decode: measured at start-up, on this device, for this model.

For a product of 1-4 tokens cuBLAS sometimes picks a kernel far below the copy rate
(Qwen3-0.6B's o_proj on the H200: 12.6 us, against the GEMV's 3.4 us) and is sometimes the
best there is; which one depends on the device and the shape. So each projection of the layers
(q/k/v, o, gate/up, down) is timed both ways as a decode step calls it: q/k/v and gate/up with
the residual add + RMSNorm before them, which the GEMV does as it reads its input, and down with
the SiLU-and-mul inside it (DecoderLayer.projection_calls). Each timing runs every layer's
product in turn, as a step reads their weights (together they do not fit in L2), replayed from a
CUDA graph."""

import torch
from torch import nn

from otvllm.layers.basic import Linear, MergedLinear
from otvllm.ops.backend import triton_available

# Products of up to this many tokens are timed. At 8, o_proj and down_proj alone were faster on the
# GEMV (H200: 5.2 against 5.8 us, 6.1 against 7.4), yet a batch-8 decode step on them was slower:
# time per output token 1.63 against 1.54 ms (benchmarks/latency.py, old and new code alternating);
# with PDL (and an attention change since dropped) 1.66 against 1.55.
MAX_TOKENS = 4
MARGIN = 0.95      # the GEMV must be 5% faster: a tie is not worth a second code path


def choose_gemv(layers: nn.ModuleList, token_counts: list[int]) -> dict[str, list[int]]:
    """Sets each projection's `gemv_tokens` to the counts (of `token_counts`, up to MAX_TOKENS)
    where the GEMV won; returns {projection (e.g. 'self_attn.o_proj'): those counts} for the
    projections that use it."""
    if not triton_available():
        return {}
    counts = [n for n in token_counts if n <= MAX_TOKENS]
    wins = {}
    first = layers[0].self_attn.qkv_proj.weight
    for n in counts:
        x = torch.randn(n, first.shape[1], dtype=first.dtype, device=first.device)
        calls = [layer.projection_calls(x) for layer in layers]
        for role in calls[0]:
            modules = [layer.get_submodule(role) for layer in layers]
            if not isinstance(modules[0], (Linear, MergedLinear)):   # a tensor-parallel row product
                continue
            timed = {}
            for tokens in (frozenset(), frozenset({n})):
                for m in modules:
                    m.gemv_tokens = tokens
                timed[bool(tokens)] = replay_ms(lambda: [c[role]() for c in calls])
            if timed[True] < MARGIN * timed[False]:
                wins.setdefault(role, []).append(n)
    for role, module in layers[0].named_modules():
        if isinstance(module, (Linear, MergedLinear)):
            for layer in layers:
                layer.get_submodule(role).gemv_tokens = frozenset(wins.get(role, ()))
    return wins


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
