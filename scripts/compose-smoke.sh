#!/usr/bin/env bash
# End-to-end check of the compose demo stack (needs a Docker engine with Compose v2).
#
#   scripts/compose-smoke.sh
#
# 1. builds the otvllm image and starts the whole default stack (`docker compose up -d`):
#    jaeger, otel-collector, prometheus, grafana, otvllm (serve) and loadgen;
# 2. waits for the Collector's health_check (:13133), Jaeger's UI (:16686), Prometheus
#    (:9090/-/ready), Grafana (:3000/api/health) and the server's GET /health (:8000);
# 3. sends one completion through the server (POST /v1/completions) and checks the answer;
# 4. polls Jaeger's HTTP query API (/api/v3/services, /api/v3/traces) until one trace of
#    service "otvllm-loadgen" holds the load generator's client span and otvllm's spans
#    "text_completion synthetic-qwen3-v1" (the request) and "POST /v1/completions"
#    (client -> server -> request in one trace);
# 5. polls Prometheus (/api/v1/query) until otvllm's metrics are there
#    (gen_ai_server_time_to_first_token_seconds_count, otvllm_tokens_total) along with the
#    spanmetrics series of Jaeger's Monitor tab, and /api/v1/query_exemplars until a TTFT
#    bucket carries an exemplar (a trace id); then asks Jaeger's Monitor API
#    (/api/metrics/calls) for the server's call rate;
# 6. checks that Grafana serves the provisioned dashboard (uid "otvllm") to an anonymous
#    viewer;
# 7. prints PASS or FAIL and always tears the stack down (`docker compose down -v`).
#
# Environment:
#   COMPOSE_PROJECT_NAME  compose project to use (default otvllm-smoke, so a stack you
#                         started yourself under the default name is left alone; the
#                         host ports 8000/3000/9090/16686/4317/4318/13133 on 127.0.0.1
#                         must be free all the same)
#   SMOKE_TIMEOUT         seconds to wait for each stage (default 240)
#   KEEP_STACK=1          leave the stack running at the end (to look at it in the UIs)
#   OTVLLM_URL            default http://127.0.0.1:8000
#   JAEGER_URL            default http://127.0.0.1:16686
#   PROMETHEUS_URL        default http://127.0.0.1:9090
#   GRAFANA_URL           default http://127.0.0.1:3000
#   COLLECTOR_HEALTH_URL  default http://127.0.0.1:13133/
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-otvllm-smoke}"
SMOKE_TIMEOUT="${SMOKE_TIMEOUT:-240}"
KEEP_STACK="${KEEP_STACK:-0}"
OTVLLM_URL="${OTVLLM_URL:-http://127.0.0.1:8000}"
JAEGER_URL="${JAEGER_URL:-http://127.0.0.1:16686}"
PROMETHEUS_URL="${PROMETHEUS_URL:-http://127.0.0.1:9090}"
GRAFANA_URL="${GRAFANA_URL:-http://127.0.0.1:3000}"
COLLECTOR_HEALTH_URL="${COLLECTOR_HEALTH_URL:-http://127.0.0.1:13133/}"
SERVICE_NAME="otvllm"
LOADGEN_SERVICE_NAME="otvllm-loadgen"
# Spans of otvllm that must share a trace with a span of the load generator.
# A request's span is named "{gen_ai.operation.name} {gen_ai.request.model}".
REQUIRED_SPANS=("text_completion synthetic-qwen3-v1" "POST /v1/completions")
PROMETHEUS_METRICS=(gen_ai_server_time_to_first_token_seconds_count otvllm_tokens_total traces_span_metrics_calls_total)
GRAFANA_DASHBOARD_UID="otvllm"

log() { printf '[compose-smoke] %s\n' "$*" >&2; }

fail() {
    log "$*"
    echo "FAIL: $*"
    exit 1
}

for tool in docker curl python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "FAIL: '$tool' not found"; exit 2; }
done
if ! docker compose version >/dev/null 2>&1; then
    echo "FAIL: 'docker compose' (Compose v2 plugin) not available"
    exit 2
