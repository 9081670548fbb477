"""Span attributes from the engine's objects."""

import dataclasses
import json

import torch

from otvllm.environment import read as read_environment
from otvllm.tracing import schema as S



def trace_content_enabled() -> bool:
    """Whether prompts and outputs go on request spans (sensitive: off unless opted in)."""
    return read_environment("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT") or \
        read_environment("OTVLLM_TRACE_CONTENT")


def shape(t: torch.Tensor | None) -> list[int]:
    return list(t.shape) if t is not None else []


def config_attrs(config) -> dict:
    """Every field of an EngineConfig (as asked) or a ResolvedConfig (as decided) that is set."""
    values = ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
    return {S.CONFIG_PREFIX + name: value for name, value in values if value is not None}


def config_load_attrs(result, model_dir: str) -> dict:
    return {S.MODEL_ARCHITECTURE: result[0]} if result is not None else {}


def tokenizer_attrs(tokenizer, model_dir: str) -> dict:
    if tokenizer is None:
        return {S.TOKENIZER_CLASS: "none"}
    return {S.TOKENIZER_CLASS: type(tokenizer).__name__, S.TOKENIZER_VOCAB_SIZE: len(tokenizer)}


def model_attrs(runner) -> dict:
    """The model's shape; its parameter bytes once it is loaded."""
    spec = runner.spec
    attrs = {
        S.MODEL_ARCHITECTURE: spec.architecture, S.MODEL_LAYERS: spec.num_layers,
        S.MODEL_HIDDEN_SIZE: spec.hidden_size, S.MODEL_HEADS: spec.num_heads,
        S.MODEL_KV_HEADS: spec.num_kv_heads, S.MODEL_HEAD_DIM: spec.head_dim,
        S.MODEL_VOCAB_SIZE: spec.vocab_size, S.MODEL_DTYPE: str(runner.dtype).removeprefix("torch."),
        S.ATTENTION_BACKEND: runner.backend.name,
    }
    if runner.model is not None:
        attrs[S.MODEL_PARAMETER_BYTES] = runner.parameter_bytes
    return attrs


def tp_start_attrs(workers, config, spec) -> dict:
    attrs = {S.TP_SIZE: config.tensor_parallel_size}
    if workers is not None:
        attrs[S.TP_WORKER_PIDS] = workers.pids
    return attrs


def kv_cache_attrs(runner) -> dict:
    """The cache as planned: also on the span of an allocation that failed."""
    attrs = {S.BLOCK_SIZE: runner.block_size, S.KV_CACHE_BLOCK_BYTES: runner.block_bytes}
    blocks = runner.num_kvcache_blocks
    if blocks:
        attrs.update({S.BLOCKS_TOTAL: blocks, S.KV_CACHE_SHAPE: list(runner.kv_cache_shape(blocks)),
                      S.KV_CACHE_BYTES: blocks * runner.block_bytes})
    return attrs


def cuda_graph_attrs(runner) -> dict:
    prefill = runner.prefill_graphs
    return {S.CUDA_GRAPH_BATCH_SIZES: list(runner.graphs.sizes),
            S.CUDA_GRAPH_PREFILL_TOKENS: list(prefill.sizes) if prefill is not None else [],
            S.CUDA_GRAPH_TRITON_GEMV: [f"{role}: {','.join(map(str, counts))}"
                                       for role, counts in runner.gemv_choice.items()],
            S.CUDA_GRAPH_PROGRAMMATIC_LAUNCH: runner.programmatic_launch}


def batch_attrs(batch) -> dict:
    return {S.PHASE: batch.phase, S.NUM_SEQS: len(batch.seqs), S.NUM_BATCHED_TOKENS: batch.num_batched_tokens,
            S.NUM_PREFILL_TOKENS: batch.num_prefill_tokens, S.NUM_DECODE_TOKENS: batch.num_decode_tokens}


# ---- one function per step phase: attrs(result, *args of the phase), cheap (no loops over
# the batch, no device queries): they run for every step at `step` level. A phase that raised
# gets attrs(None, *args): what can be said without its result ---------------------------------

