"""`configure()`: otvllm sets up tracing itself (the CLI, the benchmark, the compose demo).

Applications that own a TracerProvider do not call this: otvllm's spans go to their
provider. Honours the standard variables: OTEL_SDK_DISABLED, OTEL_SERVICE_NAME,
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
OTEL_EXPORTER_OTLP_PROTOCOL (grpc, http/protobuf), OTEL_EXPORTER_OTLP_TIMEOUT (headers
and certificates are read by the OTLP exporters themselves). Every OTEL_* variable
(otvllm/environment.py) is checked before the export process starts.
"""

import sys
from urllib.parse import urlsplit

from otvllm.environment import check as check_environment
from otvllm.environment import read, read_first, redact
from otvllm.tracing.export.process_sink import ProcessSink
from otvllm.tracing.export.trace_file import check_trace_path, file_mode
from otvllm.tracing.recording.sinks import set_sink


class ExportReport:
    """What happened to the spans of a session, as the lines the CLI prints."""

    def __init__(self, sink: ProcessSink, result: dict):
        self.sink, self.result = sink, result

    @property
    def file_written(self) -> bool:
        file = self.result.get("file")
        return bool(file) and file["error"] is None

    def lines(self) -> list[tuple[bool, str]]:
        """(is a problem, text) for the trace file and the network export."""
        sink, r = self.sink, self.result
        lines = []
        if sink.trace_file:
            file = r.get("file")
            if file is None:
                why = ("the export process did not answer in time" if r.get("file_timeout")
                       else "the export process exited early")
                lines.append((True, f"otvllm: tracing: the trace file {sink.trace_file} was not written: {why}"))
            elif file["error"] is not None:
                lines.append((True, f"otvllm: tracing: the trace file {file['path']} was not written: "
                                    f"{file['error']}"))
            else:
                text = f"trace written to {file['path']} ({file['spans']} spans"
                if file["dropped"]:
                    text += (f"; {file['dropped']} more over the file's cap of {file['spans']} (OTVLLM_TRACE_FILE_"
                             f"MAX_SPANS) were left out")
                lines.append((False, text + "; open it in Jaeger UI: Search > Upload, or run: "
                                            f"otvllm trace summary {file['path']})"))
        if sink.endpoint_label:
            net = r.get("network")
            label = sink.endpoint_label
            if net is None:
                lines.append((True, f"otvllm: tracing: could not confirm the export to {label}: the export "
                                    f"process did not answer within {sink.network_wait_s:g} s"))
            else:
                unsent = net["failed"] + (0 if net["finished"] else max(0, sink.sent - net["exported"] - net["failed"]))
                if net["failed"] or not net["finished"]:
                    why = net["error"] or f"the collector did not take them within {sink.timeout_s:g} s"
                    lines.append((True, f"otvllm: tracing: {net['exported']} spans exported to {label}, "
                                        f"{unsent} not ({why}); generation was not affected"))
                else:
                    lines.append((False, f"{net['exported']} spans exported to {label}"))
        if sink.dropped or sink.lost:
            lines.append((True, f"otvllm: tracing: {sink.dropped + sink.lost} spans were dropped before export "
                                f"(the export process could not keep up, or exited)"))
        return lines


class TracingSession:
    """What `configure()` set up; `shutdown()` ends the export process and reports."""

    def __init__(self, sink: ProcessSink | None):
        self.sink = sink
        self.report: ExportReport | None = None

    @property
    def endpoint(self) -> str | None:
        return self.sink.endpoint_label if self.sink else None

    @property
    def trace_file(self) -> str | None:
        return self.sink.trace_file if self.sink else None

    def flush(self) -> dict | None:
        return self.sink.flush() if self.sink else None

    def shutdown(self, quiet: bool = False) -> ExportReport | None:
        """Write the trace file, flush the network export (within its timeout), stop the export
        process. Unless `quiet`, problems are printed to stderr, one line each."""
        if self.sink is None:
            return None
        if self.report is None:
            set_sink(None)
            self.report = ExportReport(self.sink, self.sink.close())
            if not quiet:
                for problem, text in self.report.lines():
                    if problem:
                        print(text, file=sys.stderr, flush=True)
        return self.report


def otlp_endpoint() -> str | None:
    """The OTLP endpoint from the environment (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT first)."""
    return read_first("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def export_settings(service_name: str | None = None, endpoint: str | None = None, protocol: str | None = None,
                    trace_file: str | None = None, timeout_s: float | None = None) -> dict | None:
    """The checked settings of an export process, or None when there is nothing to export to.
    Raises ValueError naming the setting or variable that is wrong."""
    check_environment("OTEL_")
    if read("OTEL_SDK_DISABLED"):
        return None
    endpoint = endpoint or otlp_endpoint()
    protocol = protocol or read_first("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol not in ("grpc", "http/protobuf", "http"):
        raise ValueError(f"unsupported OTLP protocol {protocol!r}: use grpc or http/protobuf")
    if timeout_s is None:
        timeout_s = read_first("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT") / 1000
    if not endpoint and trace_file is None:
        return None
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ValueError(f"OTLP endpoint {redact(endpoint)!r} must start with http:// or https://")
    from otvllm.tracing.recording.attributes import trace_content_enabled
    from otvllm import __version__
    return {
        "service_name": service_name or read("OTEL_SERVICE_NAME"),
        "endpoint": endpoint, "endpoint_label": redact(endpoint) if endpoint else None,
        "protocol": "grpc" if protocol == "grpc" else "http", "timeout_s": timeout_s,
        "trace_file": check_trace_path(trace_file) if trace_file is not None else None,
        "file_max_spans": read("OTVLLM_TRACE_FILE_MAX_SPANS"),
        "file_mode": file_mode(private=trace_content_enabled()),
        "version": __version__,
    }


def start(settings: dict | None) -> TracingSession:
    """Start the export process for checked settings and send otvllm's spans to it."""
    if settings is None:
        return TracingSession(None)
    sink = ProcessSink(settings)
    set_sink(sink)
    return TracingSession(sink)


def configure(service_name: str | None = None, endpoint: str | None = None, protocol: str | None = None,
              trace_file: str | None = None, timeout_s: float | None = None) -> TracingSession:
    """Export otvllm's spans over OTLP (endpoint from the argument or OTEL_EXPORTER_OTLP_*)
    and/or to a Jaeger JSON trace file, from a child process, as the engine records them."""
    return start(export_settings(service_name, endpoint, protocol, trace_file, timeout_s))
