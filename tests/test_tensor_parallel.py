"""Tensor parallelism on the CPU over gloo, for real: two ranks, the second a worker process.
Greedy outputs against transformers and a single rank, the bad sizes refused before any
process starts, each rank's spans under its step, and a worker that dies or hangs (or a rank
0 that dies) leaving no process behind."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from otvllm import SamplingParams
from otvllm.synthetic import write_model
from otvllm.tracing import schema as S
from tests.helpers import PROMPTS as TRACED_PROMPTS
from tests.helpers import by_name, make_llm, random_prompts, traced_run, two_ranks
from tests.reference import hf_greedy

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = random_prompts([3, 21, 45], seed=14)

# The variants of tests/helpers.py whose heads divide by 2 (qwen2's one KV head does not),
# and two more: Qwen2 with two KV heads (q/k/v biases), and Llama with every bias and a
# vocabulary that does not divide (the last rank's slice of it is padded).
VARIANTS = ["qwen3", "qwen3-untied", "llama", "llama3-rope", "mistral"]
EXTRA = {
    "qwen2-kv2": dict(architecture="Qwen2ForCausalLM", num_key_value_heads=2),
    "llama-biases-odd-vocab": dict(architecture="LlamaForCausalLM", attention_bias=True, mlp_bias=True,
                                   vocab_size=321, tie_word_embeddings=False),
}



def token_ids(outputs):
    return [o.token_ids for o in outputs]


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, within_s=30.0) -> list[int]:
    """The pids still running after waiting up to `within_s` for them to end."""
    deadline = time.monotonic() + within_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def with_random_biases(model_dir: str) -> str:
    """The model with random biases (transformers initialises them to zero, where a bias
    added by each rank instead of once would go unseen)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    return model_dir


