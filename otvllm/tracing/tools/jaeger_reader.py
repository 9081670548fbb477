"""Read Jaeger JSON trace files (what Jaeger's query API returns and otvllm writes)."""

import json


def load_jaeger_json(path: str) -> list[dict]:
    """The traces (the `data` list) of a Jaeger JSON file; ValueError naming the file and the
    problem when it is not one."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
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
