"""The trace file is the Jaeger JSON that Jaeger UI's Upload tab opens (jaeger model/json)."""

import json
import os
import re
import threading
import time

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from otvllm.tracing.export.jaeger_file import JaegerJsonFileExporter, spans_to_jaeger
from otvllm.tracing.tools.jaeger_reader import load_jaeger_json

JSON_TYPES = {"string": str, "bool": bool, "int64": int, "float64": float}


def _tags(items) -> dict:
    return {t["key"]: t for t in items}


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "out" / "trace.json"
    provider = TracerProvider(resource=Resource.create({"service.name": "otvllm-test", "host.name": "box"}))
    exporter = JaegerJsonFileExporter(str(path))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("otvllm", "9.9.9")

    with tracer.start_as_current_span("llm.generate", kind=SpanKind.SERVER) as root:
        root.set_attribute("otvllm.generate.requests", 2)
        with tracer.start_as_current_span("engine.step", attributes={
                "otvllm.phase": "prefill", "otvllm.step.index": 0, "otvllm.batch.num_seqs": 2}) as step:
            step.add_event("scheduled", {"otvllm.step.index": 0, "otvllm.batch.num_cached_tokens": 16})
            with tracer.start_as_current_span("model.forward", attributes={
                    "otvllm.shape.input_ids": [156], "otvllm.shape.logits": [2, 151936],
                    "otvllm.forward.cuda_graph": False, "otvllm.forward.gpu_time_ms": 1.25,
                    "otvllm.cuda.memory.peak_bytes": 3 << 30, "otvllm.attention.backend": "triton",
                    "otvllm.postprocess.finish_reasons": ["stop", "length"],
                    "otvllm.sampling.temperature_max": float("nan")}):
                pass
        with tracer.start_as_current_span("scheduler.postprocess") as failing:
            failing.set_status(Status(StatusCode.ERROR, "boom"))
    with tracer.start_as_current_span("engine.init"):
        with tracer.start_as_current_span("model.load"):
            pass
    provider.shutdown()   # writes the file
    return path


def test_file_has_one_entry_per_trace(trace_file):
    traces = load_jaeger_json(str(trace_file))
    assert len(traces) == 2
    # newest first, as Jaeger UI lists search results
    names = [sorted(s["operationName"] for s in t["spans"]) for t in traces]
    assert names == [["engine.init", "model.load"],
                     ["engine.step", "llm.generate", "model.forward", "scheduler.postprocess"]]
    for t in traces:
        assert re.fullmatch(r"[0-9a-f]{32}", t["traceID"])
        assert {s["traceID"] for s in t["spans"]} == {t["traceID"]}
    assert traces[0]["traceID"] != traces[1]["traceID"]


def test_documented_span_fields(trace_file):
    now_us = time.time_ns() // 1000
    for t in load_jaeger_json(str(trace_file)):
        ids = {s["spanID"] for s in t["spans"]}
        assert len(ids) == len(t["spans"])
        for s in t["spans"]:
            assert re.fullmatch(r"[0-9a-f]{16}", s["spanID"])
            assert s["processID"] in t["processes"]
            assert type(s["startTime"]) is int and type(s["duration"]) is int
            assert now_us - 3600 * 10**6 < s["startTime"] <= now_us
            assert s["duration"] >= 0
            assert s["flags"] == 1   # sampled
            for ref in s["references"]:
                assert ref["refType"] == "CHILD_OF" and ref["traceID"] == t["traceID"]
                assert ref["spanID"] in ids
            for tag in s["tags"] + [f for log in s["logs"] for f in log["fields"]]:
                assert type(tag["value"]) is JSON_TYPES[tag["type"]], tag
        roots = [s for s in t["spans"] if not s["references"]]
        assert len(roots) == 1
        assert t["processes"] == {"p1": {"serviceName": "otvllm-test", "tags": t["processes"]["p1"]["tags"]}}
        process_tags = _tags(t["processes"]["p1"]["tags"])
        assert process_tags["host.name"] == {"key": "host.name", "type": "string", "value": "box"}
        assert "service.name" not in process_tags


