"""The test receiver decodes what the SDK's OTLP/gRPC exporter sends."""

import socket

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from tests.otlp_receiver import OtlpReceiver, closed_port


def test_sdk_exporter_delivers_to_receiver():
    with OtlpReceiver() as receiver:
        provider = TracerProvider(resource=Resource.create({"service.name": "otvllm-test"}))
        provider.add_span_processor(SimpleSpanProcessor(
            OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True, timeout=5)))
        tracer = provider.get_tracer("otvllm", "1.0")
        with tracer.start_as_current_span("llm.generate") as root:
            with tracer.start_as_current_span("engine.step", attributes={
                    "otvllm.step.index": 3, "otvllm.phase": "decode", "otvllm.forward.gpu_time_ms": 1.5,
                    "otvllm.forward.cuda_graph": True, "otvllm.shape.logits": [4, 151936],
                    "otvllm.postprocess.finish_reasons": ["stop"]}) as step:
                step.add_event("first_token", {"otvllm.step.index": 3})
                step.set_status(Status(StatusCode.ERROR, "x"))
        spans = receiver.wait_for(2, timeout=10)
        provider.shutdown()

    by_name = {s["name"]: s for s in spans}
    gen, step = by_name["llm.generate"], by_name["engine.step"]
    assert gen["parent_span_id"] == ""
    assert step["parent_span_id"] == gen["span_id"]
    assert step["trace_id"] == gen["trace_id"] == f"{root.get_span_context().trace_id:032x}"
    assert len(step["span_id"]) == 16 and len(step["trace_id"]) == 32
    assert step["attributes"] == {"otvllm.step.index": 3, "otvllm.phase": "decode",
                                  "otvllm.forward.gpu_time_ms": 1.5, "otvllm.forward.cuda_graph": True,
                                  "otvllm.shape.logits": [4, 151936], "otvllm.postprocess.finish_reasons": ["stop"]}
    event, = step["events"]
    assert event["name"] == "first_token" and event["attributes"] == {"otvllm.step.index": 3}
    assert step["start_ns"] <= event["time_ns"] <= step["end_ns"]
    assert step["status_code"] == StatusCode.ERROR.value
    assert step["resource"]["service.name"] == "otvllm-test"
    assert step["scope_name"] == "otvllm"
    assert gen["start_ns"] <= step["start_ns"] <= step["end_ns"] <= gen["end_ns"]


def test_closed_port_refuses():
    port = closed_port()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_hanging_receiver_never_answers():
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tests.otlp_receiver import HangingReceiver

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("t").start_as_current_span("x"):
        pass
    with HangingReceiver() as receiver:
        exporter = OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True, timeout=1)
        assert exporter.export(memory.get_finished_spans()) == SpanExportResult.FAILURE
        assert receiver.requests >= 1 and receiver.spans() == []
