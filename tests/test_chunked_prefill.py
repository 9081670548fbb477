"""Chunked prefill: prompts longer than max_num_batched_tokens are computed over several steps,
and a step mixes the running sequences' decodes with prompt chunks under a decode-first token
budget. Outputs against transformers' greedy generation in float32; the budget against the
scheduler's own batches; the trace through a real OTLP receiver."""

from itertools import count

import pytest
import torch

from otvllm import SamplingParams
from otvllm.core.block_manager import BlockManager
from otvllm.core.scheduler import Scheduler
from otvllm.core.sequence import Sequence
from otvllm.tracing import schema as S
from tests.helpers import by_name, make_llm, random_prompts, record_graph_use, traced
from tests.reference import hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
CHUNKED = dict(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=512)


def record_batches(llm) -> list:
    """Every batch the engine's scheduler hands out from now on."""
    batches, schedule = [], llm.engine.scheduler.schedule

    def recording():
        batch = schedule()
        batches.append(batch)
        return batch

    llm.engine.scheduler.schedule = recording
    return batches


def test_long_prompt_in_chunks_equals_transformers_and_one_whole_prefill(qwen3_dir):
    prompt = random_prompts([300], seed=30)[0]
    chunked = make_llm(qwen3_dir, **CHUNKED)   # max_model_len above the budget: no longer refused
    batches = record_batches(chunked)
    out = chunked.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.token_ids == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)
    whole = make_llm(qwen3_dir, max_num_batched_tokens=512, max_model_len=512)
    assert whole.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids == out.token_ids
    prefills = [b.num_prefill_tokens for b in batches if b.num_prefill_tokens]
    assert prefills == [64, 64, 64, 64, 44]
    # Only the last chunk samples; every step keeps within the budget.
    assert [len(b.sampled_seqs) for b in batches[:5]] == [0, 0, 0, 0, 1]
    assert max(b.num_batched_tokens for b in batches) <= 64


def test_chunked_prompts_under_preemption_equal_transformers(qwen3_dir):
    # 22 blocks of 16 tokens: the long prompt alone takes 19 of them, so the short ones are
    # preempted (and recomputed, in chunks too) as sequences grow.
    prompts = random_prompts([40, 300, 45, 30], seed=31)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm = make_llm(qwen3_dir, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=320, num_kvcache_blocks=22)
    batches = record_batches(llm)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert any(b.phase == "mixed" for b in batches)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(qwen3_dir, prompt, params.max_tokens)
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_prefix_cache_hits_with_chunked_prompts_equal_transformers(qwen3_dir):
    llm = make_llm(qwen3_dir, **CHUNKED)
    first = random_prompts([300], seed=32)[0]
    # In the same call: it shares 200 tokens (12 full blocks) with the first prompt, and is
    # admitted while that one's last chunk runs.
    sibling = first[:200] + random_prompts([60], seed=33)[0]
    outputs = llm.generate([first, sibling], GREEDY, use_tqdm=False)
    assert outputs[1].num_cached_tokens == 192
    # In a later call: it shares the first 280 tokens, 17 full blocks.
    later = first[:280] + random_prompts([30], seed=34)[0]
    outputs.append(llm.generate([later], GREEDY, use_tqdm=False)[0])
    assert outputs[2].num_cached_tokens == 272
    for prompt, out in zip([first, sibling, later], outputs):
        assert out.token_ids == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)


def test_blocks_of_a_preempted_chunked_prompt_are_not_reused_before_computed(qwen3_dir):
    """A prompt preempted between its chunks leaves blocks it never computed: a later prompt
    with the same prefix must compute them, not read them from the cache."""
    long = random_prompts([300], seed=35)[0]
    llm = make_llm(qwen3_dir, max_num_batched_tokens=64, max_num_seqs=4, max_model_len=320, num_kvcache_blocks=22)
    short = random_prompts([48], seed=36)[0]   # three full blocks: its first decode needs a fourth
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), GREEDY]
    # The long prompt's first chunk (16 tokens) shares the first step with the short one, whose
    # first decode then needs a block: the long one is preempted, and readmitted (and computed
    # again) once the short one is done.
    outputs = llm.generate([short, long], params, use_tqdm=False)
    assert outputs[1].num_preemptions == 1
    assert outputs[1].token_ids == hf_greedy(qwen3_dir, long, GREEDY.max_tokens)
    again = long[:290] + [7]
    out = llm.generate([again], GREEDY, use_tqdm=False)[0]
    assert out.token_ids == hf_greedy(qwen3_dir, again, GREEDY.max_tokens)