fi
if ! docker info >/dev/null 2>&1; then
    echo "FAIL: no Docker engine reachable (docker info failed)"
    exit 2
fi

WORK_DIR="$(mktemp -d)"
STACK_STARTED=0

cleanup() {
    local rc=$?
    if [[ "$STACK_STARTED" == 1 ]]; then
        if [[ "$rc" != 0 ]]; then
            log "last logs of the stack:"
            docker compose logs --no-color --tail 40 otvllm loadgen otel-collector jaeger prometheus grafana >&2 || true
        fi
        if [[ "$KEEP_STACK" == 1 ]]; then
            log "KEEP_STACK=1: leaving project $COMPOSE_PROJECT_NAME running (docker compose -p $COMPOSE_PROJECT_NAME down -v)"
        else
            log "tearing down project $COMPOSE_PROJECT_NAME"
            docker compose down -v --remove-orphans >&2 || true
        fi
    fi
    rm -rf "$WORK_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# RFC 3339 UTC timestamp, OFFSET seconds from now (portable: no GNU date -d).
rfc3339() {
    python3 -c 'import datetime, sys
t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=float(sys.argv[1]))
print(t.strftime("%Y-%m-%dT%H:%M:%SZ"))' "$1"
}

# wait_http NAME URL: poll URL until it answers 2xx, at most SMOKE_TIMEOUT seconds.
wait_http() {
    local name=$1 url=$2
    local deadline=$((SECONDS + SMOKE_TIMEOUT))
    log "waiting for $name at $url"
    until curl -fsS -o /dev/null --max-time 3 "$url" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            fail "$name did not answer at $url within ${SMOKE_TIMEOUT}s"
        fi
        sleep 2
    done
    log "$name is up"
}

# poll NAME COMMAND...: run COMMAND every 3 s until it succeeds, at most SMOKE_TIMEOUT
# seconds. COMMAND prints one status line (kept for the failure message or the log).
poll() {
    local name=$1
    shift
    local deadline=$((SECONDS + SMOKE_TIMEOUT))
    local status="nothing checked yet"
    log "polling: $name"
    while ((SECONDS < deadline)); do
        if status="$("$@" 2>&1)"; then
            log "$name: $status"
            return 0
        fi
        sleep 3
    done
    fail "$name: not within ${SMOKE_TIMEOUT}s ($status)"
}

# Reads a Jaeger /api/v3/traces response on stdin. The body is
#   {"result": {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", ...}]},
#     "scopeSpans": [{"scope": {...}, "spans": [{"traceId": ..., "name": ..., ...}]}]}]}}
# (OTLP JSON in a `result` wrapper, one resourceSpans entry per trace and resource), or
# an {"error": {...}} object (404 "No traces found" while nothing has arrived yet).
# argv: CLIENT_SERVICE SERVER_SERVICE SPAN_NAME... Exits 0 when one trace holds a span of
# CLIENT_SERVICE and every SPAN_NAME as a span of SERVER_SERVICE.
CHECK_TRACES_PY='
import json, sys
client, server, required = sys.argv[1], sys.argv[2], set(sys.argv[3:])
try:
    body = json.load(sys.stdin)
except ValueError:
    print("response is not JSON")
    sys.exit(1)
if "error" in body and "result" not in body:
    print("no trace yet: %s" % body["error"].get("message", body["error"]))
    sys.exit(1)

def service_of(resource):
    for kv in resource.get("attributes") or []:
        if kv.get("key") == "service.name":
            value = kv.get("value") or {}
            return value.get("stringValue") or value.get("string_value")
    return None

result = body.get("result") or {}
by_trace = {}
for rs in result.get("resourceSpans") or result.get("resource_spans") or []:
    service = service_of(rs.get("resource") or {})
    for ss in rs.get("scopeSpans") or rs.get("scope_spans") or []:
        for span in ss.get("spans") or []:
            trace_id = span.get("traceId") or span.get("trace_id") or "?"
            by_trace.setdefault(trace_id, set()).add((service, span.get("name")))
