"""The engine on CUDA (run on the GPU machine: pytest -m gpu): outputs against transformers,
CUDA graphs against eager, and the CUDA memory and GPU-time attributes of the trace."""

import pytest
import torch

from otvllm import SamplingParams
from otvllm.tracing import schema as S
from tests.helpers import make_llm, random_prompts, record_graph_use, recorded_spans
from tests.reference import hf_greedy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = random_prompts([1, 7, 16, 33, 50, 130], seed=21)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("eager", [True, False])
def test_float32_greedy_matches_transformers(qwen3_dir, backend, eager):
    llm = make_llm(qwen3_dir, device="cuda", dtype="float32", attention_backend=backend, enforce_eager=eager,
                   max_num_seqs=4)
    assert llm.engine.runner.backend.name == backend
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)


@pytest.mark.parametrize("variant", ["qwen2", "llama", "qwen3-untied"])
def test_other_architectures_on_triton(model_dirs, variant):
    model_dir = model_dirs(variant)
    outputs = make_llm(model_dir, device="cuda", dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == hf_greedy(model_dir, prompt, GREEDY.max_tokens)


def test_bfloat16_cuda_graphs_agree_with_eager(qwen3_dir):
    # Decode graphs only: a prefill graph pads the step's tokens, and cuBLAS may choose another
    # kernel, with another rounding, for the padded shape (prefill graphs: the test below).
    graphs = make_llm(qwen3_dir, device="cuda", dtype="bfloat16", cudagraph_max_prefill_tokens=0)
    eager = make_llm(qwen3_dir, device="cuda", dtype="bfloat16", enforce_eager=True)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    replayed = record_graph_use(graphs)
    a = graphs.generate(PROMPTS, GREEDY, use_tqdm=False)
    b = eager.generate(PROMPTS, GREEDY, use_tqdm=False)
    # Same kernels, same inputs: the graph replays exactly what eager mode runs.
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert any(replayed)


def test_prefill_and_mixed_steps_replay_graphs_and_keep_float32_greedy_equal_to_transformers(qwen3_dir):
    # Chunked prompts (a 64-token budget), steps that mix decodes with a chunk, and prefix-cache
    # hits (prompts that share their first 40 tokens), all replayed from padded prefill graphs.
    shared = random_prompts([40], seed=3)[0]
    prompts = PROMPTS + [shared + p for p in random_prompts([9, 70], seed=4)] + [shared]
    llm = make_llm(qwen3_dir, device="cuda", dtype="float32", max_num_seqs=4, max_num_batched_tokens=64,
                   kvcache_block_size=16)
    runner = llm.engine.runner
    assert llm.engine.resolved.cudagraph_max_prefill_tokens == 64 and runner.prefill_graphs.sizes == [16, 32, 64]
    steps, forward = [], runner.forward

    def recording(inputs):
        logits, used_graph = forward(inputs)
        steps.append((inputs.phase, len(inputs.input_ids), used_graph))
        return logits, used_graph

    runner.forward = recording
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)
    with_prompts = [s for s in steps if s[0] != "decode"]
    assert {phase for phase, _, _ in with_prompts} == {"prefill", "mixed"}
    assert all(used for _, _, used in with_prompts), with_prompts
    assert {n for _, n, _ in with_prompts} - {16, 32, 64}   # padded, not only whole sizes
    assert llm.engine.block_manager.num_prompt_tokens_cached > 0


def test_bfloat16_first_tokens_match_float32_reference(qwen3_dir):
    outputs = make_llm(qwen3_dir, device="cuda", dtype="bfloat16").generate(PROMPTS, GREEDY, use_tqdm=False)
    agree = sum(out.token_ids[0] == hf_greedy(qwen3_dir, p, 1)[0] for p, out in zip(PROMPTS, outputs))
    assert agree >= len(PROMPTS) - 1


