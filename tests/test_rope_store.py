"""The fused q/k norm + rotary + KV-store kernel (ops/triton_rope_store.py) against the layer
by layer reference (basic.rms_norm, basic.apply_rotary, attention_torch.store_kvcache), and
the engine's outputs with it.

Without CUDA the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before the
kernel module is imported) in float32/float16, as in test_triton_kernels.py; the `gpu` tests
check real sizes in bfloat16, the engine on CUDA and CUDA graphs.
"""

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

_NAME = "otvllm.ops.triton_rope_store"
# A module imported before the interpreter was switched on holds compiled-mode kernels: reload it.
triton_rope_store = (importlib.reload(sys.modules[_NAME]) if not HAS_CUDA and _NAME in sys.modules
                     else importlib.import_module(_NAME))

from otvllm import SamplingParams  # noqa: E402
from otvllm.layers import basic  # noqa: E402
from otvllm.ops import attention_torch  # noqa: E402
from tests.helpers import make_llm, random_prompts, record_graph_use  # noqa: E402
from tests.reference import hf_greedy  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS = 1e-6
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def make_case(num_tokens, heads, kvh, d, dtype, qk_norm, seed=0, block_size=16, row_pad=8):
    """Inputs as the model has them: qkv a column slice of a wider buffer (rows of another
    stride than their width), positions out of order, some slots -1, a zeroed cache."""
    gen = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kvh) * d
    qkv = torch.randn(num_tokens, width + row_pad, generator=gen).to(dtype)[:, :width]
    positions = torch.randperm(4 * num_tokens + 8, generator=gen)[:num_tokens]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    rotary = basic.RotaryEmbedding(inv_freq, 1.0, 4 * num_tokens + 8)
    weights = tuple((1 + 0.5 * torch.randn(d, generator=gen)).to(dtype) for _ in range(2)) if qk_norm else (None, None)
    num_blocks = num_tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1
    cache = torch.zeros(num_blocks, block_size, kvh, d, dtype=dtype)
    to = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return dict(qkv=to(qkv), positions=to(positions), cos=to(rotary.cos), sin=to(rotary.sin),
                q_norm_weight=to(weights[0]), k_norm_weight=to(weights[1]), eps=EPS,
                k_cache=to(cache), v_cache=to(cache.clone()), slot_mapping=to(slots),
                num_heads=heads, num_kv_heads=kvh)


def unfused(case, kernels=basic.EAGER, store=attention_torch.store_kvcache):
    """(q, k_cache, v_cache) from the layer by layer path, on copies of the case's caches."""
    heads, kvh = case["num_heads"], case["num_kv_heads"]
    qkv = case["qkv"]
    d = qkv.shape[1] // (heads + 2 * kvh)
    q, k, v = qkv.split([heads * d, kvh * d, kvh * d], dim=-1)
    q, k, v = q.view(-1, heads, d), k.view(-1, kvh, d), v.view(-1, kvh, d)
    if case["q_norm_weight"] is not None:
        q, k = kernels.rms_norm(q, case["q_norm_weight"], EPS), kernels.rms_norm(k, case["k_norm_weight"], EPS)
    q, k = kernels.apply_rotary(q, k, case["cos"], case["sin"], case["positions"])
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    store(k, v, k_cache, v_cache, case["slot_mapping"])
    return q, k_cache, v_cache


def fused(case, group=None):
    case = dict(case, k_cache=case["k_cache"].clone(), v_cache=case["v_cache"].clone())
    q = triton_rope_store.norm_rope_store(**case, group=group)
    return q, case["k_cache"], case["v_cache"]


def assert_rounds_alike(got, want, exact_share=0.99, ulps=2):
    """Mostly bit-identical, and every element within `ulps` ulps of the largest in its head:
    the norm's float32 sum, taken in another order, may round an element of the normed head
    the other way (1 ulp), and rotary mixes two such elements into each output; where x * cos and
    rotate_half(x) * sin nearly cancel, that is many ulps of the result but not of the head."""
    assert got.shape == want.shape and got.dtype == want.dtype
    largest = want.float().abs().amax(-1, keepdim=True)
    ulp = torch.ldexp(torch.full_like(largest, torch.finfo(want.dtype).eps), torch.frexp(largest).exponent - 1)
    far = (got.float() - want.float()).abs() > ulps * ulp
    assert not far.any(), f"{int(far.sum())} elements more than {ulps} ulp of their head apart"
    assert float((got == want).float().mean()) >= exact_share


# ---------------------------------------------------------------- the kernel, small shapes