def schedule_attrs(batch) -> dict:
    attrs = batch_attrs(batch)
    attrs.update({
        S.NUM_CACHED_TOKENS: batch.num_cached_tokens,
        S.NUM_WAITING: batch.num_waiting, S.NUM_RUNNING: batch.num_running,
        S.NUM_PREEMPTED: len(batch.preempted), S.TOTAL_PREEMPTIONS: batch.total_preemptions,
        S.BLOCKS_FREE: batch.num_free_blocks, S.BLOCKS_USED: batch.num_used_blocks,
    })
    if batch.waiting_reason is not None:
        attrs[S.WAITING_REASON] = batch.waiting_reason
        if batch.waiting_blocks_needed:
            attrs[S.WAITING_BLOCKS_NEEDED] = batch.waiting_blocks_needed
    if batch.preempted:   # each needing sequence needed one block for its next token
        attrs.update({S.PREEMPTED_SEQ_IDS: [s.seq_id for s in batch.preempted], S.PREEMPTED_FOR: batch.preempted_for,
                      S.PREEMPTION_BLOCKS_NEEDED: len(set(batch.preempted_for)),
                      S.PREEMPTION_BLOCKS_FREE: batch.preemption_free_blocks,
                      S.BLOCKS_FREED: len(batch.preempt_freed_block_ids)})
    return attrs


def prepare_attrs(inputs, batch) -> dict:
    return batch_attrs(batch)


def forward_attrs(result, inputs) -> dict:
    ctx = inputs.ctx
    attrs = {
        S.PHASE: inputs.phase,
        S.SHAPE_PREFIX + "input_ids": shape(inputs.input_ids),
        S.SHAPE_PREFIX + "positions": shape(inputs.positions),
        S.SHAPE_PREFIX + "slot_mapping": shape(ctx.slot_mapping),
        S.SHAPE_PREFIX + "block_tables": shape(ctx.block_tables),
    }
    if result is not None:
        logits, used_graph = result
        attrs[S.SHAPE_PREFIX + "logits"] = shape(logits)
        attrs[S.CUDA_GRAPH] = used_graph
    if ctx.is_prefill:
        attrs[S.SHAPE_PREFIX + "cu_seqlens_q"] = shape(ctx.cu_seqlens_q)
        attrs[S.SHAPE_PREFIX + "cu_seqlens_k"] = shape(ctx.cu_seqlens_k)
    else:
        attrs[S.SHAPE_PREFIX + "context_lens"] = shape(ctx.context_lens)
    return attrs


def sample_attrs(result, logits, inputs) -> dict:
    attrs = {S.SHAPE_PREFIX + "logits": shape(logits),
             S.SAMPLE_PROMPT_LOGPROBS: sum(count for _, _, count in inputs.prompt_owners)}
    sampling = inputs.sampling
    if sampling is None:   # only prompt rows, for their log-probabilities
        return attrs
    return attrs | {
        S.SAMPLE_GREEDY: sampling.num_greedy,
        S.SAMPLE_TEMPERATURE_MIN: sampling.temperature_min, S.SAMPLE_TEMPERATURE_MAX: sampling.temperature_max,
        S.SAMPLE_TOP_K: sampling.top_ks is not None, S.SAMPLE_TOP_P: sampling.top_ps is not None,
        S.SAMPLE_MIN_P: sampling.min_ps is not None,
        S.SAMPLE_SEEDED: len(sampling.seeded_rows), S.SAMPLE_LOGPROBS: len(sampling.logprob_rows),
        S.SAMPLE_PENALIZED: 0 if sampling.penalties is None else len(sampling.penalties.rows),
        S.SAMPLE_BIASED: 0 if sampling.bias is None else sampling.bias.num_rows,
    }


