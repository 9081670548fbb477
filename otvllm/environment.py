"""Every environment variable otvllm reads, in one table: its name, what it holds, its default.

`read(name)` is the only way otvllm reads them: the value is checked as it is read, and a bad
one raises ValueError naming the variable and the value (credentials are not echoed).
`check(prefix)` reads a group at once, so that a bad value stops a run before any work
starts: `LLM(...)` checks the OTVLLM_* variables, `configure()` the OTEL_* ones, the CLI all
of them, before the model loads and before the export process starts.

The OTEL_EXPORTER_OTLP_* connection settings that the OpenTelemetry exporters read themselves
(headers, compression, certificates) are in the table too: the exporters would otherwise
drop a bad value with a log line, or fail in the export process after the run has started.
"""

import math
import os
from dataclasses import dataclass
from typing import Callable

from otvllm.tracing.level import NAMES as TRACE_LEVELS


@dataclass(frozen=True)
class Variable:
    name: str
    parse: Callable[[str], object]   # the value from its text, or ValueError saying what was expected
    default: object                  # when unset or empty (a function: computed when read)
    doc: str
    shown: Callable[[str], str] = repr   # how a bad value is quoted in the error


def read(name: str):
    """The checked value of variable `name`, or its default when it is unset or empty."""
    var = VARIABLES[name]
    value = os.environ.get(name, "").strip()
    if not value:
        return var.default() if callable(var.default) else var.default
    try:
        return var.parse(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={var.shown(value)}: {e}") from None


def read_first(*names: str):
    """The value of the first of `names` that is set (a signal-specific variable such as
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT before the general one), else the last one's default."""
    for name in names:
        if os.environ.get(name, "").strip():
            return read(name)
    return read(names[-1])


def check(prefix: str = "") -> None:
    """Read every variable whose name starts with `prefix`: ValueError for the first bad one."""
    for name in VARIABLES:
        if name.startswith(prefix):
            read(name)


def redact(url: str) -> str:
    """The URL without the credentials of its user-info part (`user:password@`)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc = rest[:end]
    if "@" not in netloc:
        return url
    return f"{scheme}{sep}***@{netloc.rpartition('@')[2]}{rest[end:]}"


# ---- what a value may be ----------------------------------------------------------------------

def integer(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"expected an integer {_range(minimum, maximum)}")
        return value
    return parse


def number(minimum: float, maximum: float | None = None, above_minimum: bool = False, unit: str = ""):
    """A finite number >= minimum (> minimum when `above_minimum`), at most `maximum`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low_ok = value > minimum if above_minimum else value >= minimum
        if not math.isfinite(value) or not low_ok or (maximum is not None and value > maximum):
            raise ValueError(f"expected a number{' of ' + unit if unit else ''} "
                             f"{_range(minimum, maximum, above_minimum)}")
        return value
    return parse


def _range(minimum, maximum, above_minimum: bool = False) -> str:
    low = f"{'>' if above_minimum else '>='} {minimum}"
    return low if maximum is None else f"{low} and <= {maximum}"


TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def boolean(text: str) -> bool:
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise ValueError(f"expected true or false ({', '.join(TRUE)} / {', '.join(FALSE)})")


def content_capture(text: str) -> bool:
    """The GenAI instrumentations' switch: true/false, or where content goes (span_only,
    span_and_event: on the span; event_only, no_content: not on it)."""
    if text.lower() in ("span_only", "span_and_event"):
        return True
    if text.lower() in ("event_only", "no_content"):
        return False
    try:
        return boolean(text)
    except ValueError:
        raise ValueError("expected true or false, or span_only, span_and_event, event_only, no_content") from None


def choice(*names: str):
    def parse(text: str) -> str:
        if text.lower() not in names:
            raise ValueError(f"expected one of {', '.join(names)}")
        return text.lower()
    return parse


def step_indexes(text: str) -> frozenset[int]:
    """'3,40' or '10-12,40' -> step indexes."""
    steps = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            lo = hi = -1
        if lo < 0 or hi < lo:
            raise ValueError("expected step indexes >= 0 or ranges of them separated by commas (e.g. 3,40 or 10-12)")
        steps.update(range(lo, hi + 1))
    return frozenset(steps)


def any_text(value: str) -> str:
    return value


def url(value: str) -> str:
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(value)
        parts.port   # raises ValueError for a port that is not a number in range
    except ValueError as e:
        raise ValueError(f"not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    return value


def key_values(value: str) -> str:
    """`key=value,key2=value2` (OTLP headers); the text itself is what the exporters read."""
    for i, member in enumerate(value.split(","), 1):
        key, equals, _ = member.partition("=")
        if member.strip() and (not equals or not key.strip()):
            raise ValueError(f"entry {i} is not key=value (expected key=value pairs separated by commas)")
    return value


def readable_file(value: str) -> str:
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ValueError("expected the path of a readable file")
    return value


def directory(value: str) -> str:
    if os.path.exists(value) and not os.path.isdir(value):
        raise ValueError("expected a directory (or a path where one can be made); this is a file")
    return value


def _hidden(value: str) -> str:
    return "<not shown: it may hold credentials>"


def _redacted(value: str) -> str:
    return repr(redact(value))


# ---- the table --------------------------------------------------------------------------------

def _otlp_variables() -> list[Variable]:
    """The OTLP exporter settings: a general variable and, where otvllm or the exporters read
    one, signal-specific ones (TRACES_, METRICS_) that take precedence."""
    settings = [
        ("ENDPOINT", url, None, "the OTLP collector's URL (with none, the CLI writes a trace file)", _redacted,
         ("", "TRACES_")),
        ("PROTOCOL", choice("grpc", "http/protobuf"), "grpc", "OTLP transport", repr, ("", "TRACES_")),
        ("TIMEOUT", number(0, 3_600_000, above_minimum=True, unit="milliseconds"), 5000.0,
         "milliseconds an export may take (and the wait for the collector at the end of a run)", repr,
         ("", "TRACES_")),
        ("HEADERS", key_values, None, "headers sent with each export (key=value,...)", _hidden,
         ("", "TRACES_", "METRICS_")),
        ("COMPRESSION", choice("gzip", "deflate", "none"), None, "compression of exports", repr,
         ("", "TRACES_", "METRICS_")),
        ("CERTIFICATE", readable_file, None, "CA certificate for an https:// endpoint", repr,
         ("", "TRACES_", "METRICS_")),
        ("CLIENT_KEY", readable_file, None, "client key for mTLS", repr, ("", "TRACES_", "METRICS_")),
        ("CLIENT_CERTIFICATE", readable_file, None, "client certificate for mTLS", repr,
         ("", "TRACES_", "METRICS_")),
    ]
    return [Variable(f"OTEL_EXPORTER_OTLP_{signal}{setting}", parse, default, doc, shown)
            for setting, parse, default, doc, shown, signals in settings for signal in signals]


VARIABLES: dict[str, Variable] = {var.name: var for var in [
    Variable("OTVLLM_TRACE_LEVEL", choice(*TRACE_LEVELS), "step", "trace detail, when trace_level= is not given"),
    Variable("OTVLLM_TRACE_CONTENT", boolean, False,
             "an alias of OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"),
    Variable("OTVLLM_TRACE_MAX_SPANS", integer(100), 2000, "spans one generate call (or loop window) may keep"),
    Variable("OTVLLM_TRACE_FIRST_STEPS", integer(0), 16, "the first steps of a call that are always detailed"),
    Variable("OTVLLM_TRACE_LAST_STEPS", integer(0), 8, "the last steps of a call that are always detailed"),
    Variable("OTVLLM_TRACE_SLOW_FACTOR", number(1), 3.0,
             "a step slower than this times the running median of its phase is detailed"),
    Variable("OTVLLM_TRACE_PROFILE_STEPS", step_indexes, frozenset(),
             "steps whose forward runs under torch.profiler, its kernels (or CPU operators) as spans"),
    Variable("OTVLLM_TRACE_PROFILE_KERNELS", integer(1), 32,
             "kernel spans kept per profiled step (the longest; the rest in one kernels.other span)"),
    Variable("OTVLLM_TRACE_FILE_MAX_SPANS", integer(1), 250_000, "spans one trace file holds at most"),
    Variable("OTVLLM_TP_TIMEOUT_S", number(0, above_minimum=True), 60.0,
             "seconds a tensor-parallel rank may take over one step (or to join at start-up) before the call "
             "fails naming it"),
    Variable("OTVLLM_CACHE_DIR", directory, lambda: os.path.join(os.path.expanduser("~"), ".cache", "otvllm"),
             "where the synthetic model is written"),
    Variable("OTEL_SDK_DISABLED", boolean, False, "no trace or metric export at all"),
    Variable("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", content_capture, False,
             "put prompts and outputs (gen_ai.input.messages, gen_ai.output.messages), their token ids and "
             "logprobs on request spans"),
    Variable("OTEL_SERVICE_NAME", any_text, "otvllm", "service.name of exported spans and metrics"),
    Variable("OTEL_METRIC_EXPORT_INTERVAL", integer(1, 86_400_000), 60_000,
             "milliseconds between OTLP metric exports (otvllm serve)"),
    *_otlp_variables(),
]}
