"""Start-up's choice between cuBLAS and the Triton GEMV (core/gemv_choice.py), with the timings
given: each projection takes the GEMV at the token counts where it is 5% faster, for every
layer, and nothing above MAX_TOKENS is timed. (The timing itself needs CUDA graphs: the GPU
tests in test_gpu_engine.py run it for real.)"""

from types import SimpleNamespace

import torch.nn.functional as F

from otvllm.core import gemv_choice
from otvllm.layers.basic import Linear, MergedLinear
from tests.helpers import make_llm


def test_each_projection_takes_the_gemv_where_it_is_five_percent_faster(qwen3_dir, monkeypatch):
    layers = make_llm(qwen3_dir).engine.runner.model.model.layers
    o_proj_shape = tuple(layers[0].self_attn.o_proj.weight.shape)
    timed = []   # (weight shape, tokens, on the GEMV?) of each timing
    seen = {}

    def cublas(x, weight, bias=None):
        seen.update(shape=tuple(weight.shape), tokens=x.shape[0], gemv=False)
        return F.linear(x, weight, bias)

    def gemv(x, weight, bias=None):
        seen.update(shape=tuple(weight.shape), tokens=x.shape[0], gemv=True)
        return F.linear(x, weight, bias)

    def fake_replay_ms(fn):
        # ms: o_proj's GEMV wins by 20% at 1 and 2 tokens and by 3% at 4; every other
        # projection is faster on cuBLAS
        fn()
        timed.append((seen["shape"], seen["tokens"], seen["gemv"]))
        if seen["shape"] == o_proj_shape and seen["gemv"]:
            return {1: 0.8, 2: 0.8, 4: 0.97, 8: 0.97}[seen["tokens"]]
        return 1.2 if seen["gemv"] else 1.0

    from otvllm.ops import triton_gemv
    monkeypatch.setattr(triton_gemv, "gemv", gemv)
    monkeypatch.setattr(gemv_choice, "F", SimpleNamespace(linear=cublas))
    monkeypatch.setattr(gemv_choice, "replay_ms", fake_replay_ms)
    monkeypatch.setattr(gemv_choice, "triton_available", lambda: True)

    chosen = gemv_choice.choose_gemv(layers, [1, 2, 4, 8, 16])
    assert chosen == {"self_attn.o_proj": [1, 2]}
    for layer in layers:
        for role, module in layer.named_modules():
            if isinstance(module, (Linear, MergedLinear)):
                assert module.gemv_tokens == (frozenset({1, 2}) if role == "self_attn.o_proj" else frozenset())
    assert {tokens for _, tokens, _ in timed} == {1, 2, 4}   # 8 and 16 are past MAX_TOKENS
    projections = [m for m in layers[0].modules() if isinstance(m, (Linear, MergedLinear))]
    assert len(timed) == len(projections) * 3 * 2   # each projection, each count, both ways