def test_at_debug_a_mixed_steps_attention_layers_say_they_took_the_prefill_path(qwen3_dir, tmp_path):
    prompts = random_prompts([10, 14, 100], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    spans, _ = traced(tmp_path, lambda: make_llm(qwen3_dir, trace_level="debug", **CHUNKED).generate(
        prompts, params, use_tqdm=False))
    forwards = {s["span_id"]: s["attributes"] for s in by_name(spans, S.FORWARD)}
    layers = [s for s in by_name(spans, S.ATTENTION) if s["parent_span_id"] in forwards]
    path_by_phase = {}
    for layer in layers:
        forward = forwards[layer["parent_span_id"]]
        path_by_phase.setdefault(forward[S.PHASE], set()).add(layer["attributes"][S.ATTENTION_PATH])
        assert S.PHASE not in layer["attributes"]   # the step's phase is its forward's
        assert layer["attributes"][S.SHAPE_PREFIX + "q"][0] == forward[S.SHAPE_PREFIX + "input_ids"][0]
    assert path_by_phase == {"prefill": {"prefill"}, "mixed": {"prefill"}, "decode": {"decode"}}


def test_decodes_continue_while_a_long_prompt_is_chunked_and_the_trace_says_so(qwen3_dir, tmp_path):
    prompts = random_prompts([10, 14, 300], seed=37)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outputs = []

    def body():
        outputs.extend(make_llm(qwen3_dir, **CHUNKED).generate(prompts, params, use_tqdm=False))

    spans, _ = traced(tmp_path, body)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(qwen3_dir, prompt, params.max_tokens)
    steps = by_name(spans, S.STEP)
    mixed = [s["attributes"] for s in steps if s["attributes"][S.PHASE] == "mixed"]
    # After the first step (both short prompts and 40 tokens of the long one), the long prompt's
    # chunks share each step with the two short requests' decodes.
    assert [(a[S.NUM_DECODE_TOKENS], a[S.NUM_PREFILL_TOKENS]) for a in mixed] == [(2, 62)] * 4 + [(2, 12)]
    assert all(a[S.NUM_BATCHED_TOKENS] == a[S.NUM_DECODE_TOKENS] + a[S.NUM_PREFILL_TOKENS] for a in mixed)
    assert all(s["name"] == S.step_name(s["attributes"][S.PHASE]) for s in steps)
    schedules = [s["attributes"] for s in by_name(spans, S.SCHEDULE) if s["attributes"][S.PHASE] == "mixed"]
    assert schedules and all(a[S.NUM_DECODE_TOKENS] + a[S.NUM_PREFILL_TOKENS] <= 64 for a in schedules)
    # The long request's events show its chunks, covering its prompt in order.
    request, = [s for s in spans if S.is_request(s["name"], s["attributes"])
                and s["attributes"][S.GEN_AI_USAGE_INPUT_TOKENS] == 300]
    chunks = [e["attributes"] for e in request["events"] if e["name"] == S.EVENT_PREFILL_CHUNK]
    assert [c[S.CHUNK_START] for c in chunks] == [0, 40, 102, 164, 226, 288]
    assert sum(c[S.CHUNK_TOKENS] for c in chunks) == 300
    first_token, = [e for e in request["events"] if e["name"] == S.EVENT_FIRST_TOKEN]
    assert first_token["attributes"][S.EVENT_STEP] == chunks[-1][S.EVENT_STEP]
    short = [s for s in spans if S.is_request(s["name"], s["attributes"])
             and s["attributes"][S.GEN_AI_USAGE_INPUT_TOKENS] != 300]
    assert not any(e["name"] == S.EVENT_PREFILL_CHUNK for s in short for e in s["events"])


# ---- the scheduler alone ------------------------------------------------------------------

def scheduler(budget: int, max_num_seqs: int = 8, num_blocks: int = 64) -> Scheduler:
    return Scheduler(max_num_seqs, budget, 1024, BlockManager(num_blocks, 16), eos_token_ids=set())


def launch(sched: Scheduler):
    """Schedule a step and count it as launched, as the engine does."""
    batch = sched.schedule()
    sched.reserve_tokens(batch)
    return batch


_seeds = count(100)


def add(sched: Scheduler, *lengths: int) -> list[Sequence]:
    """Prompts of these lengths, no two with a common prefix."""
    seqs = [Sequence(random_prompts([n], seed=next(_seeds))[0], SamplingParams(max_tokens=100, ignore_eos=True), 16)
            for n in lengths]
    for seq in seqs:
        sched.add(seq)
    return seqs


def test_the_budget_goes_to_decodes_first_then_to_prompt_chunks():
    sched = scheduler(budget=16)
    a, b, c = add(sched, 5, 6, 4)
    first = launch(sched)
    assert first.seqs == [a, b, c] and first.query_lens == [5, 6, 4] and first.phase == "prefill"
    long, = add(sched, 40)
    second = launch(sched)
    # Three decodes, then 13 tokens of the long prompt, which samples nothing yet.
    assert second.phase == "mixed" and second.seqs == [a, b, c, long]
    assert second.query_lens == [1, 1, 1, 13] and second.sampled_seqs == [a, b, c]
    assert (second.num_decode_tokens, second.num_prefill_tokens) == (3, 13)
    third = launch(sched)
    assert third.query_lens == [1, 1, 1, 13] and long.num_computed_tokens == 26
    fourth = launch(sched)
    assert fourth.query_lens == [1, 1, 1, 13] and fourth.sampled_seqs == [a, b, c]
    last = launch(sched)   # the prompt's last token: its chunk samples
    assert last.query_lens == [1, 1, 1, 1] and last.sampled_seqs == [a, b, c, long] and last.phase == "mixed"
    assert launch(sched).phase == "decode"


def test_running_prompts_chunk_before_waiting_ones_are_admitted():
    sched = scheduler(budget=32)
    long, other = add(sched, 50, 20)
    first = launch(sched)
    assert first.seqs == [long] and first.query_lens == [32] and first.waiting_reason == "max_num_batched_tokens"
    second = launch(sched)
    # The rest of the admitted prompt (18), then 14 tokens of the next one.
    assert second.seqs == [long, other] and second.query_lens == [18, 14] and second.sampled_seqs == [long]
    assert [a.seq_id for a in second.allocations] == [other.seq_id]
    third = launch(sched)
    assert third.seqs == [long, other] and third.query_lens == [1, 6] and third.phase == "mixed"


def test_no_prompt_is_admitted_in_a_step_that_preempts():
    # 4 blocks: two 31-token prompts take 2 each; the first decodes fill their blocks, the
    # next needs a block each: the newer one is preempted, and a waiting prompt stays waiting.
    sched = scheduler(budget=64, num_blocks=4)
    a, b = add(sched, 31, 31)
    launch(sched)
    waiting, = add(sched, 3)
    launch(sched)   # both decode into their last free slot
    batch = launch(sched)
    assert batch.preempted == [b] and batch.seqs == [a] and not batch.allocations
    assert list(sched.waiting) == [b, waiting]
    # The step says why they wait: blocks, as many as b's 33 tokens take (its 31 and the two it sampled).
    assert len(b) == 33
    assert batch.waiting_reason == "kv_blocks" and batch.waiting_blocks_needed == 3


def test_fewer_batched_tokens_than_sequences_is_refused(qwen3_dir):
    with pytest.raises(ValueError, match="max_num_batched_tokens=8 is below max_num_seqs=16"):
        make_llm(qwen3_dir, max_num_batched_tokens=8, max_num_seqs=16)


# ---- on CUDA (pytest -m gpu) ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend, dtype", [("triton", "float32"), ("triton", "bfloat16"), ("auto", "bfloat16")])
def test_on_cuda_mixed_steps_run_eager_and_decode_steps_replay_graphs(qwen3_dir, backend, dtype):
    """The prefill kernels (Triton; FlashAttention-4 where `auto` picks it) take the decodes of a
    mixed step as one-token queries; only decode-only steps replay a CUDA graph. float32 against transformers; bfloat16's first tokens
    against the same prompts prefilled whole (other tiles, other rounding: later tokens may part)."""
    prompts = random_prompts([10, 14, 300, 37], seed=38)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    llm = make_llm(qwen3_dir, device="cuda", dtype=dtype, attention_backend=backend, **CHUNKED)
    assert llm.engine.runner.graphs is not None
    batches, replayed = record_batches(llm), record_graph_use(llm)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    phases = [b.phase for b in batches if b.seqs]
    assert "mixed" in phases and "decode" in phases and len(phases) == len(replayed)
    assert all(used == (phase == "decode") for phase, used in zip(phases, replayed))
    if dtype == "float32":
        assert [o.token_ids for o in outputs] == [hf_greedy(qwen3_dir, p, params.max_tokens) for p in prompts]
    else:
        whole = make_llm(qwen3_dir, device="cuda", dtype=dtype, attention_backend=backend, max_model_len=512)
        expected = whole.generate(prompts, params, use_tqdm=False)
        assert sum(o.token_ids[0] == e.token_ids[0] for o, e in zip(outputs, expected)) >= len(prompts) - 1