def test_preemption_on_gpu_keeps_outputs(qwen3_dir):
    prompts = random_prompts([20, 24, 28, 30, 18, 26], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    roomy = make_llm(qwen3_dir, device="cuda", dtype="float32", max_model_len=64)
    tight = make_llm(qwen3_dir, device="cuda", dtype="float32", max_model_len=64, num_kvcache_blocks=6)
    out = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in out] == [o.token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]


def test_triton_gemv_on_every_projection_keeps_float32_greedy_equal_to_transformers(qwen3_dir, monkeypatch):
    from otvllm.core import model_runner
    from otvllm.layers.basic import Linear, MergedLinear

    def everywhere(layers, token_counts):   # as if start-up had measured the GEMV faster everywhere
        counts = [n for n in token_counts if n <= 8]
        for module in layers.modules():
            if isinstance(module, (Linear, MergedLinear)):
                module.gemv_tokens = frozenset(counts)
        return {"all": counts}

    monkeypatch.setattr(model_runner, "choose_gemv", everywhere)
    llm = make_llm(qwen3_dir, device="cuda", dtype="float32", max_num_seqs=4)
    assert llm.engine.runner.gemv_choice == {"all": [1, 2, 4]}
    replayed = record_graph_use(llm)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert any(replayed)
    for prompt, out in zip(PROMPTS, outputs):
        assert out.token_ids == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)


def test_start_up_reports_where_it_chose_the_triton_gemv(qwen3_dir):
    from otvllm.layers.basic import Linear, MergedLinear
    with recorded_spans() as memory:
        llm = make_llm(qwen3_dir, device="cuda", dtype="bfloat16", trace_level="step")
    capture = [s for s in memory.get_finished_spans() if s.name == S.CUDA_GRAPH_CAPTURE][0]
    reported = dict(item.split(": ") for item in capture.attributes[S.CUDA_GRAPH_TRITON_GEMV])
    layers = llm.engine.runner.model.model.layers
    for layer in layers:
        for role, module in layer.named_modules():
            if isinstance(module, (Linear, MergedLinear)):
                expected = reported.get(role)
                assert sorted(module.gemv_tokens) == ([int(n) for n in expected.split(",")] if expected else [])
    assert set(reported) <= {r for r, m in layers[0].named_modules() if isinstance(m, (Linear, MergedLinear))}
    # programmatic dependent launch is Hopper's and later's
    assert capture.attributes[S.CUDA_GRAPH_PROGRAMMATIC_LAUNCH] == (torch.cuda.get_device_capability() >= (9, 0))


def _triton_variants() -> int:
    """Compiled variants of otvllm's Triton attention kernels, over all devices."""
    from otvllm.ops import triton_decode, triton_kvcache, triton_prefill
    kernels = [triton_prefill._prefill_kernel, triton_decode._decode_stage1, triton_decode._decode_stage2,
               triton_kvcache._store_kvcache_kernel]
    return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())


def test_steps_of_new_shapes_compile_no_triton_kernel_after_start_up(qwen3_dir):
    # A variant compiled mid-run stalls every running request for about a second; start-up's
    # warm-up and graph capture must have compiled all the engine launches.
    llm = make_llm(qwen3_dir, device="cuda", dtype="bfloat16", max_model_len=1024, max_num_batched_tokens=256,
                   kvcache_block_size=16)
    compiled = _triton_variants()
    assert compiled > 0
    for n, lengths in enumerate([[1], [7, 300], [16, 33, 50], [130] * 5, [5] * 17, [400, 2, 64], [40] * 33]):
        params = SamplingParams(temperature=0.0, max_tokens=3 + n, ignore_eos=True)
        llm.generate(random_prompts(lengths, seed=n), params, use_tqdm=False)   # chunked, mixed, decode steps
        assert _triton_variants() == compiled, f"call {n} ({len(lengths)} prompts) compiled a new variant"