for trace_id, spans in by_trace.items():
    services = {s for s, _ in spans}
    server_names = {n for s, n in spans if s == server}
    if client in services and required <= server_names:
        print("trace %s: %d spans of %s, %s (%s)"
              % (trace_id, len(spans), client, server, ", ".join(sorted(server_names))))
        sys.exit(0)
seen = sorted({"%s/%s" % sn for spans in by_trace.values() for sn in spans})
print("%d trace(s), none with a %s span and %s spans %s; seen: %s"
      % (len(by_trace), client, server, sorted(required), seen[:30]))
sys.exit(1)
'

# Reads a Prometheus /api/v1/query (or /api/v1/query_exemplars) answer on stdin; exits 0
# when it succeeded with a non-empty result.
CHECK_PROMETHEUS_PY='
import json, sys
what = sys.argv[1]
try:
    body = json.load(sys.stdin)
except ValueError:
    print("%s: response is not JSON" % what)
    sys.exit(1)
if body.get("status") != "success":
    print("%s: %s" % (what, body.get("error", body)))
    sys.exit(1)
data = body.get("data")
result = data.get("result") if isinstance(data, dict) else data
if not result:
    print("%s: no series yet" % what)
    sys.exit(1)
if isinstance(data, dict):
    print("%s: %d series" % (what, len(result)))
else:
    exemplars = [e for series in result for e in series.get("exemplars") or []]
    if not exemplars:
        print("%s: series without exemplars" % what)
        sys.exit(1)
    labels = exemplars[-1].get("labels") or {}
    print("%s: %d exemplars, e.g. trace_id=%s" % (what, len(exemplars), labels.get("trace_id", labels)))
'

# Reads a Jaeger /api/metrics/calls answer (the Monitor tab API); exits 0 when one
# series has points.
CHECK_MONITOR_PY='
import json, sys
try:
    body = json.load(sys.stdin)
except ValueError:
    print("response is not JSON")
    sys.exit(1)
if body.get("errors") or body.get("error"):
    print("error: %s" % (body.get("errors") or body.get("error")))
    sys.exit(1)
points = lambda m: m.get("metricPoints") or m.get("metric_points") or []
metrics = [m for m in body.get("metrics") or [] if points(m)]
if not metrics:
    print("no call-rate series yet (%s)" % (body.get("name") or "empty answer"))
    sys.exit(1)
print("%s: %d series, %d points" % (body.get("name"), len(metrics), sum(len(points(m)) for m in metrics)))
'

check_completion() {
    local model
    model="$(curl -fsS --max-time 10 "$OTVLLM_URL/v1/models" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')" || return 1
    curl -fsS --max-time 120 -H 'Content-Type: application/json' -o "$WORK_DIR/completion.json" \
        -d "{\"model\": \"$model\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}" \
        "$OTVLLM_URL/v1/completions" || return 1
    python3 -c 'import json, sys
body = json.load(open(sys.argv[1]))
choice, usage = body["choices"][0], body["usage"]
assert isinstance(choice["text"], str) and usage["completion_tokens"] >= 1, body
print("model %s: %d prompt tokens -> %d tokens (%s)"
      % (body["model"], usage["prompt_tokens"], usage["completion_tokens"], choice["finish_reason"]))' \
        "$WORK_DIR/completion.json"
}

