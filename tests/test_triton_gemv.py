"""The Triton few-token GEMV against torch's matrix product.

Without CUDA the kernel runs under the Triton interpreter in float32/float16 on small shapes;
with CUDA the `gpu` tests check Qwen3-0.6B's weight shapes in bf16 (cuBLAS as the reference)."""

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

# Re-imported if something imported it before the interpreter was switched on (its @triton.jit
# function is built at import time).
if not HAS_CUDA and "otvllm.ops.triton_gemv" in sys.modules:
    triton_gemv = importlib.reload(sys.modules["otvllm.ops.triton_gemv"])
else:
    from otvllm.ops import triton_gemv

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("config", [None, (4, 32, 4, 1), (8, 16, 2, 3), (4, 16, 4, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_torch(dtype, m, config, bias):
    g = torch.Generator().manual_seed(m)
    n, k = 20, 72   # N not a multiple of the row block, K not one of the strip: both are masked
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    out = triton_gemv.gemv(x, w, b, config=config)
    expected = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol * k ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_gemv_of_silu_and_mul_matches_torch(dtype, m):
    g = torch.Generator().manual_seed(10 + m)
    n, k = 12, 72
    gate_up = torch.randn(m, 2 * k, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    out = triton_gemv.gemv(gate_up, w, silu_and_mul=True, config=(4, 32, 4, 2))
    gate, up = gate_up.float().chunk(2, dim=-1)
    activated = (torch.nn.functional.silu(gate) * up).to(dtype).float()
    expected = activated @ w.float().T
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol * k ** 0.5)


def test_down_projection_on_the_gemv_takes_the_activation_into_its_kernel(monkeypatch):
    from otvllm.layers.basic import EAGER, Linear, SiluAndMul
    calls = []
    real = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    down = Linear(48, 16, bias=False).to(DEVICE)
    down.gemv_tokens = frozenset({2})
    act = SiluAndMul()
    with torch.no_grad():
        for tokens, fused in ((2, True), (3, False)):
            gate_up = torch.randn(tokens, 96, device=DEVICE)
            calls.clear()
            out = down.forward_silu_and_mul(gate_up, act)
            torch.testing.assert_close(out, EAGER.silu_and_mul(gate_up) @ down.weight.T, rtol=1e-5, atol=1e-4)
            assert [kw.get("silu_and_mul") for kw in calls] == ([True] if fused else [])


def _rms_norm_reference(x, residual, norm_weight, eps):
    """transformers' way, in float32: the residual add, then the norm."""
    h = x.float() + residual.float() if residual is not None else x.float()
    h = h.to(x.dtype).float()   # the residual stream, as stored
    return norm_weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)), h


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("config", [None, (4, 32, 4, 2), (8, 16, 2, 1)])
def test_gemv_of_rms_norm_matches_torch(dtype, m, with_residual, config):
    g = torch.Generator().manual_seed(20 + m)
    n, k = 20, 72   # masked N and K, as above; K over several strips with the configurations given
    x = (3 * torch.randn(m, k, generator=g)).to(dtype).to(DEVICE)
    residual = torch.randn(m, k, generator=g).to(dtype).to(DEVICE) if with_residual else None
    norm_weight = (1 + 0.3 * torch.randn(k, generator=g)).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    out, stream = triton_gemv.gemv_rms_norm(x, residual, norm_weight, 1e-6, w, b, config=config)
    normed, h = _rms_norm_reference(x, residual, norm_weight, 1e-6)
    expected = torch.nn.functional.linear(normed, w.float(), b.float())
    assert out.dtype == dtype and out.shape == (m, n) and stream.shape == (m, k)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol * k ** 0.5)
    assert torch.equal(stream.float(), h)   # the residual stream exactly as the add rounds it
    if not with_residual:
        assert stream is x


