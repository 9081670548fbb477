#!/usr/bin/env bash
# Remake the traces and the Jaeger UI screenshots of docs/debugging.md, on CPU, with the synthetic
# model. Needs ../shared/jaeger-ui (the real Jaeger UI in headless Chromium) and Pillow.
# usage: scripts/debugging-traces.sh [OUT_DIR]    (traces and raw screenshots in OUT_DIR,
#        default /tmp/otvllm-debugging; the cropped pictures go to docs/img/)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-/tmp/otvllm-debugging}"
ui="${JAEGER_UI_CHECK:-$repo/../shared/jaeger-ui/open-in-jaeger-ui.sh}"
[ -x "$ui" ] || ui=/work/shared/jaeger-ui/open-in-jaeger-ui.sh
python="${PYTHON:-python}"
mkdir -p "$out" "$repo/docs/img"
cd "$out"
otvllm() { PYTHONPATH="$repo" "$python" -m otvllm "$@"; }
gen() { otvllm generate --no-progress "$@" >/dev/null; }

# a small run at the default level: the overview and a request's events
gen --prompt "Hello, otvllm" --num-prompts 4 --max-tokens 8 --trace-file basic.json
# a step that runs out of memory (raised on purpose, see the script)
PYTHONPATH="$repo" "$python" "$repo/scripts/failing_step_trace.py" step-failed.json
# debug level: every part of a forward as a span
gen --prompt "Hello" --max-tokens 2 --trace-level debug --trace-file debug.json
# the second step's forward under torch.profiler: its operators as spans
OTVLLM_TRACE_PROFILE_STEPS=1 gen --prompt "Hello" --max-tokens 3 --trace-file profile.json
# a KV cache too small for the batch: requests wait for blocks, then get preempted
gen --prompt "Tell me a story about a tracing engine and its spans." --num-prompts 6 --max-tokens 48 \
    --ignore-eos --block-size 16 --num-kvcache-blocks 16 --max-model-len 128 --trace-file preemption.json
# a long run stopped by Ctrl-C (SIGINT) after a few seconds
rc=0; timeout -s INT 7 env PYTHONPATH="$repo" "$python" -m otvllm generate --no-progress --prompt "Hello" \
    --num-prompts 2 --max-tokens 2000 --ignore-eos --trace-file interrupted.json >/dev/null || rc=$?
[ "$rc" = 124 ] || { echo "the run to interrupt ended with $rc before its SIGINT" >&2; exit 1; }

for name in basic step-failed debug profile preemption interrupted; do
  "$ui" "$name.json" "ui-$name" --strict | tail -1
done

# Crop each screenshot to the rows that matter and shrink it (the guide says what each shows).
"$python" - "$out" "$repo/docs/img" <<'PY'
import sys
from PIL import Image

out, img = sys.argv[1], sys.argv[2]
# picture: (run, screenshot, top, bottom) in pixels of the 1600-pixel-wide page
crops = {
    "overview": ("basic", "trace", 60, 770),
    "request-events": ("basic", "trace_span_detail", 60, 790),
    "step-failed": ("step-failed", "trace", 60, 900),
    "debug-layers": ("debug", "trace", 60, 1200),
    "profiled-step": ("profile", "trace", 60, 1200),
    "interrupted": ("interrupted", "trace", 60, 900),
}
for picture, (run, shot, top, bottom) in crops.items():
    page = Image.open(f"{out}/ui-{run}/{shot}.png").convert("RGB")
    part = page.crop((0, top, page.width, min(bottom, page.height)))
    part = part.resize((1000, round(part.height * 1000 / part.width)), Image.LANCZOS)
    part = part.quantize(colors=128)
    part.save(f"{img}/{picture}.png", optimize=True)
    print(f"docs/img/{picture}.png")
PY