def postprocess_attrs(finished, in_flight) -> dict:
    if finished is None:
        return batch_attrs(in_flight.batch)
    attrs = {S.TOKENS_APPENDED: len(in_flight.batch.sampled_seqs), S.FINISHED_SEQS: len(finished)}
    if finished:
        attrs[S.FINISHED_SEQ_IDS] = [f.seq.seq_id for f in finished]
        attrs[S.FINISH_REASONS] = [f.reason for f in finished]
        attrs[S.BLOCKS_FREED] = sum(len(f.freed_block_ids) for f in finished)
    return attrs


def block_allocate_attrs(batch) -> dict:
    """The block manager's work in one schedule, summed over its sequences."""
    return {
        S.PHASE: batch.phase,
        S.BLOCKS_SEQUENCES: len(batch.allocations) + batch.num_decode_tokens,   # admitted, decoding
        S.BLOCKS_NEW: sum(a.new_blocks for a in batch.allocations) + batch.new_decode_blocks,
        S.BLOCKS_CACHE_HITS: sum(a.cached_blocks for a in batch.allocations),
        S.BLOCKS_FREE: batch.num_free_blocks, S.BLOCKS_USED: batch.num_used_blocks,
    }


def sequence_allocate_attrs(allocation) -> dict:
    """At `debug`, one sequence's allocation, with its block ids."""
    return {S.SEQ_ID: allocation.seq_id, S.BLOCKS_NEW: allocation.new_blocks,
            S.BLOCKS_CACHE_HITS: allocation.cached_blocks, S.NUM_CACHED_TOKENS: allocation.cached_tokens,
            S.BLOCK_IDS: allocation.block_ids}


def part_attrs(part: str, index: int | None, input_shape: list[int], module, args, output) -> dict:
    """A part of the forward at `debug` (see the model's `traced_parts`): `input_shape` is that of
    what its first module took; `module`, `args` and `output` are its last module's (the output
    None when it raised)."""
    if part == "attention":
        return attention_attrs(module, args, output)
    attrs = {S.SHAPE_PREFIX + "input": input_shape}
    if index is not None:
        attrs[S.LAYER_INDEX] = index
    if part.endswith("_norm"):
        attrs[S.NORM_POSITION] = part.removesuffix("_norm")
        output = output[0] if isinstance(output, tuple) else output   # (normed, residual)
    attrs[S.SHAPE_PREFIX + "output"] = shape(output)
    return attrs


def attention_attrs(module, args, output) -> dict:
    """A layer's attention block, from the q/k/v projection to the output projection."""
    qkv, ctx = args[1], args[2]
    n, attn = qkv.shape[0], module.attn
    return {
        S.LAYER_INDEX: attn.layer_index, S.ATTENTION_PATH: "prefill" if ctx.is_prefill else "decode",
        S.SHAPE_PREFIX + "q": [n, module.num_heads, module.head_dim],
        S.SHAPE_PREFIX + "k": [n, module.num_kv_heads, module.head_dim],
        S.SHAPE_PREFIX + "v": [n, module.num_kv_heads, module.head_dim],
        S.SHAPE_PREFIX + "k_cache": shape(attn.k_cache), S.SHAPE_PREFIX + "v_cache": shape(attn.v_cache),
        S.SHAPE_PREFIX + "output": shape(output), S.ATTENTION_BACKEND: attn.backend.name,
    }