def test_qkv_and_gate_up_on_the_gemv_take_the_norm_into_their_kernel(monkeypatch):
    """MergedLinear.forward_rms_norm: on the GEMV's token counts one fused kernel, elsewhere the
    norm module then the product; both give the layers' own result."""
    from otvllm.layers.basic import RMSNorm, MergedLinear
    calls = []
    real = triton_gemv.gemv_rms_norm
    monkeypatch.setattr(triton_gemv, "gemv_rms_norm", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    proj = MergedLinear(48, {"gate_proj": 16, "up_proj": 16}, bias=False).to(DEVICE)
    norm = RMSNorm(48, 1e-6).to(DEVICE)
    with torch.no_grad():
        proj.weight.normal_()
        norm.weight.uniform_(0.5, 1.5)
    proj.gemv_tokens = frozenset({2})
    with torch.no_grad():
        for tokens, fused in ((2, True), (3, False)):
            x, residual = torch.randn(tokens, 48, device=DEVICE), torch.randn(tokens, 48, device=DEVICE)
            for r in (residual, None):
                calls.clear()
                out, stream = proj.forward_rms_norm(x, r, norm)
                normed, expected_stream = (norm(x), x) if r is None else norm(x, r)
                torch.testing.assert_close(out, normed @ proj.weight.T, rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(stream, expected_stream)
                assert len(calls) == fused


@pytest.mark.skipif(HAS_CUDA, reason="runs the kernels under the interpreter, on the CPU")
@pytest.mark.parametrize("tokens,prompt_lens", [({1, 2}, [5, 9]), ({6}, [5, 9, 4, 7, 6, 8])])
def test_every_projection_on_the_gemv_keeps_float32_greedy_equal_to_transformers(qwen3_dir, monkeypatch,
                                                                                   tokens, prompt_lens):
    """The whole decoder with the GEMV on every projection at 1-2 tokens, or at 6 (six sequences
    decoding together): the norms fused into q/k/v and gate/up, SiLU into down (as start-up sets
    it where the GEMV wins on CUDA)."""
    from otvllm import SamplingParams
    from otvllm.layers.basic import Linear, MergedLinear
    from tests.helpers import make_llm, random_prompts
    from tests.reference import hf_greedy

    llm = make_llm(qwen3_dir)
    for module in llm.engine.runner.model.modules():
        if isinstance(module, (Linear, MergedLinear)):
            module.gemv_tokens = frozenset(tokens)
    calls = []   # (rows of x, keyword arguments) of each launch
    real = triton_gemv._launch
    monkeypatch.setattr(triton_gemv, "_launch", lambda *a, **kw: calls.append((a[0].shape[0], kw)) or real(*a, **kw))
    prompts = random_prompts(prompt_lens, seed=4)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert any("norm" in kw for _, kw in calls) and any(kw.get("silu_and_mul") for _, kw in calls)
    launched = {rows for rows, _ in calls}
    assert launched <= tokens and max(tokens) in launched   # the batch decoding together
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(qwen3_dir, prompt, 4)


def test_gemv_reads_rows_of_a_strided_input():
    x = torch.randn(4, 96).to(DEVICE)[:, :64]      # a column slice: row stride 96
    w = torch.randn(16, 64).to(DEVICE)
    torch.testing.assert_close(triton_gemv.gemv(x, w), x @ w.T, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)])
@pytest.mark.parametrize("m", [1, 2, 8])
def test_gpu_gemv_at_qwen3_shapes_in_bfloat16(n, k, m):
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = triton_gemv.gemv(x, w, b)
    expected = torch.nn.functional.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("n", [4096, 6144])   # Qwen3-0.6B's q/k/v and gate/up, which follow a norm
@pytest.mark.parametrize("m", [1, 2, 8])
def test_gpu_gemv_of_rms_norm_at_qwen3_shapes_in_bfloat16(n, m):
    torch.manual_seed(0)
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.rand(1024, device="cuda", dtype=torch.bfloat16) + 0.5
    w = torch.randn(n, 1024, device="cuda", dtype=torch.bfloat16) / 1024 ** 0.5
    out, stream = triton_gemv.gemv_rms_norm(x, residual, norm_weight, 1e-6, w)
    normed, h = _rms_norm_reference(x, residual, norm_weight, 1e-6)
    torch.testing.assert_close(out.float(), normed @ w.float().T, rtol=2e-2, atol=2e-2)
    assert torch.equal(stream.float(), h)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_gpu_gemv_of_silu_and_mul_at_qwen3_down_proj_in_bfloat16(m):
    torch.manual_seed(0)
    gate_up = torch.randn(m, 2 * 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 3072, device="cuda", dtype=torch.bfloat16) / 3072 ** 0.5
    out = triton_gemv.gemv(gate_up, w, silu_and_mul=True)
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w.float())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs compute capability 9.0")
def test_gpu_gemv_chain_launched_with_pdl_in_a_cuda_graph_equals_plain_launches(monkeypatch):
    """28 layers of a batch-1 decode step's GEMVs at Qwen3-0.6B's shapes, each reading what the one
    before wrote, launched with PDL (ops/pdl.py), captured in a CUDA graph and replayed with new
    inputs: a kernel that read its input before its wait would see the previous replay's values.
    The reference is the same kernels launched plainly."""
    from otvllm.ops import pdl
    assert pdl.enabled(torch.device("cuda"))
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    layers = [(torch.randn(4096, 1024, **bf16) / 32, torch.randn(1024, 2048, **bf16) / 45,
               torch.randn(6144, 1024, **bf16) / 32, torch.randn(1024, 3072, **bf16) / 55,
               torch.rand(1024, **bf16) + 0.5, torch.rand(1024, **bf16) + 0.5) for _ in range(28)]
    x = torch.randn(1, 1024, **bf16)

    def step():
        h, residual = x, None
        for qkv_w, o_w, gate_up_w, down_w, input_norm, post_norm in layers:
            qkv, residual = triton_gemv.gemv_rms_norm(h, residual, input_norm, 1e-6, qkv_w)
            h = triton_gemv.gemv(qkv[:, :2048], o_w)   # stands for attention, reading q
            gate_up, residual = triton_gemv.gemv_rms_norm(h, residual, post_norm, 1e-6, gate_up_w)
            h = triton_gemv.gemv(gate_up, down_w, silu_and_mul=True)
        return h + residual

    step()   # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    inputs = [torch.randn(1, 1024, **bf16) for _ in range(4)]
    replayed = []
    for i in inputs:
        x.copy_(i)
        graph.replay()
        replayed.append(out.clone())
    assert not torch.equal(replayed[0], replayed[1])
    monkeypatch.setattr(pdl, "enabled", lambda device: False)
    for i, got in zip(inputs, replayed):
        x.copy_(i)
        assert torch.equal(step(), got)
