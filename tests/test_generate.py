"""otvllm's outputs against transformers' own generate and forward, in float32 on CPU."""

import glob
import os
import shutil

import pytest
import torch

from otvllm import SamplingParams
from tests.helpers import MODEL_VARIANTS, make_llm, random_prompts
from tests.reference import hf_greedy, hf_logprobs

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
def test_greedy_matches_transformers(model_dirs, variant):
    model_dir = model_dirs(variant)
    prompts = random_prompts([1, 7, 16, 33, 50])
    # max_num_seqs=3: later prompts are admitted while earlier ones decode (mixed batches).
    outputs = make_llm(model_dir, max_num_seqs=3).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(model_dir, prompt, GREEDY.max_tokens)
        assert out.finish_reason == "length"


def test_string_prompts_are_tokenized_and_decoded(qwen3_dir):
    llm = make_llm(qwen3_dir)
    out = llm.generate(["hello world", "otvllm"], GREEDY, use_tqdm=False)
    tok = llm.tokenizer
    assert out[0].prompt_token_ids == tok.encode("hello world")
    assert out[1].prompt == "otvllm"
    assert out[0].token_ids == hf_greedy(qwen3_dir, tok.encode("hello world"), GREEDY.max_tokens)
    assert out[0].text == tok.decode(out[0].token_ids, skip_special_tokens=True)


def test_logprobs_match_transformers_log_softmax(qwen3_dir):
    prompts = random_prompts([5, 21], seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=4)
    for prompt, out in zip(prompts, make_llm(qwen3_dir).generate(prompts, params, use_tqdm=False)):
        ref = hf_logprobs(qwen3_dir, prompt + out.token_ids)
        assert len(out.logprobs) == len(out.token_ids)
        for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            row = ref[len(prompt) - 1 + step]
            top = row.topk(4)
            assert set(entry) == set(top.indices.tolist()) | {token}
            for token_id, value in entry.items():
                assert abs(value - row[token_id].item()) < 1e-4


def test_no_logprobs_unless_asked(qwen3_dir):
    out = make_llm(qwen3_dir).generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]
    assert out.logprobs is None


def test_prefix_cache_hits_keep_outputs(qwen3_dir):
    llm = make_llm(qwen3_dir)
    shared = random_prompts([48], seed=2)[0]                       # three full blocks of 16
    prompts = [shared + tail for tail in random_prompts([5, 9, 17, 3], seed=3)]
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    manager = llm.engine.block_manager
    hits_before = manager.num_cache_hits
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in rest] == [48, 48, 48]
    assert manager.num_cache_hits - hits_before == 9
    for prompt, out in zip(prompts, [first] + rest):
        assert out.token_ids == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)
    # Every block is free again once all requests have finished.
    assert manager.num_free_blocks == manager.num_blocks


def test_whole_prompt_cached_still_computes_last_token(qwen3_dir):
    llm = make_llm(qwen3_dir)
    prompt = random_prompts([32], seed=4)[0]                       # exactly two blocks
    a = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    b = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert b.num_cached_tokens == 16        # the block holding the last prompt token is recomputed
    assert a.token_ids == b.token_ids == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)


def test_preemption_gives_unconstrained_outputs(qwen3_dir):
    prompts = random_prompts([20, 24, 28, 30, 18, 26], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    roomy = make_llm(qwen3_dir, max_model_len=64).generate(prompts, params, use_tqdm=False)
    tight = make_llm(qwen3_dir, max_model_len=64, num_kvcache_blocks=6)
    constrained = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert sum(o.num_preemptions for o in constrained) == tight.engine.scheduler.num_preemptions
    assert [o.token_ids for o in constrained] == [o.token_ids for o in roomy]
    assert constrained[0].token_ids == hf_greedy(qwen3_dir, prompts[0], params.max_tokens)


def test_seeded_sampling_is_reproducible_whatever_the_batch(qwen3_dir):
    llm = make_llm(qwen3_dir)
    prompt = random_prompts([10], seed=6)[0]
    seeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=1234)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    others = random_prompts([3, 30], seed=7)
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    in_batch = llm.generate(others + [prompt], [unseeded, unseeded, seeded], use_tqdm=False)[2].token_ids
    assert alone == in_batch
    other_seed = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=4321)
    assert llm.generate([prompt], other_seed, use_tqdm=False)[0].token_ids != alone


def test_seeded_sampling_survives_preemption(qwen3_dir):
    prompts = random_prompts([20, 24, 28, 30], seed=8)
    params = [SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True, seed=i) for i in range(4)]
    roomy = make_llm(qwen3_dir, max_model_len=64).generate(prompts, params, use_tqdm=False)
    tight = make_llm(qwen3_dir, max_model_len=64, num_kvcache_blocks=5)
    constrained = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in constrained] == [o.token_ids for o in roomy]


def test_sampling_differs_from_greedy(qwen3_dir):
    prompt = random_prompts([10], seed=9)[0]
    llm = make_llm(qwen3_dir)
    greedy = llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    hot = SamplingParams(temperature=5.0, max_tokens=12, ignore_eos=True, seed=0)
    assert llm.generate([prompt], hot, use_tqdm=False)[0].token_ids != greedy