def request_attrs(seq, model_name: str, ended_as: str | None = None) -> dict:
    """`ended_as`: why a request that did not finish in the engine ended (abort, stop, shutdown)."""
    p = seq.params
    metrics = seq.metrics()
    attrs = {
        S.GEN_AI_REQUEST_MAX_TOKENS: p.max_tokens,
        S.GEN_AI_REQUEST_TEMPERATURE: float(p.temperature), S.GEN_AI_REQUEST_TOP_P: float(p.top_p),
        S.GEN_AI_USAGE_INPUT_TOKENS: seq.num_prompt_tokens,
        S.GEN_AI_USAGE_OUTPUT_TOKENS: seq.num_completion_tokens,
        S.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: min(seq.max_cached_tokens, seq.num_prompt_tokens),
        S.GEN_AI_RESPONSE_MODEL: model_name,
        S.GEN_AI_RESPONSE_FINISH_REASONS: [seq.finish_reason or ended_as or "error"],
        S.REQUEST_CACHED_TOKENS: seq.max_cached_tokens, S.REQUEST_PREEMPTIONS: seq.num_preemptions,
    }
    if p.top_k != -1:
        attrs[S.GEN_AI_REQUEST_TOP_K] = p.top_k
    if p.seed is not None:
        attrs[S.GEN_AI_REQUEST_SEED] = p.seed
    if p.presence_penalty:
        attrs[S.GEN_AI_REQUEST_PRESENCE_PENALTY] = float(p.presence_penalty)
    if p.frequency_penalty:
        attrs[S.GEN_AI_REQUEST_FREQUENCY_PENALTY] = float(p.frequency_penalty)
    if p.repetition_penalty != 1:
        attrs[S.REQUEST_REPETITION_PENALTY] = float(p.repetition_penalty)
    if p.min_tokens:
        attrs[S.REQUEST_MIN_TOKENS] = p.min_tokens
    if p.logit_bias:
        attrs[S.REQUEST_LOGIT_BIAS_TOKENS] = len(p.logit_bias)
    if p.prompt_logprobs is not None:
        attrs[S.REQUEST_PROMPT_LOGPROBS] = p.prompt_logprobs
    if seq.first_scheduled_ns:
        attrs[S.REQUEST_QUEUE_TIME_MS] = metrics["queue_time_ms"]
    if seq.first_token_ns:
        attrs[S.REQUEST_TTFT_MS] = metrics["time_to_first_token_ms"]
    return attrs


def content_attrs(seq, prompt, tokenizer, ended_as: str | None = None) -> dict:
    """Opt-in (trace_content_enabled): the prompt and the output as the GenAI conventions'
    messages (JSON strings), their token ids and, when the request asked for `logprobs`, the
    log-probabilities of each generated token and its top N as flat arrays. `prompt`: text,
    token ids or chat messages ({"role", "content"})."""
    output_ids = seq.completion_token_ids
    attrs = {S.REQUEST_PROMPT_TOKEN_IDS: seq.token_ids[:seq.num_prompt_tokens], S.REQUEST_OUTPUT_TOKEN_IDS: output_ids}
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        messages = [{"role": m["role"], "parts": [{"type": "text", "content": m["content"]}]} for m in prompt]
    elif isinstance(prompt, str) or tokenizer is not None:
        text = prompt if isinstance(prompt, str) else tokenizer.decode(attrs[S.REQUEST_PROMPT_TOKEN_IDS])
        messages = [{"role": "user", "parts": [{"type": "text", "content": text}]}]
    else:
        messages = None
    if messages is not None:
        attrs[S.GEN_AI_INPUT_MESSAGES] = json.dumps(messages, ensure_ascii=False)
    if tokenizer is not None:
        attrs[S.GEN_AI_OUTPUT_MESSAGES] = json.dumps([{
            "role": "assistant", "parts": [{"type": "text", "content": tokenizer.decode(output_ids,
                                                                                         skip_special_tokens=True)}],
            "finish_reason": seq.finish_reason or ended_as or "error"}], ensure_ascii=False)
    n = seq.params.logprobs
    if n is not None and seq.logprobs:
        chosen, top_ids, top_values = [], [], []
        for token, entry in zip(output_ids, seq.logprobs):   # entry: the top N, then the chosen one if not among them
            chosen.append(entry[token])
            for token_id, value in list(entry.items())[:n]:
                top_ids.append(token_id)
                top_values.append(value)
        attrs.update({S.REQUEST_LOGPROBS: chosen, S.REQUEST_TOP_LOGPROBS_N: n, S.REQUEST_TOP_TOKEN_IDS: top_ids,
                      S.REQUEST_TOP_LOGPROBS: top_values})
    return attrs
