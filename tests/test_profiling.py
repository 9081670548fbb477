"""The kernel-level view (OTVLLM_TRACE_PROFILE_STEPS): chosen steps' forwards under
torch.profiler, their operators as child spans of model.forward, and the summary's top
operators (and GPU telemetry)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otvllm import LLM
from otvllm.layers.basic import MergedLinear
from otvllm.tracing import schema as S
from tests.helpers import PARAMS, PROMPTS, by_name, make_llm, recorded_spans, traced_run


def linear_layers(llm) -> int:
    """The model's linear layers: each runs once per forward, as one aten::linear."""
    return sum(isinstance(m, (torch.nn.Linear, MergedLinear)) for m in llm.engine.runner.model.modules())


@pytest.fixture(scope="module")
def profiled_run(qwen3_dir):
    """Steps 0 (the prefill) and 4 profiled, at most 5 operator spans each; step 4 would not be
    detailed otherwise (one first step, no last steps)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTVLLM_TRACE_PROFILE_STEPS", "0,4")
        env.setenv("OTVLLM_TRACE_PROFILE_KERNELS", "5")
        env.setenv("OTVLLM_TRACE_FIRST_STEPS", "1")
        env.setenv("OTVLLM_TRACE_LAST_STEPS", "0")
        return traced_run(qwen3_dir)


def children_of(spans, parent):
    return [s for s in spans if s["parent_span_id"] == parent["span_id"]]


def test_profiled_steps_have_bounded_operator_spans_within_their_forward(profiled_run):
    spans, _, llm = profiled_run
    steps = {s["attributes"][S.STEP_INDEX]: s for s in by_name(spans, S.STEP)}
    profiled = {i for i, s in steps.items() if s["attributes"][S.STEP_DETAIL_REASON] == "profile"}
    assert profiled == {0, 4}
    for index, step in steps.items():
        forward = [c for c in children_of(spans, step) if c["name"] == S.FORWARD][0]
        kernels = children_of(spans, forward)
        if index not in profiled:
            assert kernels == [] and S.PROFILE_KERNELS not in forward["attributes"]
            continue
        named = sorted((k for k in kernels if k["name"] != S.KERNELS_OTHER), key=lambda k: k["start_ns"])
        other = [k for k in kernels if k["name"] == S.KERNELS_OTHER]
        assert len(named) == 5 and len(other) == 1                       # bounded
        for k in kernels:                                                 # on the span clock, inside the forward
            assert forward["start_ns"] <= k["start_ns"] <= k["end_ns"] <= forward["end_ns"], k["name"]
            assert k["attributes"][S.KERNEL_DEVICE] == "cpu"
        for k in named:
            assert k["name"].startswith("aten::") and k["attributes"][S.KERNEL_NAME] == k["name"]
        for a, b in zip(named, named[1:]):                                # the forward's own calls: no nesting
            assert a["end_ns"] <= b["start_ns"]
        # The longest operators have spans; the rest are counted in kernels.other.
        shortest_named = min(k["end_ns"] - k["start_ns"] for k in named)
        a = forward["attributes"]
        rest = other[0]["attributes"]
        assert a[S.PROFILE_KERNELS] == len(named) + rest[S.KERNEL_COUNT]
        assert rest[S.KERNEL_TIME_MS] <= rest[S.KERNEL_COUNT] * shortest_named / 1e6
        named_ms = sum(k["end_ns"] - k["start_ns"] for k in named) / 1e6
        assert a[S.PROFILE_TIME_MS] == pytest.approx(named_ms + rest[S.KERNEL_TIME_MS], abs=1e-5)
        assert a[S.PROFILE_TIME_MS] <= (forward["end_ns"] - forward["start_ns"]) / 1e6
        # Per name: every linear layer of the model ran once, the embedding once.
        calls = dict(zip(a[S.PROFILE_TOP_NAMES], a[S.PROFILE_TOP_CALLS]))
        assert calls["aten::linear"] == linear_layers(llm)
        assert calls["aten::embedding"] == 1
        assert a[S.PROFILE_TOP_TIME_MS] == sorted(a[S.PROFILE_TOP_TIME_MS], reverse=True)


def test_every_operator_of_a_profiled_forward_with_its_shapes(qwen3_dir, monkeypatch):
    """All operators kept: each linear layer's call, with the shapes the forward ran on."""
    monkeypatch.setenv("OTVLLM_TRACE_PROFILE_STEPS", "0-1")
    monkeypatch.setenv("OTVLLM_TRACE_PROFILE_KERNELS", "100000")
    with recorded_spans() as memory:
        llm = make_llm(qwen3_dir, max_model_len=128, max_num_batched_tokens=256)
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    spans = memory.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    spec = llm.engine.spec
    forwards = [s for s in spans if s.name == S.FORWARD and S.PROFILE_KERNELS in s.attributes]
    assert len(forwards) == 2
    for forward in forwards:
        ops = [s for s in spans if s.parent is not None and s.parent.span_id == forward.context.span_id]
        assert ops and S.KERNELS_OTHER not in {s.name for s in ops}
        assert len(ops) == forward.attributes[S.PROFILE_KERNELS]
        assert by_id[forward.parent.span_id].attributes[S.STEP_DETAIL_REASON] == "profile"
        tokens = forward.attributes[S.SHAPE_PREFIX + "input_ids"][0]
        seqs = forward.attributes[S.SHAPE_PREFIX + "logits"][0]
        linears = [s for s in ops if s.name == "aten::linear"]
        assert len(linears) == linear_layers(llm)
        rows, widths = set(), set()
        for op in linears:
            x, weight = json.loads(op.attributes[S.KERNEL_INPUT_SHAPES])[:2]
            assert x[1] == weight[1]
            rows.add(x[0])
            widths.add(weight[1])
        # Every layer's input has the forward's tokens, the output head's one row per sequence.
        assert rows == {tokens, seqs}
        assert spec.hidden_size in widths