def test_top_k_1_and_tiny_top_p_equal_greedy(qwen3_dir):
    prompts = random_prompts([4, 13], seed=10)
    llm = make_llm(qwen3_dir)
    greedy = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    top_k = SamplingParams(temperature=1.0, top_k=1, max_tokens=12, ignore_eos=True)
    top_p = SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts, top_k, use_tqdm=False)] == greedy
    assert [o.token_ids for o in llm.generate(prompts, top_p, use_tqdm=False)] == greedy


def test_top_k_samples_only_among_the_k_most_likely(qwen3_dir):
    prompt = random_prompts([8], seed=11)[0]
    params = SamplingParams(temperature=3.0, top_k=3, max_tokens=20, ignore_eos=True, logprobs=3, seed=5)
    out = make_llm(qwen3_dir).generate([prompt], params, use_tqdm=False)[0]
    # `logprobs` holds the 3 most likely tokens plus the chosen one: it never adds a 4th.
    assert all(len(entry) == 3 for entry in out.logprobs)
    ref = hf_logprobs(qwen3_dir, prompt + out.token_ids)
    for step, token in enumerate(out.token_ids):
        assert token in ref[len(prompt) - 1 + step].topk(3).indices.tolist()


def test_eos_and_stop_tokens_finish_with_stop(qwen3_dir):
    llm = make_llm(qwen3_dir)
    prompt = random_prompts([6], seed=12)[0]
    free = llm.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_at])
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free[:first + 1]
    llm.engine.scheduler.eos_token_ids = {stop_at}                # as if it were the model's EOS
    eos = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    assert eos.finish_reason == "stop" and eos.token_ids == free[:first + 1]
    ignored = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_outputs_keep_input_order_with_different_lengths(qwen3_dir):
    prompts = random_prompts([30, 2, 15], seed=13)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 9, 1)]
    outs = make_llm(qwen3_dir).generate(prompts, params, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [3, 9, 1]
    assert [o.request_id for o in outs] == [0, 1, 2]
    assert all(o.metrics["time_to_first_token_ms"] >= 0 for o in outs)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu_is_close_to_float32(qwen3_dir, dtype):
    # Half precision runs through the same paths; its first tokens agree with float32.
    prompt = random_prompts([12], seed=14)[0]
    llm = make_llm(qwen3_dir, dtype=dtype)
    assert {p.dtype for p in llm.engine.runner.model.parameters()} == {getattr(torch, dtype)}
    assert llm.engine.runner.kv_cache.dtype == getattr(torch, dtype)
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.token_ids[:2] == hf_greedy(qwen3_dir, prompt, 2)
    assert torch.get_default_dtype() == torch.float32


def test_reset_prefix_cache_forgets_finished_prompts(qwen3_dir):
    llm = make_llm(qwen3_dir)
    prompt = random_prompts([40], seed=15)[0]
    llm.generate([prompt], GREEDY, use_tqdm=False)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 32
    llm.reset_prefix_cache()
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    assert again.token_ids == hf_greedy(qwen3_dir, prompt, GREEDY.max_tokens)


def test_sharded_checkpoint_loads_from_every_file(model_dirs, tmp_path):
    """The llama variant is saved in several safetensors files: outputs equal transformers'
    only if every file was read, and without its last file the load names what is missing."""
    model_dir = model_dirs("llama")
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    assert len(files) > 1
    prompt = random_prompts([9], seed=16)[0]
    out = make_llm(model_dir).generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.token_ids == hf_greedy(model_dir, prompt, GREEDY.max_tokens)
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial, ignore=shutil.ignore_patterns(os.path.basename(files[-1])))
    with pytest.raises(ValueError, match="lacks [0-9]+ weight\\(s\\) the model needs"):
        make_llm(str(partial))


def test_a_stop_mid_batch_leaves_the_other_requests_intact(qwen3_dir):
    """The engine launches the next step before it reads this one's tokens: a request that
    stops has one more row in flight, which must be dropped without touching the others."""
    llm = make_llm(qwen3_dir)
    prompts = random_prompts([6, 11, 3, 20], seed=14)
    free = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    stop_at = free[1][3]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1,
                             stop_token_ids=[stop_at] if i == 1 else []) for i in range(len(prompts))]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stopped = free[1][:free[1].index(stop_at) + 1]
    assert outputs[1].token_ids == stopped and outputs[1].finish_reason == "stop"
    for i in (0, 2, 3):
        assert outputs[i].token_ids == free[i] == hf_greedy(qwen3_dir, prompts[i], GREEDY.max_tokens)
    assert [len(o.logprobs) for o in outputs] == [len(o.token_ids) for o in outputs]
    manager = llm.engine.block_manager
    assert llm.engine.is_finished() and manager.num_free_blocks == manager.num_blocks


def test_blocks_filled_while_decoding_are_prefix_cached(qwen3_dir):
    """A block completed by generated tokens is hashed once its last token reaches the host;
    a later prompt that extends the conversation reuses it and still gets transformers' output."""
    llm = make_llm(qwen3_dir)
    prompt = random_prompts([10], seed=15)[0]
    completion = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                              use_tqdm=False)[0].token_ids
    follow_up = prompt + completion + [7, 8, 9]                   # 43 tokens: two full blocks of 16
    out = llm.generate([follow_up], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 32
    assert out.token_ids == hf_greedy(qwen3_dir, follow_up, GREEDY.max_tokens)
