"""The user's EngineConfig stays as given; what start-up decides is one ResolvedConfig."""

import dataclasses
import json
import os

import pytest
import torch

from otvllm import EngineConfig, SamplingParams
from otvllm.core.engine import LLMEngine
from tests.helpers import make_llm
from tests.reference import hf_greedy


def test_start_up_leaves_the_users_config_as_given(qwen3_dir):
    config = EngineConfig(model=qwen3_dir, kvcache_block_size=16, max_num_seqs=2, trace_level="debug")
    as_given = dataclasses.replace(config)
    engine = LLMEngine(config)
    assert config == as_given
    assert (config.max_model_len, config.num_kvcache_blocks, config.cpu_threads, config.device) == (None,) * 4
    assert config.enforce_eager is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_model_len = 64

    limit = json.load(open(os.path.join(qwen3_dir, "config.json")))["max_position_embeddings"]
    resolved = engine.resolved
    assert resolved.max_model_len == min(limit, 4096)
    assert resolved.num_kvcache_blocks == engine.block_manager.num_blocks == 2 * -(-resolved.max_model_len // 16)
    assert resolved.enforce_eager is True               # debug's per-layer spans need the eager forward
    assert (resolved.device, resolved.dtype, resolved.attention_backend) == ("cpu", "float32", "torch")
    assert resolved.cuda_graphs is False
    assert resolved.cpu_threads == torch.get_num_threads()
    assert resolved.trace_level == "debug"


def test_a_config_reused_after_start_up_carries_nothing_it_decided(qwen3_dir):
    config = EngineConfig(model=qwen3_dir, kvcache_block_size=16, max_num_seqs=2, max_model_len=256, device="cpu")
    LLMEngine(config)
    bigger = LLMEngine(dataclasses.replace(config, max_num_seqs=3))
    # On CPU the cache holds max_num_seqs sequences of max_model_len: sized anew, not the first engine's.
    assert bigger.block_manager.num_blocks == 3 * 256 // 16


def test_the_compile_choice_is_each_engines_own(qwen3_dir, monkeypatch):
    """torch.compile is replaced by a recorder here (compiling on this CPU takes half a minute):
    an engine's forward and sampling go through compiled functions only where it chose so,
    whatever another engine in the process chose before or after it."""
    calls = []

    def recording_compile(fn, **options):
        def compiled(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    compiling = make_llm(qwen3_dir, torch_compile=True, trace_level="off")
    plain = make_llm(qwen3_dir, trace_level="off")       # on CPU the default is not to compile
    assert (compiling.engine.resolved.torch_compile, plain.engine.resolved.torch_compile) == (True, False)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=7, max_tokens=4, ignore_eos=True)]

    calls.clear()
    first = plain.generate(prompts, params, use_tqdm=False)
    assert calls == []
    compiled = compiling.generate(prompts, params, use_tqdm=False)
    assert {"rms_norm", "add_rms_norm", "silu_and_mul", "apply_rotary", "gumbel_max"} <= set(calls)
    calls.clear()
    again = make_llm(qwen3_dir, trace_level="off").generate(prompts, params, use_tqdm=False)   # made after one
    assert calls == []
    assert [o.token_ids for o in first] == [o.token_ids for o in compiled] == [o.token_ids for o in again]
    assert first[0].token_ids == hf_greedy(qwen3_dir, prompts[0], 4)