@pytest.mark.parametrize("variable, value, message", [
    ("OTVLLM_TRACE_PROFILE_STEPS", "3,x", "OTVLLM_TRACE_PROFILE_STEPS='3,x': expected step indexes"),
    ("OTVLLM_TRACE_PROFILE_STEPS", "5-2", "OTVLLM_TRACE_PROFILE_STEPS='5-2'"),
    ("OTVLLM_TRACE_PROFILE_STEPS", "-1", "OTVLLM_TRACE_PROFILE_STEPS='-1'"),
    ("OTVLLM_TRACE_PROFILE_KERNELS", "0", "OTVLLM_TRACE_PROFILE_KERNELS='0': expected an integer >= 1"),
])
def test_bad_profile_settings_are_named_before_any_work(qwen3_dir, monkeypatch, tmp_path, variable, value, message):
    monkeypatch.setenv("OTVLLM_TRACE_PROFILE_STEPS", "1")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(qwen3_dir, device="cpu", max_model_len=128)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "OTVLLM_TRACE_PROFILE_STEPS": "1", variable: value}
    result = subprocess.run([sys.executable, "-m", "otvllm", "generate", "--model", qwen3_dir, "--prompt", "hi",
                             "--device", "cpu"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otvllm: error: ") and message in lines[0], lines
    assert list(tmp_path.glob("otvllm-trace-*")) == []   # refused before the run: no trace file


def test_summary_prints_the_top_operators_and_gpu_telemetry(tmp_path):
    """Figures chosen here, on spans as a trace file holds them."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource

    from otvllm.tracing.export.jaeger_file import JaegerJsonFileExporter
    from otvllm.tracing.tools.summary import summarize_file

    path = tmp_path / "trace.json"
    provider = TracerProvider(resource=Resource.create({"service.name": "otvllm"}))
    provider.add_span_processor(SimpleSpanProcessor(JaegerJsonFileExporter(str(path))))
    tracer = provider.get_tracer("otvllm")
    t0 = 1_760_000_000_000_000_000
    gen = tracer.start_span(S.GENERATE, start_time=t0)
    profiles = [  # (names, ms, calls, kernels, total ms) of two profiled forwards
        (["gemm", "attention", "rope"], [6.0, 3.0, 0.5], [4, 2, 2], 12, 10.0),
        (["attention", "gemm", "norm"], [5.0, 2.5, 1.0], [2, 4, 4], 14, 9.0),
    ]
    telemetry = [(80, 1980, 400.0, 61), (40, 1500, 300.0, 65)]
    for i, ((names, ms, calls, kernels, total), (util, clock, power, temp)) in enumerate(zip(profiles, telemetry)):
        step = tracer.start_span(S.step_name("decode"), context=trace.set_span_in_context(gen), start_time=t0 + i * 10**7,
                                 attributes={S.STEP_INDEX: i, S.PHASE: "decode", S.GPU_UTILIZATION: util,
                                             S.GPU_SM_CLOCK: clock, S.GPU_POWER: power, S.GPU_TEMPERATURE: temp})
        forward = tracer.start_span(S.FORWARD, context=trace.set_span_in_context(step), start_time=t0 + i * 10**7,
                                    attributes={S.PROFILE_DEVICE: "cuda", S.PROFILE_TOP_NAMES: names,
                                                S.PROFILE_TOP_TIME_MS: ms, S.PROFILE_TOP_CALLS: calls,
                                                S.PROFILE_KERNELS: kernels, S.PROFILE_TIME_MS: total})
        forward.end(end_time=t0 + i * 10**7 + 9 * 10**6)
        step.end(end_time=t0 + (i + 1) * 10**7)
    gen.end(end_time=t0 + 3 * 10**7)
    provider.shutdown()
    lines = summarize_file(str(path)).splitlines()
    head = next(i for i, line in enumerate(lines) if "top CUDA kernels by time" in line)
    assert "over 2 profiled steps (26 kernels, 19.000 ms)" in lines[head]
    rows = [line.split() for line in lines[head + 1:head + 5]]
    # Summed over the two steps, by time, most first: gemm 8.5 ms of 19 (8 calls), attention 8
    # (4 calls), norm 1 (4 calls), rope 0.5 (2 calls).
    assert [r[:5] for r in rows] == [["gemm", "8.500", "ms", "44.7%", "8"], ["attention", "8.000", "ms", "42.1%", "4"],
                                     ["norm", "1.000", "ms", "5.3%", "4"], ["rope", "0.500", "ms", "2.6%", "2"]]
    gpu = next(line for line in lines if line.strip().startswith("GPU (NVML"))
    assert "2 detailed steps" in gpu and "utilisation 60% mean, 80% max" in gpu
    assert "SM clock 1740 MHz mean, 1980 MHz max" in gpu and "power 350 W mean, 400 W max" in gpu
    assert "temperature 63 C mean, 65 C max" in gpu


def test_a_profiled_step_that_fails_is_detailed_as_an_error(qwen3_dir, monkeypatch):
    from opentelemetry.trace import StatusCode

    monkeypatch.setenv("OTVLLM_TRACE_PROFILE_STEPS", "1")
    with recorded_spans() as memory:
        llm = make_llm(qwen3_dir, max_model_len=128, max_num_batched_tokens=256)
        real_sample, calls = llm.engine.runner.sample, []

        def sample(*args):
            calls.append(1)
            if len(calls) == 2:   # step 1, after its profiled forward
                raise RuntimeError("sampler exploded")
            return real_sample(*args)

        monkeypatch.setattr(llm.engine.runner, "sample", sample)
        with pytest.raises(RuntimeError, match="sampler exploded"):
            llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    spans = memory.get_finished_spans()
    step = [s for s in spans if S.is_step(s.name) and s.attributes[S.STEP_INDEX] == 1][0]
    assert step.attributes[S.STEP_DETAIL_REASON] == "error" and step.status.status_code == StatusCode.ERROR
    forward = [s for s in spans if s.name == S.FORWARD and s.parent.span_id == step.context.span_id][0]
    assert forward.attributes[S.PROFILE_KERNELS] > 0   # its forward's profile is kept
    assert any(s.parent is not None and s.parent.span_id == forward.context.span_id for s in spans)


class _KernelEvent:
    """A device event of torch's profiler whose metadata is `text` (torch 2.11 gives '' for kernels)."""

    def __init__(self, text: str):
        self.text = text

    def name(self) -> str:
        return "void gemm_kernel<128, 64>()"

    def metadata_json(self) -> str:
        return self.text


def test_a_kernels_grid_and_block_are_read_where_the_profiler_gives_them():
    from otvllm.tracing.recording.profiler import _kernel_attrs

    # the fields as Kineto's chrome-trace logger writes a kernel's launch
    text = ('"queued": 0, "device": 0, "context": 1, "stream": 7, "correlation": 311, "registers per thread": 128, '
            '"shared memory": 49152, "blocks per SM": 1.5, "warps per SM": 12.0, "grid": [198, 1, 4], '
            '"block": [256, 1, 1], "est. achieved occupancy %": 25')
    attrs = _kernel_attrs(_KernelEvent(text), cuda=True)
    assert attrs[S.KERNEL_GRID] == [198, 1, 4] and attrs[S.KERNEL_BLOCK] == [256, 1, 1]
    assert attrs[S.KERNEL_NAME] == "void gemm_kernel<128, 64>()" and attrs[S.KERNEL_DEVICE] == "cuda"
    empty = _kernel_attrs(_KernelEvent(""), cuda=True)
    assert S.KERNEL_GRID not in empty and S.KERNEL_BLOCK not in empty
