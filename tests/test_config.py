"""The user's EngineConfig stays as given; what start-up decides is one ResolvedConfig."""

import dataclasses
import json
import os

import pytest
import torch

from otvllm import EngineConfig
from otvllm.core.engine import LLMEngine


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
