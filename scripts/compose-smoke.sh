#!/usr/bin/env bash
# End-to-end check of the compose demo stack (needs a Docker engine with Compose v2).
#
#   scripts/compose-smoke.sh
#
# 1. builds the otvllm image and starts jaeger + otel-collector;
# 2. waits for Jaeger's UI (:16686) and the Collector's health_check (:13133);
# 3. runs the demo generation (`docker compose run --rm otvllm`);
# 4. polls Jaeger's HTTP query API (/api/v3/services, /api/v3/traces) until one trace
#    of service "otvllm" holds spans named llm.generate, engine.step and model.forward;
# 5. prints PASS or FAIL and always tears the stack down (`docker compose down -v`).
#
# Environment:
#   COMPOSE_PROJECT_NAME  compose project to use (default otvllm-smoke, so a stack you
#                         started yourself under the default name is left alone; the
#                         host ports 16686/4317/4318/13133 must be free all the same)
#   SMOKE_TIMEOUT         seconds to wait for each stage (default 180)
#   KEEP_STACK=1          leave the stack running at the end (to look at it in the UI)
#   JAEGER_URL            default http://localhost:16686
#   COLLECTOR_HEALTH_URL  default http://localhost:13133/
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-otvllm-smoke}"
SMOKE_TIMEOUT="${SMOKE_TIMEOUT:-180}"
KEEP_STACK="${KEEP_STACK:-0}"
JAEGER_URL="${JAEGER_URL:-http://localhost:16686}"
COLLECTOR_HEALTH_URL="${COLLECTOR_HEALTH_URL:-http://localhost:13133/}"
SERVICE_NAME="otvllm"
REQUIRED_SPANS=(llm.generate engine.step model.forward)

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
            log "last Collector and Jaeger logs:"
            docker compose logs --no-color --tail 60 otel-collector jaeger >&2 || true
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

# Reads a Jaeger /api/v3/traces response on stdin. The body is
#   {"result": {"resourceSpans": [{"resource": {...}, "scopeSpans": [{"scope": {...},
#     "spans": [{"traceId": ..., "spanId": ..., "name": ..., ...}]}]}]}}
# (OTLP JSON in a `result` wrapper, one resourceSpans entry per trace and resource), or
# an {"error": {...}} object (404 "No traces found" while nothing has arrived yet).
# Exits 0 when one trace holds every span name given as argument.
CHECK_TRACES_PY='
import json, sys
required = set(sys.argv[1:])
try:
    body = json.load(sys.stdin)
except ValueError:
    print("response is not JSON")
    sys.exit(1)
if "error" in body and "result" not in body:
    print("no trace yet: %s" % body["error"].get("message", body["error"]))
    sys.exit(1)
result = body.get("result") or {}
names_by_trace = {}
for rs in result.get("resourceSpans") or result.get("resource_spans") or []:
    for ss in rs.get("scopeSpans") or rs.get("scope_spans") or []:
        for span in ss.get("spans") or []:
            trace_id = span.get("traceId") or span.get("trace_id") or "?"
            names_by_trace.setdefault(trace_id, set()).add(span.get("name"))
for trace_id, names in names_by_trace.items():
    if required <= names:
        print("trace %s: %d span names, including %s"
              % (trace_id, len(names), ", ".join(sorted(required))))
        sys.exit(0)
seen = sorted(set().union(*names_by_trace.values())) if names_by_trace else []
print("%d trace(s), none with all of %s; span names seen: %s"
      % (len(names_by_trace), sorted(required), seen))
sys.exit(1)
'

log "building the otvllm image"
docker compose build otvllm

STACK_STARTED=1
log "starting jaeger and otel-collector (project $COMPOSE_PROJECT_NAME)"
docker compose up -d jaeger otel-collector

wait_http "Jaeger UI" "$JAEGER_URL/"
wait_http "Collector health_check" "$COLLECTOR_HEALTH_URL"

# Generous window around the run: container and host clocks may differ a little.
START_MIN="$(rfc3339 -300)"

log "running the demo generation: docker compose run --rm otvllm"
if ! docker compose run --rm otvllm; then
    fail "the otvllm demo container exited with an error"
fi

log "polling $JAEGER_URL/api/v3 for a trace of service $SERVICE_NAME"
deadline=$((SECONDS + SMOKE_TIMEOUT))
status="nothing checked yet"
found=0
while ((SECONDS < deadline)); do
    services="$(curl -sS --max-time 5 "$JAEGER_URL/api/v3/services" 2>/dev/null || true)"
    if ! grep -q "\"$SERVICE_NAME\"" <<<"$services"; then
        status="service $SERVICE_NAME not in /api/v3/services yet: ${services:-no answer}"
    else
        # 404 with an error body until a trace matches: no curl -f here.
        # (query.serviceName etc. are the current names; Jaeger 2.x before 2.19 only
        # knew the snake_case forms, which 2.19+ still accept as deprecated aliases.)
        rm -f "$WORK_DIR/traces.json"
        curl -sS --max-time 10 -o "$WORK_DIR/traces.json" -G "$JAEGER_URL/api/v3/traces" \
            --data-urlencode "query.serviceName=$SERVICE_NAME" \
            --data-urlencode "query.startTimeMin=$START_MIN" \
            --data-urlencode "query.startTimeMax=$(rfc3339 300)" \
            --data-urlencode "query.searchDepth=20" 2>/dev/null || true
        if [[ ! -s "$WORK_DIR/traces.json" ]]; then
            status="no answer from $JAEGER_URL/api/v3/traces"
        elif status="$(python3 -c "$CHECK_TRACES_PY" "${REQUIRED_SPANS[@]}" <"$WORK_DIR/traces.json" 2>&1)"; then
            found=1
            break
        fi
    fi
    sleep 3
done

if [[ "$found" != 1 ]]; then
    fail "no complete otvllm trace in Jaeger after ${SMOKE_TIMEOUT}s ($status)"
fi
log "$status"
echo "PASS: otvllm trace with ${REQUIRED_SPANS[*]} reached Jaeger via the Collector ($JAEGER_URL)"
