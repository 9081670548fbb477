"""Failures in the trace: a step that fails (out of memory, a CUDA error), a layer that fails at
`debug`, a start-up that fails; what their spans carry over a real OTLP receiver, and what
`otvllm trace summary` says of the same run's trace file."""

import pytest
import torch
from transformers import AutoConfig

from otvllm import LLM, SamplingParams
from otvllm.tracing import schema as S
from otvllm.tracing.tools.summary import human_bytes
from scripts.failing_step_trace import fail_on_call   # the debugging guide's script breaks its step the same way
from tests import helpers
from tests.helpers import lines, traced

BLOCK = 16
PARAMS = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8]]
ERROR = 2   # OTLP's STATUS_CODE_ERROR
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


def make_llm(model_dir, **kwargs):
    return helpers.make_llm(model_dir, max_model_len=128, max_num_batched_tokens=256, **kwargs)


def failed(spans, name):
    return [s for s in spans if s["name"] == name and s["status_code"] == ERROR]


def test_a_step_out_of_memory_names_its_phase_shapes_and_advice(tmp_path, qwen3_dir):
    def body():
        llm = make_llm(qwen3_dir)
        fail_on_call(llm.engine.runner, "forward", 3, torch.cuda.OutOfMemoryError(OOM))   # the second decode
        with pytest.raises(torch.cuda.OutOfMemoryError):
            llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    spans, summary = traced(tmp_path, body)

    forward, = failed(spans, S.FORWARD)
    a = forward["attributes"]
    assert a[S.PHASE] == "decode"
    assert a[S.SHAPE_PREFIX + "input_ids"] == [len(PROMPTS)]      # one token per sequence
    assert a[S.SHAPE_PREFIX + "positions"] == [len(PROMPTS)]
    assert a[S.SHAPE_PREFIX + "block_tables"] == [len(PROMPTS), 1]
    assert a[S.SHAPE_PREFIX + "context_lens"] == [len(PROMPTS)]
    assert "gpu_memory_utilization" in a[S.ERROR_ADVICE] and "max_num_seqs" in a[S.ERROR_ADVICE]
    assert a[S.ERROR_TYPE] == "OutOfMemoryError"
    step, = failed(spans, S.step_name("decode"))
    assert step["attributes"][S.STEP_INDEX] == 2 and step["attributes"][S.STEP_DETAIL_REASON] == "error"
    assert forward["parent_span_id"] == step["span_id"]

    in_error = [s for s in spans if s["status_code"] == ERROR]
    assert len(in_error) == 5 and all(s["attributes"][S.ERROR_TYPE] == "OutOfMemoryError" for s in in_error)
    text = lines(summary)
    assert not any(line.startswith("Generation complete") for line in text)
    assert any(line.startswith("Generation failed (OutOfMemoryError)") for line in text)
    errors = text.index(next(line for line in text if line.startswith("errors:")))
    assert text[errors + 1] == f"{S.FORWARD} (decode, step 2): OutOfMemoryError: {OOM}"   # where it failed first
    assert text[errors + 2].startswith("advice: CUDA ran out of memory: lower gpu_memory_utilization")
    assert f"{S.GENERATE}: OutOfMemoryError: {OOM}" in text
    assert any(line.startswith(f"{len(PROMPTS)} request spans (OutOfMemoryError)") for line in text)


def test_a_cuda_error_while_sampling_says_how_to_find_the_kernel(tmp_path, qwen3_dir):
    def body():
        llm = make_llm(qwen3_dir)
        fail_on_call(llm.engine.runner, "sample", 1, RuntimeError(CUDA_ERROR))   # the prefill
        with pytest.raises(RuntimeError, match="illegal memory access"):
            llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    spans, summary = traced(tmp_path, body)
    sample, = failed(spans, S.SAMPLE)
    a = sample["attributes"]
    vocab = AutoConfig.from_pretrained(qwen3_dir).vocab_size
    assert a[S.SHAPE_PREFIX + "logits"] == [len(PROMPTS), vocab] and a[S.PHASE] == "prefill"
    assert "CUDA_LAUNCH_BLOCKING=1" in a[S.ERROR_ADVICE]
    assert f"{S.SAMPLE} (prefill, step 0): RuntimeError: {CUDA_ERROR}" in lines(summary)


