"""Start-up's choice between cuBLAS and the Triton GEMV (core/gemv_choice.py), with the timings
given: each projection is timed both ways as a decode step calls it (q/k/v and gate/up with the
norm before them, which the GEMV does as it reads; down with the SiLU-and-mul inside it), and
takes the GEMV at the token counts where it is 5% faster, for every layer; nothing above
MAX_TOKENS is timed. (The timing itself needs CUDA graphs: the GPU tests in test_gpu_engine.py
run it for real.)"""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from otvllm.core import gemv_choice
from otvllm.layers import basic
from otvllm.layers.basic import Linear, MergedLinear
from tests.helpers import make_llm


def test_each_projection_takes_the_gemv_where_it_is_five_percent_faster(qwen3_dir, monkeypatch):
    layers = make_llm(qwen3_dir).engine.runner.model.model.layers
    o_proj_shape = tuple(layers[0].self_attn.o_proj.weight.shape)
    products = []   # (kernel, weight shape, tokens) of each product since the last timing
    timed = []      # what each timing ran: (kernel, weight shape, tokens, products)

    def cublas(x, weight, bias=None):
        products.append(("cublas", tuple(weight.shape), x.shape[0]))
        return F.linear(x, weight, bias)

    def gemv(x, weight, bias=None, *, silu_and_mul=False, config=None):
        products.append(("gemv+silu" if silu_and_mul else "gemv", tuple(weight.shape), x.shape[0]))
        return torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype)

    def gemv_rms_norm(x, residual, norm_weight, eps, weight, bias=None, config=None):
        products.append(("gemv+norm", tuple(weight.shape), x.shape[0]))
        return torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype), x

    def fake_replay_ms(fn):
        # ms: o_proj's GEMV wins by 20% at 1 and 2 tokens and by 3% at 4; every other
        # projection is faster on cuBLAS
        products.clear()
        fn()
        assert len(set(products)) == 1, products   # one kind of product, one weight shape, one count
        kernel, shape, tokens = products[0]
        timed.append((kernel, shape, tokens, len(products)))
        if shape == o_proj_shape and kernel == "gemv":
            return {1: 0.8, 2: 0.8, 4: 0.97}[tokens]
        return 1.2 if kernel != "cublas" else 1.0

    from otvllm.ops import triton_gemv
    monkeypatch.setattr(triton_gemv, "gemv", gemv)
    monkeypatch.setattr(triton_gemv, "gemv_rms_norm", gemv_rms_norm)
    monkeypatch.setattr(basic, "F", SimpleNamespace(linear=cublas, silu=F.silu))
    monkeypatch.setattr(gemv_choice, "replay_ms", fake_replay_ms)
    monkeypatch.setattr(gemv_choice, "triton_available", lambda: True)

    chosen = gemv_choice.choose_gemv(layers, [1, 2, 4, 8, 16])
    assert chosen == {"self_attn.o_proj": [1, 2]}
    for layer in layers:
        for role, module in layer.named_modules():
            if isinstance(module, (Linear, MergedLinear)):
                assert module.gemv_tokens == (frozenset({1, 2}) if role == "self_attn.o_proj" else frozenset())
    # each projection at 1, 2 and 4 tokens (8 and 16 are past MAX_TOKENS), both ways, over every layer,
    # its GEMV as the step runs it: q/k/v and gate/up with the norm, down with the activation
    first = layers[0]
    gemv_kernels = {tuple(first.self_attn.qkv_proj.weight.shape): "gemv+norm", o_proj_shape: "gemv",
                    tuple(first.mlp.gate_up_proj.weight.shape): "gemv+norm",
                    tuple(first.mlp.down_proj.weight.shape): "gemv+silu"}
    want = {(kernel, shape, tokens, len(layers)) for shape, gemv_kernel in gemv_kernels.items()
            for kernel in ("cublas", gemv_kernel) for tokens in (1, 2, 4)}
    assert sorted(timed) == sorted(want)