def test_memory_and_gpu_time_attributes(qwen3_dir):
    with recorded_spans() as memory:
        llm = make_llm(qwen3_dir, device="cuda", dtype="bfloat16", trace_level="step")
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    spans = memory.get_finished_spans()
    forwards = [s for s in spans if s.name == S.FORWARD]
    assert forwards and all(s.attributes[S.GPU_TIME_MS] > 0 for s in forwards)
    for s in forwards:
        a = s.attributes
        assert 0 < a[S.MEM_ALLOCATED] <= a[S.MEM_RESERVED] <= a[S.MEM_TOTAL]
        assert a[S.MEM_PEAK] >= a[S.MEM_ALLOCATED]
    assert any(s.attributes[S.CUDA_GRAPH] for s in forwards if s.attributes[S.PHASE] == "decode")
    capture = [s for s in spans if s.name == S.CUDA_GRAPH_CAPTURE][0]
    assert list(capture.attributes[S.CUDA_GRAPH_BATCH_SIZES])[:4] == [1, 2, 4, 8]
    kv = [s for s in spans if s.name == S.KV_CACHE_ALLOCATE][0]
    assert kv.attributes[S.MEM_ALLOCATED] >= kv.attributes[S.KV_CACHE_BYTES]
    generate = [s for s in spans if s.name == S.GENERATE][0]
    assert generate.attributes[S.GEN_MEM_PEAK] >= generate.attributes[S.GEN_MEM_END] > 0


def test_start_up_on_cuda_resolves_dtype_graphs_and_compile(qwen3_dir):
    resolved = make_llm(qwen3_dir, device="cuda").engine.resolved
    # The tiny checkpoint is float32: on CUDA the engine computes in bfloat16 unless asked.
    assert (resolved.device, resolved.dtype) == ("cuda", "bfloat16")
    assert resolved.attention_backend in ("triton", "flash_attn")
    assert (resolved.cuda_graphs, resolved.torch_compile, resolved.cpu_threads) == (True, True, None)
    # prefill graphs on Triton attention only, up to the step's token budget (make_llm's: 1024)
    assert resolved.cudagraph_max_prefill_tokens == (1024 if resolved.attention_backend == "triton" else 0)
    eager = make_llm(qwen3_dir, device="cuda", enforce_eager=True, torch_compile=False).engine.resolved
    assert (eager.cuda_graphs, eager.torch_compile, eager.cudagraph_max_prefill_tokens) == (False, False, 0)


def test_a_cpu_engine_made_after_a_cuda_engine_compiles_nothing(qwen3_dir):
    """torch.compile is each engine's choice: a CUDA engine's compiled layers and sampler do
    not leak into a CPU engine of the same process (it would compile them for the CPU)."""
    from torch._dynamo.utils import counters

    cuda = make_llm(qwen3_dir, device="cuda")
    cuda.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    cpu = make_llm(qwen3_dir, trace_level="off")
    frames = counters["frames"]["total"]
    params = [GREEDY, SamplingParams(temperature=1.0, seed=3, max_tokens=4, ignore_eos=True)]
    outputs = cpu.generate(PROMPTS[:2], params, use_tqdm=False)
    assert counters["frames"]["total"] == frames
    assert outputs[0].token_ids == hf_greedy(qwen3_dir, PROMPTS[0], GREEDY.max_tokens)