@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_the_layer_by_layer_path(dtype, qk_norm, group):
    """One, four (decode's) and eight (a prefill's) heads a program."""
    case = make_case(11, 16, 8, 32, dtype, qk_norm)   # every 5th slot -1: no store, but a q
    (q, k_cache, v_cache), (want_q, want_k, want_v) = fused(case, group), unfused(case)
    assert torch.equal(v_cache, want_v)   # v is copied, not computed
    for got, want in ((q, want_q), (k_cache, want_k)):
        if dtype == torch.float16:   # without the norm, the same roundings: the same bits
            assert_rounds_alike(got, want, exact_share=0.99 if qk_norm else 1.0)
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_head_dim_not_a_power_of_two_and_odd_head_counts():
    case = make_case(9, 6, 3, 48, torch.float32, qk_norm=True, seed=3)
    assert triton_rope_store.heads_per_program(1 << 14, 6, 3) == 1
    for got, want in zip(fused(case), unfused(case)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_no_tokens():
    case = make_case(0, 4, 2, 32, torch.float32, qk_norm=True)
    q, k_cache, _ = fused(case)
    assert q.shape == (0, 4, 32) and not k_cache.any()


def test_rejects_a_qkv_width_that_is_not_its_heads_and_groups_that_split_them():
    case = make_case(3, 4, 2, 32, torch.float32, qk_norm=False)
    with pytest.raises(AssertionError, match="not 4 \\+ 2 x 3 heads"):
        triton_rope_store.norm_rope_store(**dict(case, num_kv_heads=3))
    with pytest.raises(AssertionError):
        triton_rope_store.norm_rope_store(**case, group=4)   # 2 kv heads


# ---------------------------------------------------------------- in the model

@pytest.mark.parametrize("variant", ["qwen3", "llama"])
def test_the_engine_with_the_fused_kernel_gives_transformers_greedy_tokens(model_dirs, variant):
    """On CPU the model runs layer by layer; given the kernel (interpreted) instead, its
    float32 greedy tokens are still transformers' (qwen3: q/k norm; llama: none, GQA 4/4)."""
    model_dir = model_dirs(variant)
    llm = make_llm(model_dir, trace_level="off")
    model = llm.engine.runner.model
    assert all(layer.self_attn.fused_norm_rope_store is None for layer in model.model.layers)
    model.fuse_norm_rope_store(triton_rope_store.norm_rope_store)
    prompts = random_prompts([1, 6, 19], seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        assert out.token_ids == hf_greedy(model_dir, prompt, params.max_tokens)


def test_the_fused_kernel_reads_each_layers_own_norm_weights(qwen3_dir):
    """transformers initialises the q/k norm weights to ones: here each layer's get their own
    random values, in two engines alike; the fused one (interpreted) gives the greedy tokens
    of the layer by layer one."""
    prompts = random_prompts([3, 12, 21], seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outputs = []
    for kernel in (None, triton_rope_store.norm_rope_store):
        llm = make_llm(qwen3_dir, trace_level="off")
        gen = torch.Generator().manual_seed(7)
        for layer in llm.engine.runner.model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(1 + torch.randn(norm.weight.shape, generator=gen))
        llm.engine.runner.model.fuse_norm_rope_store(kernel)
        outputs.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert outputs[0] == outputs[1]


# ---------------------------------------------------------------- GPU, real sizes

@gpu
@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 64, 16384])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_gpu_bf16_qwen3_sizes_against_eager_and_compiled(num_tokens, qk_norm):
    from otvllm.ops import triton_kvcache

    case = make_case(num_tokens, 16, 8, 128, torch.bfloat16, qk_norm, seed=num_tokens, block_size=256)
    q, k_cache, v_cache = fused(case)
    want_q, want_k, want_v = unfused(case, store=triton_kvcache.store_kvcache)
    assert torch.equal(v_cache, want_v)
    exact_share = 0.99 if qk_norm else 1.0
    assert_rounds_alike(q, want_q, exact_share)
    assert_rounds_alike(k_cache, want_k, exact_share)
    # torch.compile does not round between the operations it fuses: on CPU it differs from
    # eager in half the elements, by up to 4 ulps of their head; so it does from the kernel
    want_q, want_k, _ = unfused(case, basic.Kernels.compiled(), store=triton_kvcache.store_kvcache)
    assert_rounds_alike(q, want_q, exact_share=0.0, ulps=8)
    assert_rounds_alike(k_cache, want_k, exact_share=0.0, ulps=8)


@gpu
@needs_cuda
def test_gpu_engine_fused_and_unfused_agree_and_graphs_replay_the_fused_kernel(qwen3_dir):
    prompts = random_prompts([1, 7, 16, 33, 50, 130], seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    fused_llm = make_llm(qwen3_dir, device="cuda", dtype="float32", attention_backend="triton")
    assert fused_llm.engine.runner.model.model.layers[0].self_attn.fused_norm_rope_store is not None
    assert fused_llm.engine.runner.graphs is not None
    replayed = record_graph_use(fused_llm)
    unfused_llm = make_llm(qwen3_dir, device="cuda", dtype="float32", attention_backend="triton",
                           enforce_eager=True)
    unfused_llm.engine.runner.model.fuse_norm_rope_store(None)
    a = fused_llm.generate(prompts, params, use_tqdm=False)
    b = unfused_llm.generate(prompts, params, use_tqdm=False)
    assert any(replayed)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for prompt, out in zip(prompts, a):
        assert out.token_ids == hf_greedy(qwen3_dir, prompt, params.max_tokens)
