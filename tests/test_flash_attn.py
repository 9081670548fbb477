"""The FlashAttention-4 backend on the GPU machine (pytest -m gpu; skipped where `flash_attn.cute`
cannot run): its prefill and decode against the torch reference at real sizes and at the engine's
block sizes, decode replayed from a CUDA graph, and the engine's outputs with it."""

import pytest
import torch

from otvllm import SamplingParams
from otvllm.ops import attention_torch as ref
from otvllm.ops import flash_attn4
from otvllm.tracing import schema as S
from tests.helpers import make_llm, random_prompts, record_graph_use, recorded_spans
from tests.paged_cases import REAL_SHAPES, block_tables, cu, paged_inputs, rand_lens, tol
from tests.reference import hf_greedy


def _why_skip() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    return flash_attn4.unavailable_reason(torch.device("cuda"), torch.bfloat16, 128)


WHY_SKIP = _why_skip()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(WHY_SKIP is not None, reason=f"FlashAttention-4: {WHY_SKIP}")]

BF16 = torch.bfloat16


def _prefill_case(q_lens, ctx_lens, heads, kvh, d, block_size, seed):
    q, k_cache, v_cache, bt = paged_inputs(sum(q_lens), ctx_lens, heads, kvh, d, block_size, BF16, seed)
    scale = d ** -0.5
    want = ref.prefill_attention(q, k_cache, v_cache, cu(q_lens), cu(ctx_lens), bt, scale)
    got = flash_attn4.prefill_attention(q, k_cache, v_cache, cu(q_lens),
                                        torch.tensor(ctx_lens, dtype=torch.int32, device="cuda"), bt, scale,
                                        max_seqlen_q=max(q_lens))
    torch.testing.assert_close(got, want, **tol(BF16))


@pytest.mark.parametrize("heads,kvh,d", REAL_SHAPES)
@pytest.mark.parametrize("block_size", [16, 128, 256])
def test_prefill_matches_reference(heads, kvh, d, block_size):
    # Some contexts are longer than their new tokens: prefix-cached blocks attended in full.
    _prefill_case([1, 7, 100, 1024, 2048, 513], [1, 300, 100, 1024 + 256, 2048, 4096], heads, kvh, d,
                  block_size, seed=5)
    lens = rand_lens(64, 1, 300, torch.Generator().manual_seed(6))
    _prefill_case(lens, lens, heads, kvh, d, block_size, seed=6)


def _decode_inputs(ctx_lens, heads, kvh, d, block_size, seed):
    q, k_cache, v_cache, bt = paged_inputs(len(ctx_lens), ctx_lens, heads, kvh, d, block_size, BF16, seed)
    return q, k_cache, v_cache, bt, torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("heads,kvh,d", REAL_SHAPES)
@pytest.mark.parametrize("block_size", [16, 128, 256])
@pytest.mark.parametrize("batch,max_ctx", [(256, 1024), (4, 4096), (64, 4096)])
def test_decode_matches_reference(heads, kvh, d, block_size, batch, max_ctx):
    lens = rand_lens(batch, 1, max_ctx, torch.Generator().manual_seed(7))
    lens[0] = max_ctx
    q, k_cache, v_cache, bt, ctx = _decode_inputs(lens, heads, kvh, d, block_size, seed=7)
    scale = d ** -0.5
    got = flash_attn4.decode_attention(q, k_cache, v_cache, bt, ctx, scale)
    torch.testing.assert_close(got, ref.decode_attention(q, k_cache, v_cache, bt, ctx, scale), **tol(BF16))


