"""A real OTLP/gRPC trace receiver on loopback for tests, plus a receiver that never answers and
a port nobody listens on (collector down)."""

import socket
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


def closed_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver):
        self.receiver = receiver

    def Export(self, request, context):
        self.receiver._received(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver):
        self.receiver = receiver

    def Export(self, request, context):
        with self.receiver._cond:
            self.receiver.resource_metrics.extend(request.resource_metrics)
            self.receiver._cond.notify_all()
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver:
    """Collects every ResourceSpans (and ResourceMetrics) sent to `endpoint`."""

    def __init__(self):
        self.resource_spans = []
        self.resource_metrics = []
        self.requests = 0
        self._cond = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self._servicer(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _servicer(self):
        return _Servicer(self)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _received(self, request) -> None:
        with self._cond:
            self.resource_spans.extend(request.resource_spans)
            self.requests += 1
            self._cond.notify_all()

    def spans(self) -> list[dict]:
        with self._cond:
            batches = list(self.resource_spans)
        out = []
        for rs in batches:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append({
                        "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "start_ns": s.start_time_unix_nano, "end_ns": s.end_time_unix_nano,
                        "attributes": _attrs(s.attributes),
                        "events": [{"name": e.name, "time_ns": e.time_unix_nano, "attributes": _attrs(e.attributes)}
                                   for e in s.events],
                        "links": [{"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()}
                                  for link in s.links],
                        "status_code": s.status.code, "resource": resource, "scope_name": ss.scope.name,
                    })
        return out

    def metrics(self) -> dict[str, list[dict]]:
        """Metric name -> its data points as received: attributes, and for histograms the
        bucket counts, bounds and exemplars (trace ids in hex); for sums and gauges the value."""
        with self._cond:
            batches = list(self.resource_metrics)
        out: dict[str, list[dict]] = {}
        for rm in batches:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    for p in getattr(m, kind).data_points:
                        point = {"attributes": _attrs(p.attributes), "kind": kind,
                                 "exemplars": [e.trace_id.hex() for e in p.exemplars]}
                        if kind == "histogram":
                            point.update(count=p.count, sum=p.sum, bounds=list(p.explicit_bounds),
                                         buckets=list(p.bucket_counts))
                        else:
                            point["value"] = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                        out.setdefault(m.name, []).append(point)
        return out

    def wait_for(self, predicate_or_count, timeout: float = 10.0) -> list[dict]:
        """Wait until `predicate(spans())` is true, or at least `count` spans arrived; returns spans().
        Raises TimeoutError with what did arrive."""
        if callable(predicate_or_count):
            predicate = predicate_or_count
        else:
            predicate = lambda spans: len(spans) >= predicate_or_count   # noqa: E731
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"receiver got {len(spans)} spans in {timeout}s: "
                                   f"{sorted({s['name'] for s in spans})}")
            with self._cond:
                self._cond.wait(min(left, 0.1))

    def stop(self) -> None:
        self._server.stop(grace=None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _HangingServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver):
        self.receiver = receiver

    def Export(self, request, context):
        with self.receiver._cond:
            self.receiver.requests += 1
            self.receiver._cond.notify_all()
        self.receiver._release.wait()
        context.abort(grpc.StatusCode.UNAVAILABLE, "receiver stopped")


class HangingReceiver(OtlpReceiver):
    """Accepts connections and export calls but never answers them (until stopped): a stuck collector."""

    def __init__(self):
        self._release = threading.Event()
        super().__init__()

    def _servicer(self):
        return _HangingServicer(self)

    def stop(self) -> None:
        self._release.set()
        super().stop()


if __name__ == "__main__":
    # A receiver in a process of its own (the benchmark's, so that decoding spans never
    # competes with the engine for the GIL): prints its port, then, when stdin closes,
    # the number of spans it received.
    import sys

    receiver = OtlpReceiver()
    print(receiver.port, flush=True)
    sys.stdin.read()
    print(len(receiver.spans()), flush=True)
    receiver.stop()