def test_parents_tags_logs_status(trace_file):
    spans = {s["operationName"]: s for t in load_jaeger_json(str(trace_file)) for s in t["spans"]}
    parent = {name: (s["references"][0]["spanID"] if s["references"] else None) for name, s in spans.items()}
    by_id = {s["spanID"]: name for name, s in spans.items()}
    assert parent["llm.generate"] is None
    assert by_id[parent["engine.step"]] == "llm.generate"
    assert by_id[parent["model.forward"]] == "engine.step"
    assert by_id[parent["scheduler.postprocess"]] == "llm.generate"
    assert by_id[parent["model.load"]] == "engine.init"

    forward = _tags(spans["model.forward"]["tags"])
    assert forward["otvllm.shape.logits"] == {"key": "otvllm.shape.logits", "type": "string", "value": "[2, 151936]"}
    assert json.loads(forward["otvllm.postprocess.finish_reasons"]["value"]) == ["stop", "length"]
    assert forward["otvllm.forward.cuda_graph"]["value"] is False and forward["otvllm.forward.cuda_graph"]["type"] == "bool"
    assert forward["otvllm.forward.gpu_time_ms"] == {"key": "otvllm.forward.gpu_time_ms", "type": "float64", "value": 1.25}
    assert forward["otvllm.cuda.memory.peak_bytes"] == {"key": "otvllm.cuda.memory.peak_bytes", "type": "int64",
                                                       "value": 3 << 30}
    assert forward["otvllm.sampling.temperature_max"]["type"] == "string"   # NaN is not JSON
    assert forward["otel.scope.name"]["value"] == "otvllm"
    assert forward["otel.scope.version"]["value"] == "9.9.9"
    assert "span.kind" not in forward and "error" not in forward

    assert _tags(spans["llm.generate"]["tags"])["span.kind"]["value"] == "server"

    step = spans["engine.step"]
    assert len(step["logs"]) == 1
    log = step["logs"][0]
    fields = _tags(log["fields"])
    assert fields["event"] == {"key": "event", "type": "string", "value": "scheduled"}
    assert fields["otvllm.batch.num_cached_tokens"]["value"] == 16
    assert step["startTime"] <= log["timestamp"] <= step["startTime"] + step["duration"]

    failed = _tags(spans["scheduler.postprocess"]["tags"])
    assert failed["error"] == {"key": "error", "type": "bool", "value": True}
    assert failed["otel.status_code"]["value"] == "ERROR"
    assert failed["otel.status_description"]["value"] == "boom"


def test_spans_to_jaeger_groups_by_trace_and_keeps_resources_apart():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    memory = InMemorySpanExporter()
    for service in ("a", "b"):
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(memory))
        with provider.get_tracer("t").start_as_current_span("root"):
            pass
    doc = spans_to_jaeger(list(memory.get_finished_spans()))
    assert [[p["serviceName"] for p in t["processes"].values()] for t in doc["data"]] == [["b"], ["a"]]
    assert spans_to_jaeger([])["data"] == []


def test_exporter_accumulates_across_exports_and_threads(tmp_path):
    path = tmp_path / "t.json"
    exporter = JaegerJsonFileExporter(str(path))
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")

    def work(i):
        for j in range(20):
            with tracer.start_as_current_span(f"root{i}"):
                with tracer.start_as_current_span("child"):
                    pass

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert exporter.force_flush()
    traces = load_jaeger_json(str(path))
    assert len(traces) == 80 and all(len(t["spans"]) == 2 for t in traces)
    provider.shutdown()
    assert len(load_jaeger_json(str(path))) == 80
    assert [f for f in os.listdir(tmp_path) if f != "t.json"] == []   # no temp files left behind