def test_at_debug_the_failing_layer_is_a_span_in_error(tmp_path, qwen3_dir):
    layer = 1

    def body():
        llm = make_llm(qwen3_dir, trace_level="debug")
        mlp = llm.engine.runner.model.model.layers[layer].mlp
        fail_on_call(mlp, "forward", 1, RuntimeError(CUDA_ERROR))
        with pytest.raises(RuntimeError, match="illegal memory access"):
            llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    spans, summary = traced(tmp_path, body)
    forward, = failed(spans, S.FORWARD)
    parts = sorted((s for s in spans if s["parent_span_id"] == forward["span_id"]), key=lambda s: s["start_ns"])
    names = [(s["name"], s["attributes"].get(S.LAYER_INDEX)) for s in parts]
    # Every part up to the failing one, in order; nothing after it.
    expected = [(S.EMBEDDING, None)]
    for i in range(layer + 1):
        expected += [(S.NORM, i), (S.ATTENTION, i), (S.NORM, i), (S.MLP, i)]
    assert names == expected
    assert [s["status_code"] == ERROR for s in parts] == [False] * (len(parts) - 1) + [True]
    mlp = parts[-1]
    assert mlp["attributes"][S.ERROR_TYPE] == "RuntimeError"
    assert mlp["events"][0]["attributes"]["exception.message"] == CUDA_ERROR
    hidden = AutoConfig.from_pretrained(qwen3_dir).hidden_size
    assert mlp["attributes"][S.SHAPE_PREFIX + "input"] == [sum(map(len, PROMPTS)), hidden]
    assert f"{S.MLP} (layer {layer}, prefill, step 0): RuntimeError: {CUDA_ERROR}" in lines(summary)


def kv_block_bytes(model_dir) -> int:
    cfg = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * BLOCK * cfg.num_key_value_heads * head_dim * 4   # K and V, float32


def test_a_failed_kv_cache_allocation_reports_what_it_planned(tmp_path, qwen3_dir, monkeypatch):
    from otvllm.core.model_runner import ModelRunner

    def out_of_memory(self, num_blocks):
        raise torch.cuda.OutOfMemoryError(OOM)

    def body():
        monkeypatch.setattr(ModelRunner, "allocate_kv_cache", out_of_memory)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            make_llm(qwen3_dir, num_kvcache_blocks=64)
    spans, summary = traced(tmp_path, body)
    kv, = failed(spans, S.KV_CACHE_ALLOCATE)
    a = kv["attributes"]
    assert a[S.BLOCKS_TOTAL] == 64 and a[S.BLOCK_SIZE] == BLOCK
    assert a[S.KV_CACHE_BYTES] == 64 * kv_block_bytes(qwen3_dir) and a[S.KV_CACHE_BLOCK_BYTES] == kv_block_bytes(qwen3_dir)
    assert "max_model_len" in a[S.ERROR_ADVICE]
    assert failed(spans, S.ENGINE_INIT)
    text = lines(summary)
    assert (f"KV cache: 64 blocks of {BLOCK} tokens, {human_bytes(64 * kv_block_bytes(qwen3_dir))} planned, "
            f"FAILED (OutOfMemoryError)") in text
    assert f"{S.KV_CACHE_ALLOCATE}: OutOfMemoryError: {OOM}" in text


def test_a_kv_cache_too_small_for_one_sequence_reports_its_plan(tmp_path, qwen3_dir):
    def body():
        with pytest.raises(ValueError, match="room for 2 blocks"):
            make_llm(qwen3_dir, num_kvcache_blocks=2)   # 128 tokens need 8 blocks of 16
    spans, summary = traced(tmp_path, body)
    kv, = failed(spans, S.KV_CACHE_ALLOCATE)
    assert kv["attributes"][S.BLOCKS_TOTAL] == 2
    assert kv["attributes"][S.KV_CACHE_BYTES] == 2 * kv_block_bytes(qwen3_dir)
    assert any(line.startswith(f"{S.KV_CACHE_ALLOCATE}: ValueError: the KV cache has room for 2 blocks")
               for line in lines(summary))


def test_a_model_directory_without_config_fails_in_config_load(tmp_path):
    def body():
        with pytest.raises(ValueError, match="no config.json"):
            LLM(str(tmp_path / "empty"), device="cpu")
    (tmp_path / "empty").mkdir()
    spans, summary = traced(tmp_path, body)
    config, = failed(spans, S.CONFIG_LOAD)
    assert "no config.json" in config["events"][0]["attributes"]["exception.message"]
    assert any(line.startswith(f"{S.CONFIG_LOAD}: ValueError:") for line in lines(summary))