@pytest.mark.parametrize("variant", VARIANTS + sorted(EXTRA))
def test_two_ranks_give_the_greedy_tokens_of_one_rank_and_of_transformers(model_dirs, tmp_path, variant):
    if variant in EXTRA:
        model_dir = with_random_biases(write_model(str(tmp_path / variant), seed=3, **EXTRA[variant]))
    else:
        model_dir = model_dirs(variant)
    expected = [hf_greedy(model_dir, p, PARAMS.max_tokens) for p in PROMPTS]
    assert token_ids(make_llm(model_dir).generate(PROMPTS, PARAMS, use_tqdm=False)) == expected
    # Small steps: the 45-token prompt is prefilled in chunks, next to decodes.
    with two_ranks(model_dir, max_num_batched_tokens=16, max_num_seqs=4) as llm:
        assert token_ids(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == expected
        # Each rank holds half the KV heads (its KV cache, half the size).
        assert llm.engine.runner.kv_cache.shape[-2] == llm.engine.spec.num_kv_heads // 2


@pytest.mark.parametrize("variant, size, message", [
    ("qwen2", 2, "tensor_parallel_size=2 does not divide num_key_value_heads=1"),
    ("qwen3", 3, "tensor_parallel_size=3 does not divide num_attention_heads=4"),
    ("mistral", 4, "tensor_parallel_size=4 does not divide num_key_value_heads=2"),
    ("qwen3", 0, "tensor_parallel_size must be a positive integer, got 0"),
])
def test_sizes_that_do_not_split_the_model_are_refused_before_any_process_starts(model_dirs, variant, size,
                                                                                 message):
    with pytest.raises(ValueError, match=message):
        make_llm(model_dirs(variant), tensor_parallel_size=size)
    assert multiprocessing.active_children() == []


def test_each_rank_has_its_spans_under_the_step_and_in_engine_init(qwen3_dir):
    """Through a real OTLP receiver: every detailed step's model.forward has one child per rank,
    rank 1's from the worker's process; engine.init shows each rank's load and KV cache."""
    spans, outputs, llm = traced_run(qwen3_dir, tensor_parallel_size=2)
    try:
        worker_pids = llm.engine.workers.pids
    finally:
        llm.close()
    assert token_ids(outputs) == [hf_greedy(qwen3_dir, p, 6) for p in TRACED_PROMPTS]
    by_id = {s["span_id"]: s for s in spans}
    forwards = by_name(spans, S.FORWARD)
    assert forwards
    for forward in forwards:
        children = [s for s in spans if s["parent_span_id"] == forward["span_id"]]
        assert sorted(c["name"] for c in children) == [S.rank_name(S.FORWARD, 0), S.rank_name(S.FORWARD, 1)]
        ranks = {c["attributes"][S.TP_RANK]: c for c in children}
        assert ranks[0]["attributes"][S.TP_PID] == os.getpid()
        assert ranks[1]["attributes"][S.TP_PID] == worker_pids[0]
        for child in children:
            assert child["trace_id"] == forward["trace_id"]
            # 2 layers x 2 all-reduces, the embedding's, the logits' gather and the input broadcast
            assert child["attributes"][S.TP_COLLECTIVES] == 2 * 2 + 1 + 1 + 1
            assert child["attributes"][S.TP_COLLECTIVE_MS] >= 0
        assert S.is_step(by_id[forward["parent_span_id"]]["name"])

    init = by_name(spans, S.ENGINE_INIT)[0]
    (start,) = by_name(spans, S.TP_START)
    assert start["parent_span_id"] == init["span_id"]
    assert start["attributes"][S.TP_WORKER_PIDS] == worker_pids
    with open(os.path.join(qwen3_dir, "config.json")) as f:
        kv_heads = json.load(f)["num_key_value_heads"]
    for phase in (S.MODEL_LOAD, S.KV_CACHE_ALLOCATE):
        (parent,) = by_name(spans, phase)
        children = sorted((s for s in spans if s["parent_span_id"] == parent["span_id"]),
                          key=lambda s: s["attributes"][S.TP_RANK])
        assert [c["name"] for c in children] == [S.rank_name(phase, 0), S.rank_name(phase, 1)]
        if phase == S.KV_CACHE_ALLOCATE:   # [2, layers, blocks, block size, KV heads, head dim]
            assert [c["attributes"][S.KV_CACHE_SHAPE][4] for c in children] == [kv_heads // 2] * 2
        else:   # each rank holds half the checkpoint's weights, and the norms whole
            assert [c["attributes"][S.MODEL_PARAMETER_BYTES] for c in children] == [rank_bytes(qwen3_dir)] * 2


def rank_bytes(model_dir) -> int:
    """Bytes of float32 weights a rank of two holds, from the checkpoint's tensors: half of each
    but the norms, which each rank holds whole."""
    from safetensors import safe_open
    halves = norms = 0
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            numel = 1
            for n in f.get_slice(name).get_shape():
                numel *= n
            if "norm" in name:
                norms += numel
            else:
                halves += numel
    return (halves // 2 + norms) * 4


# ---- faults, each in a process of its own ----------------------------------------------------------

FAULT_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    from otvllm import SamplingParams
    from otvllm.tracing import configure
    from tests.helpers import make_llm

    model_dir, fault, trace_file = sys.argv[1:4]
    session = configure(trace_file=trace_file)
    llm = make_llm(model_dir, tensor_parallel_size=2, trace_level="step")
    worker = llm.engine.workers.pids[0]
    print(json.dumps({"worker": worker}), flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([[5, 6, 7]], params, use_tqdm=False)
    if fault == "rank0":
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(worker, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    errors = []
    for _ in range(2):   # the failed call, then one on the engine that lost its rank
        try:
            llm.generate([[5, 6, 7]], params, use_tqdm=False)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    print(json.dumps({"errors": errors}), flush=True)
    llm.close()
    session.shutdown()
""")


def run_fault(model_dir, tmp_path, fault: str):
    import otvllm
    trace = tmp_path / "trace.json"
    env = dict(os.environ, OTVLLM_TP_TIMEOUT_S="5",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(otvllm.__file__)), os.getcwd()]))
    result = subprocess.run([sys.executable, "-c", FAULT_SCRIPT, model_dir, fault, str(trace)],
                            capture_output=True, text=True, env=env, timeout=300)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return result, lines, trace


def error_spans(trace):
    spans = [s for t in json.loads(trace.read_text())["data"] for s in t["spans"]]
    failed = []
    for s in spans:
        tags = {t["key"]: t["value"] for t in s["tags"]}
        if tags.get("otel.status_code") == "ERROR" or tags.get("error") is True:
            failed.append((s["operationName"], tags))
    return failed


@pytest.mark.parametrize("fault, what", [("kill", "died (killed by SIGKILL)"),
                                         ("hang", "did not answer")])
def test_a_worker_that_dies_or_hangs_fails_the_call_naming_its_rank(qwen3_dir, tmp_path, fault, what):
    result, lines, trace = run_fault(qwen3_dir, tmp_path, fault)
    assert result.returncode == 0, result.stderr
    worker, errors = lines[0]["worker"], lines[1]["errors"]
    assert len(errors) == 2
    assert errors[0].startswith(f"RankFailed: tensor-parallel rank 1 (pid {worker}) {what}"), errors[0]
    assert "rank 1" in errors[1]
    assert not alive(worker)
    forwards = [tags for name, tags in error_spans(trace) if name == S.FORWARD]
    assert forwards and forwards[0][S.TP_FAILED_RANK] == 1
    assert forwards[0][S.ERROR_TYPE] == "TensorParallelRankFailed"


def test_workers_exit_when_rank_0_dies(qwen3_dir, tmp_path):
    result, lines, _ = run_fault(qwen3_dir, tmp_path, "rank0")
    assert result.returncode == -signal.SIGKILL
    assert wait_gone([lines[0]["worker"]]) == []
