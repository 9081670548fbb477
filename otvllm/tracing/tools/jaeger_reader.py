"""Read Jaeger JSON trace files (what Jaeger's query API returns and otvllm writes)."""

import json


def read_json_file(path: str):
    """The file's JSON value; ValueError naming the file when it cannot be read or is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def load_jaeger_json(path: str) -> list[dict]:
    """The traces (the `data` list) of a Jaeger JSON file; ValueError naming the file and the
    problem when it is not one."""
    doc = read_json_file(path)
    data = doc.get("data") if isinstance(doc, dict) else doc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise ValueError(f"{path}: not a Jaeger JSON trace file (expected {{\"data\": [trace, ...]}})")
    for trace in data:
        spans = trace.get("spans")
        if not isinstance(spans, list) or not all(isinstance(s, dict) and "spanID" in s for s in spans):
            raise ValueError(f"{path}: trace {trace.get('traceID', '?')} has no valid span list "
                             f"(each span needs a spanID)")
    return data


def span_tags(span: dict) -> dict:
    """A span's tags (its attributes) as a dict."""
    return {t["key"]: t.get("value") for t in span.get("tags") or []}


def parent_id(span: dict) -> str | None:
    """The spanID of a span's parent (its CHILD_OF reference), or None for a root."""
    return next((r["spanID"] for r in span.get("references") or [] if r.get("refType") == "CHILD_OF"), None)
