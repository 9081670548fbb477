"""OTLP over HTTP/protobuf, chosen by the standard OTEL_* variables alone."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from otvllm import SamplingParams
from otvllm.tracing import configure
from otvllm.tracing import schema as S
from tests.helpers import make_llm


class _Collector(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        self.server.received.append((self.path, self.headers.get("x-team"), request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    def log_message(self, *args):
        pass


def test_http_protobuf_export_from_environment_variables(qwen3_dir, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    server.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-team=inference")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "otvllm-http")
    session = configure()
    try:
        llm = make_llm(qwen3_dir)
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    finally:
        report = session.shutdown()
        server.shutdown()
    assert report.result["network"]["failed"] == 0
    assert {path for path, _, _ in server.received} == {"/v1/traces"}
    assert {team for _, team, _ in server.received} == {"inference"}
    spans = [(rs, span) for _, _, request in server.received for rs in request.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    names = [span.name for _, span in spans]
    assert names.count(S.GENERATE) == 1 and sum(map(S.is_step, names)) == 3 and S.ENGINE_INIT in names
    services = {kv.value.string_value for rs, _ in spans for kv in rs.resource.attributes if kv.key == "service.name"}
    assert services == {"otvllm-http"}


def test_sdk_disabled_exports_nothing(monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    session = configure()
    assert session.sink is None and session.shutdown() is None