@pytest.mark.parametrize("block_size", [128, 256])
def test_decode_in_a_cuda_graph(block_size):
    """Captured once at full width, replayed with fewer live rows (the rest at context 0, as the
    engine pads a graph's batch) and new lengths and tables."""
    heads, kvh, d, batch, max_ctx = 16, 8, 128, 32, 4096
    width = max_ctx // block_size
    q, k_cache, v_cache, _, ctx = _decode_inputs([max_ctx] * batch, heads, kvh, d, block_size, seed=8)
    bt = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    out = torch.empty_like(q)

    def fill(seed, n_real):
        g = torch.Generator().manual_seed(seed)
        lens = rand_lens(n_real, 1, max_ctx, g) + [0] * (batch - n_real)
        q.copy_(torch.randn(batch, heads, d, generator=g).to(BF16))
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        table = block_tables([max(1, c) for c in lens], block_size, k_cache.shape[0], g, extra_cols=0)
        bt.zero_()
        bt[:, :table.shape[1]].copy_(table.clamp(min=0))

    def run():
        out.copy_(flash_attn4.decode_attention(q, k_cache, v_cache, bt, ctx, scale))

    fill(0, batch)
    run()   # compiles the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed, n_real in ((1, batch), (2, 5), (3, 17)):
        fill(seed, n_real)
        graph.replay()
        torch.cuda.synchronize()
        want = ref.decode_attention(q[:n_real], k_cache, v_cache, bt[:n_real], ctx[:n_real], scale)
        torch.testing.assert_close(out[:n_real], want, **tol(BF16))


# ---------------------------------------------------------------- the engine on FA4

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = random_prompts([1, 7, 16, 33, 50, 130, 300], seed=21)
FA4 = dict(device="cuda", dtype="bfloat16", max_model_len=1024, max_num_batched_tokens=2048)


def test_auto_chooses_flash_attn_and_shows_it_on_init(qwen3_dir):
    with recorded_spans() as memory:
        llm = make_llm(qwen3_dir, **FA4, kvcache_block_size=128, trace_level="request")
    assert llm.engine.runner.backend.name == "flash_attn"
    spans = {s.name: s.attributes for s in memory.get_finished_spans()}
    assert spans[S.ENGINE_INIT][S.CONFIG_PREFIX + "attention_backend"] == "flash_attn"
    assert spans[S.MODEL_LOAD][S.ATTENTION_BACKEND] == "flash_attn"


@pytest.mark.parametrize("block_size", [16, 128, 256])
def test_engine_first_tokens_match_float32_reference(qwen3_dir, block_size):
    outputs = make_llm(qwen3_dir, **FA4, attention_backend="flash_attn", kvcache_block_size=block_size).generate(
        PROMPTS, GREEDY, use_tqdm=False)
    # bf16 against transformers' float32: the first greedy token may flip on a near tie.
    agree = sum(out.token_ids[0] == hf_greedy(qwen3_dir, p, 1)[0] for p, out in zip(PROMPTS, outputs))
    assert agree >= len(PROMPTS) - 1


def _first_token_logprobs(llm):
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    return [out.logprobs[0] for out in llm.generate(PROMPTS, params, use_tqdm=False)]


def _assert_close_distributions(a, b, atol=0.1):
    for x, y in zip(a, b):
        common = set(x) & set(y)
        assert len(common) >= 3
        assert all(abs(x[t] - y[t]) < atol for t in common)


def test_engine_logprobs_close_to_triton(qwen3_dir):
    """Same bf16 weights, two attention backends: the first-token distributions agree to bf16 rounding."""
    fa4, triton = (make_llm(qwen3_dir, **FA4, attention_backend=name, kvcache_block_size=256)
                   for name in ("flash_attn", "triton"))
    _assert_close_distributions(_first_token_logprobs(fa4), _first_token_logprobs(triton))


def test_prefix_cached_prefill_keeps_the_distribution(qwen3_dir):
    llm = make_llm(qwen3_dir, **FA4, attention_backend="flash_attn", kvcache_block_size=128)
    first = _first_token_logprobs(llm)
    hits = llm.engine.block_manager.num_cache_hits
    again = _first_token_logprobs(llm)   # the same prompts: their full blocks come from the cache
    assert llm.engine.block_manager.num_cache_hits > hits
    _assert_close_distributions(first, again, atol=0.05)


def test_cuda_graphs_agree_with_eager(qwen3_dir):
    graphs = make_llm(qwen3_dir, **FA4, attention_backend="flash_attn", kvcache_block_size=128)
    eager = make_llm(qwen3_dir, **FA4, attention_backend="flash_attn", kvcache_block_size=128, enforce_eager=True)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    replayed = record_graph_use(graphs)
    a = graphs.generate(PROMPTS, GREEDY, use_tqdm=False)
    b = eager.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert any(replayed)
    # The same kernels on the same inputs (the graph pads the batch with empty rows).
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
