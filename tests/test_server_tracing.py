"""`otvllm serve` traces, received by a real OTLP receiver: a client's traceparent continues
through the HTTP server span into the engine's request spans; steps live in the engine
loop's own traces and are linked both ways to the requests they served."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from otvllm.synthetic import SYNTHETIC_NAME  # noqa: E402
from tests.helpers import by_name  # noqa: E402
from otvllm.tracing import schema as S  # noqa: E402
from tests.otlp_receiver import OtlpReceiver  # noqa: E402

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Spans of a traced server that answered traced and untraced requests (the last with n=2
    choices), then got SIGTERM."""
    tmp = tmp_path_factory.mktemp("serve-trace")
    port = free_port()
    env = dict(os.environ, OTVLLM_CACHE_DIR=str(tmp / "cache"), OMP_NUM_THREADS="1", OTVLLM_TRACE_LEVEL="step",
               OTEL_METRIC_EXPORT_INTERVAL="1000")
    with OtlpReceiver() as receiver:
        proc = subprocess.Popen(
            [sys.executable, "-m", "otvllm.cli", "serve", "--port", str(port), "--device", "cpu", "--block-size", "16",
             "--max-model-len", "256", "--otlp-endpoint", receiver.endpoint, "--trace-file", str(tmp / "t.json")],
            env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            line = ""
            while "serving" not in line:
                line = proc.stderr.readline()
                assert line or proc.poll() is None, "the server exited before it was ready"
                assert time.monotonic() < deadline, "the server did not start"
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            traced = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}

            def ask(i):
                return client.completions.create(model=SYNTHETIC_NAME, prompt=f"request {i}", max_tokens=24,
                                                 temperature=0.8, seed=i, n=2 if i == 5 else 1,
                                                 extra_body={"ignore_eos": True},
                                                 extra_headers=traced if i < 3 else None)

            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(ask, range(6)))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                prometheus = response.read().decode()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
        return receiver.spans(), answers, tmp / "t.json", receiver.metrics(), prometheus


def test_the_engine_process_start_up_is_in_the_runs_trace(served):
    """engine.init is recorded in the engine process and joins the front end's otvllm.run."""
    spans, *_ = served
    run = the_one(spans, S.CLI_RUN)
    init = the_one(spans, S.ENGINE_INIT)
    assert (init["trace_id"], init["parent_span_id"]) == (run["trace_id"], run["span_id"])
    assert the_one(spans, S.MODEL_LOAD)["parent_span_id"] == init["span_id"]
    assert run["start_ns"] <= init["start_ns"] and init["end_ns"] <= run["end_ns"]


def the_one(spans, name):
    found = by_name(spans, name)
    assert len(found) == 1, (name, len(found))
    return found[0]


def choices(answers) -> list:
    """(response id, choice) of every choice the server answered."""
    return [(a.id, c) for a in answers for c in a.choices]


def test_the_clients_trace_continues_into_the_engine(served):
    spans, answers, *_ = served
    assert all(a.usage.completion_tokens == 24 * len(a.choices) for a in answers)
    http = [s for s in spans if s["name"] == "POST /v1/completions"]
    assert len(http) == 6
    traced_http = [s for s in http if s["trace_id"] == CLIENT_TRACE]
    assert len(traced_http) == 3 and all(s["parent_span_id"] == CLIENT_SPAN for s in traced_http)
    requests = [s for s in spans if S.is_request(s["name"], s["attributes"])]
    assert len(requests) == 7   # one a choice: the last answer has two
    http_ids = {s["span_id"]: s for s in http}
    for request in requests:   # each request span is the child of its own HTTP span, in its trace
        parent = http_ids[request["parent_span_id"]]
        assert request["trace_id"] == parent["trace_id"]
        assert request["attributes"][S.GEN_AI_USAGE_OUTPUT_TOKENS] == 24
    assert sum(r["trace_id"] == CLIENT_TRACE for r in requests) == 3
    # gen_ai.response.id is the id of the HTTP response the client got; each choice of it is a
    # request span with its index (and with n choices, gen_ai.request.choice.count).
    spanned = sorted((r["attributes"][S.GEN_AI_RESPONSE_ID], r["attributes"][S.REQUEST_CHOICE_INDEX],
                      r["attributes"].get(S.GEN_AI_REQUEST_CHOICE_COUNT, 1)) for r in requests)
    assert spanned == sorted((rid, c.index, len(a.choices)) for a in answers for rid, c in choices([a]))
    assert all(r["name"] == f"text_completion {SYNTHETIC_NAME}" for r in requests)