check_jaeger_trace() {
    local services
    services="$(curl -sS --max-time 5 "$JAEGER_URL/api/v3/services" 2>/dev/null || true)"
    if ! grep -q "\"$LOADGEN_SERVICE_NAME\"" <<<"$services" || ! grep -q "\"$SERVICE_NAME\"" <<<"$services"; then
        echo "services $LOADGEN_SERVICE_NAME and $SERVICE_NAME not both in /api/v3/services yet: ${services:-no answer}"
        return 1
    fi
    # 404 with an error body until a trace matches: no curl -f here.
    # (query.serviceName etc. are the current names; Jaeger 2.x before 2.19 only knew the
    # snake_case forms, which 2.19+ still accept as deprecated aliases.)
    rm -f "$WORK_DIR/traces.json"
    curl -sS --max-time 10 -o "$WORK_DIR/traces.json" -G "$JAEGER_URL/api/v3/traces" \
        --data-urlencode "query.serviceName=$LOADGEN_SERVICE_NAME" \
        --data-urlencode "query.startTimeMin=$START_MIN" \
        --data-urlencode "query.startTimeMax=$(rfc3339 300)" \
        --data-urlencode "query.searchDepth=20" 2>/dev/null || true
    if [[ ! -s "$WORK_DIR/traces.json" ]]; then
        echo "no answer from $JAEGER_URL/api/v3/traces"
        return 1
    fi
    python3 -c "$CHECK_TRACES_PY" "$LOADGEN_SERVICE_NAME" "$SERVICE_NAME" "${REQUIRED_SPANS[@]}" <"$WORK_DIR/traces.json"
}

check_prometheus_metric() {
    curl -sS --max-time 5 -G "$PROMETHEUS_URL/api/v1/query" --data-urlencode "query=$1" |
        python3 -c "$CHECK_PROMETHEUS_PY" "$1"
}

check_prometheus_exemplars() {
    local now
    now="$(date +%s)"
    curl -sS --max-time 5 -G "$PROMETHEUS_URL/api/v1/query_exemplars" \
        --data-urlencode "query=gen_ai_server_time_to_first_token_seconds_bucket" \
        --data-urlencode "start=$((now - 900))" --data-urlencode "end=$((now + 60))" |
        python3 -c "$CHECK_PROMETHEUS_PY" "exemplars of gen_ai_server_time_to_first_token_seconds_bucket"
}

check_jaeger_monitor() {
    curl -sS --max-time 10 -G "$JAEGER_URL/api/metrics/calls" \
        --data-urlencode "service=$SERVICE_NAME" --data-urlencode "spanKind=server" \
        --data-urlencode "lookback=900000" --data-urlencode "step=15000" --data-urlencode "ratePer=60000" |
        python3 -c "$CHECK_MONITOR_PY"
}

check_grafana_dashboard() {
    curl -fsS --max-time 5 "$GRAFANA_URL/api/dashboards/uid/$GRAFANA_DASHBOARD_UID" |
        python3 -c 'import json, sys
body = json.load(sys.stdin)
dashboard = body["dashboard"]
print("dashboard %r: %d panels" % (dashboard["title"], len(dashboard.get("panels") or [])))'
}

log "building the otvllm image"
docker compose build otvllm

STACK_STARTED=1
# Generous window around the run: container and host clocks may differ a little.
START_MIN="$(rfc3339 -300)"
log "starting the stack (project $COMPOSE_PROJECT_NAME)"
docker compose up -d

wait_http "Collector health_check" "$COLLECTOR_HEALTH_URL"
wait_http "Jaeger UI" "$JAEGER_URL/"
wait_http "Prometheus" "$PROMETHEUS_URL/-/ready"
wait_http "Grafana" "$GRAFANA_URL/api/health"
wait_http "otvllm server" "$OTVLLM_URL/health"

poll "a completion through the server" check_completion
poll "a loadgen trace in Jaeger with otvllm's ${REQUIRED_SPANS[*]} spans" check_jaeger_trace
for metric in "${PROMETHEUS_METRICS[@]}"; do
    poll "Prometheus has $metric" check_prometheus_metric "$metric"
done
poll "Prometheus keeps exemplars of TTFT buckets" check_prometheus_exemplars
poll "Jaeger's Monitor tab API has otvllm's call rate" check_jaeger_monitor
poll "Grafana serves the provisioned dashboard" check_grafana_dashboard

echo "PASS: server health, a completion, a loadgen -> otvllm trace in Jaeger ($JAEGER_URL), metrics and exemplars in Prometheus ($PROMETHEUS_URL), Jaeger Monitor, Grafana dashboard ($GRAFANA_URL)"