def test_a_real_out_of_memory_in_a_step_carries_the_memory_figures(qwen3_dir):
    with recorded_spans() as memory:
        llm = make_llm(qwen3_dir, device="cuda", dtype="bfloat16", trace_level="step")
        forward, calls = llm.engine.runner.forward, []

        def greedy_forward(inputs):   # the third forward asks for more than the device has
            calls.append(1)
            if len(calls) == 3:
                torch.empty(torch.cuda.get_device_properties(0).total_memory * 2, dtype=torch.uint8, device="cuda")
            return forward(inputs)
        llm.engine.runner.forward = greedy_forward
        with pytest.raises(torch.cuda.OutOfMemoryError):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    spans = memory.get_finished_spans()
    failed = [s for s in spans if s.name == S.FORWARD and not s.status.is_ok]
    assert len(failed) == 1
    a = failed[0].attributes
    free, total = torch.cuda.mem_get_info()
    assert a[S.MEM_TOTAL] == total and 0 < a[S.MEM_FREE] <= total
    assert 0 < a[S.MEM_ALLOCATED] <= a[S.MEM_RESERVED] <= total
    assert "gpu_memory_utilization" in a[S.ERROR_ADVICE]
    assert a[S.PHASE] == "decode" and list(a[S.SHAPE_PREFIX + "input_ids"]) == [len(PROMPTS)]


DEVICE_ASSERT_RUN = """
import sys, torch
from otvllm import LLM, SamplingParams
from otvllm.tracing import configure
session = configure(trace_file=sys.argv[2])
llm = LLM(sys.argv[1], kvcache_block_size=16, max_model_len=512, device="cuda", gpu_memory_utilization=0.3,
          trace_level="debug")
mlp = llm.engine.runner.model.model.layers[1].mlp
forward = mlp.forward
def bad_index(x):   # an out-of-bounds gather: a device-side assert, reported asynchronously
    out = forward(x)
    return out[torch.full((out.shape[0],), 1 << 30, device=out.device)]
mlp.forward = bad_index
try:
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
except Exception as e:
    print(type(e).__name__)
session.shutdown()
"""


def test_at_debug_a_device_side_error_is_pinned_to_its_layer(qwen3_dir, tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "trace.json"
    result = subprocess.run([sys.executable, "-c", DEVICE_ASSERT_RUN, qwen3_dir, str(path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    spans = [s for t in json.load(open(path))["data"] for s in t["spans"]]
    tags = [{t["key"]: t["value"] for t in s["tags"]} for s in spans]
    failed = [(s["operationName"], t.get(S.LAYER_INDEX)) for s, t in zip(spans, tags) if t.get("error")]
    # The one part of the forward in ERROR is layer 1's MLP, where the device was synchronised.
    parts = [f for f in failed if f[0] in (S.EMBEDDING, S.NORM, S.ATTENTION, S.MLP, S.LM_HEAD)]
    assert parts == [(S.MLP, 1)], failed


def test_kv_sizing_leaves_room_for_the_heaviest_sampling(tmp_path):
    """Start-up counts the sampler at its largest beside the warm-up prefill: a full batch of
    requests with every sampling option and prompt logprobs, over Qwen3's vocabulary (where a
    [rows, vocab] float32 tensor is 155 MB at 256 rows), stays within gpu_memory_utilization of
    the device (it used to go past it by the sampler's ~1 GB)."""
    from otvllm.synthetic import write_model
    model_dir = write_model(str(tmp_path / "big-vocab"), vocab_size=151936, tokenizer=False)
    utilization = 0.3
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()   # other tests' engines may still hold theirs
    llm = make_llm(model_dir, device="cuda", dtype="bfloat16", gpu_memory_utilization=utilization, max_num_seqs=256,
                   max_model_len=512, max_num_batched_tokens=4096)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.01, presence_penalty=0.5,
                            frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={7: 2.0}, min_tokens=2,
                            logprobs=20, prompt_logprobs=20, max_tokens=8, ignore_eos=True)
    torch.cuda.reset_peak_memory_stats()
    outputs = llm.generate(random_prompts([300] * 256, vocab=151936, seed=3), params, use_tqdm=False)
    assert all(len(o.token_ids) == 8 for o in outputs)
    total = torch.cuda.mem_get_info()[1]
    used = torch.cuda.max_memory_allocated() - before
    assert used <= utilization * total, f"peak {used / 2**30:.2f} GiB, share {utilization * total / 2**30:.2f} GiB"