def test_steps_live_in_engine_loop_traces_linked_to_their_requests(served):
    spans, *_ = served
    requests = {s["span_id"]: s for s in spans if S.is_request(s["name"], s["attributes"])}
    loops = by_name(spans, S.ENGINE_LOOP)
    assert loops and all(not s["parent_span_id"] for s in loops)
    loop_traces = {s["trace_id"] for s in loops}
    assert not loop_traces & {r["trace_id"] for r in requests.values()}
    steps = by_name(spans, S.STEP)
    assert steps and all(s["trace_id"] in loop_traces for s in steps)
    # Every step links to the requests of its batch; every request links back to steps of it.
    for step in steps:
        linked = {link["span_id"] for link in step["links"]}
        assert linked and linked <= set(requests), step["attributes"]
        assert len(linked) <= step["attributes"][S.NUM_SEQS]
    steps_by_id = {s["span_id"] for s in steps}
    for request in requests.values():
        back = {link["span_id"] for link in request["links"]}
        assert back and back <= steps_by_id
        for step in steps:   # the links agree in both directions
            if step["span_id"] in back:
                assert request["span_id"] in {link["span_id"] for link in step["links"]}
    # The loop's statistics count every step it ran.
    assert sum(s["attributes"][S.STEPS_COUNT] for s in loops) >= len(steps)


def test_the_trace_file_holds_the_same_traces(served):
    import json

    spans, _, path, *_ = served
    data = json.loads(path.read_text())["data"]
    in_file = {s["spanID"] for t in data for s in t["spans"]}
    assert {s["span_id"] for s in spans} <= in_file
    follows = [r for t in data for s in t["spans"] for r in s["references"] if r["refType"] == "FOLLOWS_FROM"]
    assert follows


def test_metrics_reach_an_otlp_receiver_with_exemplars_of_the_request_traces(served):
    spans, answers, _, metrics, _ = served
    http_traces = {s["trace_id"] for s in spans if s["name"] == "POST /v1/completions"}
    for name in ("gen_ai.server.time_to_first_token", "gen_ai.server.time_per_output_token",
                 "gen_ai.server.request.duration"):
        latest = metrics[name][-1]   # cumulative: the last export holds every request
        assert latest["kind"] == "histogram" and latest["count"] == len(choices(answers)), name
        assert sum(latest["buckets"]) == latest["count"]
        # The SDK's reservoir empties at each collection: an export holds the exemplars of the
        # requests measured since the one before it.
        exemplars = {e for point in metrics[name] for e in point["exemplars"]}
        assert exemplars and exemplars <= http_traces, name
        assert latest["attributes"]["gen_ai.request.model"] == SYNTHETIC_NAME
    tokens = {p["attributes"]["gen_ai.token.type"]: p["value"] for p in metrics["otvllm.tokens"][-2:]}
    assert tokens["output"] == sum(a.usage.completion_tokens for a in answers)
    # the engine computes a prompt once per choice; usage counts it once per prompt
    assert tokens["input"] == sum(a.usage.prompt_tokens * len(a.choices) for a in answers)
    assert metrics["otvllm.steps"][-1]["value"] > 0
    assert metrics["otvllm.kv_cache.usage"][-1]["value"] == 0   # every request ended, its blocks freed


def test_metrics_endpoint_is_prometheus_text(served):
    from prometheus_client.parser import text_string_to_metric_families

    _, answers, _, _, prometheus = served
    families = {f.name: f for f in text_string_to_metric_families(prometheus)}
    ttft = families["gen_ai_server_time_to_first_token_seconds"]
    count = [s.value for s in ttft.samples if s.name.endswith("_count")]
    assert count == [len(choices(answers))]
    for gauge in ("otvllm_requests_running", "otvllm_requests_waiting", "otvllm_kv_cache_usage"):
        assert gauge in families, sorted(families)
