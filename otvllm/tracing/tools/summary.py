"""A terminal breakdown of a Jaeger JSON trace file (jaeger_json.py): what nano-vllm prints after a
run, and where the step time went, from the spans alone.

The `llm.generate` span's totals (`otvllm.generate.*`, `otvllm.steps.*`) count every step; only
some steps are detailed (the rest are in `engine.steps` aggregate spans), so per-phase
figures are over detailed steps."""

import json
from collections import defaultdict

from otvllm.tracing import schema as S
from otvllm.tracing.tools.device_summary import device_lines
from otvllm.tracing.tools.jaeger_reader import load_jaeger_json, parent_id, span_tags


class _Span:
    __slots__ = ("id", "parent", "up", "name", "start_us", "duration_us", "attrs", "children")

    def __init__(self, raw: dict):
        self.id = raw["spanID"]
        self.parent = parent_id(raw)
        self.name = raw.get("operationName", "")
        self.start_us = raw.get("startTime", 0)
        self.duration_us = raw.get("duration", 0)
        self.attrs = span_tags(raw)
        self.children: list[_Span] = []
        self.up: _Span | None = None   # the parent, when it is in the file

    @property
    def error(self) -> str | None:
        """`error.type` (or the status description) of a span in ERROR, else None."""
        if self.attrs.get("error") is True or self.attrs.get("otel.status_code") == "ERROR":
            return str(self.attrs.get(S.ERROR_TYPE) or self.attrs.get("otel.status_description") or "error")
        return None

    @property
    def ms(self) -> float:
        return self.duration_us / 1000

    def get(self, key, default=None):
        return self.attrs.get(key, default)

    def descendants(self):
        stack = list(self.children)
        while stack:
            span = stack.pop()
            yield span
            stack.extend(span.children)

    def inherited(self, key):
        """`key` of this span or of its nearest ancestor that has it."""
        span = self
        while span is not None:
            if key in span.attrs:
                return span.attrs[key]
            span = span.up
        return None


def _tree(trace: dict) -> list[_Span]:
    spans = [_Span(raw) for raw in trace.get("spans") or []]
    by_id = {s.id: s for s in spans}
    for span in spans:
        if span.parent in by_id:
            span.up = by_id[span.parent]
            span.up.children.append(span)
    for span in spans:
        span.children.sort(key=lambda s: s.start_us)
    return sorted(spans, key=lambda s: s.start_us)


# ---- formatting ------------------------------------------------------------------------------

def human_bytes(n) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _ms(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 10_000 else f"{ms:.2f} ms"


def _num(x) -> str:
    if isinstance(x, float):
        return f"{x:,.1f}"
    return f"{x:,}"


def _replayed(step: _Span) -> list[bool]:
    """Whether each forward of a step replayed a CUDA graph."""
    return [f.get(S.CUDA_GRAPH) is True for f in step.children if f.name == S.FORWARD]


def _json_list(value):
    if isinstance(value, str) and value.startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


# ---- llm.generate ------------------------------------------------------------------------------

def _phase_of(span: _Span) -> str:
    return str(span.get(S.PHASE, "unknown"))


def _generate_lines(gen: _Span | None, spans: list[_Span]) -> list[str]:
    """`gen` is the llm.generate span (None: a trace with step spans but no generate span)."""
    attrs = gen.attrs if gen is not None else {}
    steps = [s for s in spans if S.is_step(s.name)]
    requests = [s for s in spans if _is_request(s)]
    by_phase: dict[str, list[_Span]] = defaultdict(list)
    for step in steps:
        by_phase[_phase_of(step)].append(step)
    phases = sorted(by_phase, key=lambda p: ({"prefill": 0, "decode": 1}.get(p, 2), p))

    def total(key, request_key=None, default=None):
        if key in attrs:
            return attrs[key]
        if request_key and requests:
            return sum(r.get(request_key, 0) for r in requests)
        return default

    n_requests = total(S.GEN_NUM_REQUESTS, default=len(requests))
    prompt_tokens = total(S.GEN_PROMPT_TOKENS, S.GEN_AI_USAGE_INPUT_TOKENS)
    output_tokens = total(S.GEN_OUTPUT_TOKENS, S.GEN_AI_USAGE_OUTPUT_TOKENS)
    n_steps = attrs.get(S.GEN_STEPS, attrs.get(S.STEPS_COUNT, len(steps)))
    prefill_steps = attrs.get(S.GEN_PREFILL_STEPS, attrs.get(S.LOOP_PREFILL_STEPS, len(by_phase.get("prefill", ()))))
    decode_steps = attrs.get(S.GEN_DECODE_STEPS, attrs.get(S.LOOP_DECODE_STEPS, len(by_phase.get("decode", ()))))
    prefill_ms = attrs.get(S.GEN_PREFILL_TIME_MS, sum(s.ms for s in by_phase.get("prefill", ())))
    decode_ms = attrs.get(S.GEN_DECODE_TIME_MS, sum(s.ms for s in by_phase.get("decode", ())))
    wall_ms = gen.ms if gen is not None else sum(s.ms for s in steps)
    throughput = attrs.get(S.GEN_THROUGHPUT)
    if throughput is None and output_tokens and wall_ms:
        throughput = output_tokens / (wall_ms / 1000)

    if gen is None:   # no evidence that the run completed
        outcome = "Steps"
    elif gen.name == S.ENGINE_LOOP:
        outcome = f"Engine loop window {gen.get(S.LOOP_WINDOW, '?')}"
    elif gen.error is not None:
        verb = "interrupted" if gen.error in INTERRUPTS or gen.get(S.INTERRUPTED) else "failed"
        outcome = f"Generation {verb} ({gen.error})"
    else:
        outcome = "Generation complete"
    lines = [f"  {outcome}: {n_steps} steps ({prefill_steps} prefill, {decode_steps} decode), "
             f"requests={n_requests}, prompt_tokens={_num(prompt_tokens) if prompt_tokens is not None else 'n/a'}, "
             f"total_output_tokens={_num(output_tokens) if output_tokens is not None else 'n/a'}",
             f"  prefill_time={_ms(prefill_ms)}, decode_time={_ms(decode_ms)}, wall={_ms(wall_ms)}, "
             f"throughput={f'{throughput:,.1f} tok/s' if throughput is not None else 'n/a'}"]

    if steps:
        traced = "" if len(steps) == n_steps else f" ({len(steps)} of {n_steps} steps detailed)"
        lines.append(f"  steps by phase{traced}:")
        any_graphs = any(any(_replayed(s)) for s in steps)   # not on CPU, nor with enforce_eager
        for phase in phases:
            group = by_phase[phase]
            durations = [s.ms for s in group]
            seqs = [s.get(S.NUM_SEQS) for s in group if s.get(S.NUM_SEQS) is not None]
            tokens = [s.get(S.NUM_BATCHED_TOKENS) for s in group if s.get(S.NUM_BATCHED_TOKENS) is not None]
            line = (f"    {phase:<8} {len(group):>6} steps  total {_ms(sum(durations)):>11}  "
                    f"mean {_ms(sum(durations) / len(group)):>10}")
            if seqs:
                line += f"  batch seqs min/mean/max {min(seqs)}/{sum(seqs) / len(seqs):.1f}/{max(seqs)}"
            if tokens:
                line += f"  tokens/step {sum(tokens) / len(tokens):.1f}"
            graphs = [r for s in group for r in _replayed(s)]
            if any_graphs and graphs:
                line += f"  from CUDA graphs {sum(graphs)}/{len(graphs)}"
            lines.append(line)

        step_ms = sum(s.ms for s in steps)
        phase_ms: dict[str, float] = defaultdict(float)
        gpu_ms = 0.0
        for step in steps:
            for child in step.descendants():
                if child.name in S.STEP_PHASE_SPANS:
                    phase_ms[child.name] += child.ms
                if child.name == S.FORWARD:
                    gpu_ms += child.get(S.GPU_TIME_MS, 0.0)
        if phase_ms:
            lines.append(f"  time per step phase (of {_ms(step_ms)} in detailed steps):")
            for name in S.STEP_PHASE_SPANS:
                if name in phase_ms:
                    share = 100 * phase_ms[name] / step_ms if step_ms else 0.0
                    lines.append(f"    {name:<22} {_ms(phase_ms[name]):>11}  {share:5.1f}%")
            if gpu_ms:
                lines.append(f"    (model.forward GPU time from CUDA events: {_ms(gpu_ms)})")
        lines.extend(_forward_part_lines(steps))
    lines.extend(_step_time_lines(attrs, steps, spans))
    lines.extend(device_lines(steps))   # top kernels of profiled steps, GPU telemetry

    lines.append(f"  prefix cache hit rate: {_hit_rate(attrs, spans)}")
    lines.append(f"  CUDA memory: {_memory(attrs, spans)}")
    lines.append(f"  preemptions: {_preemptions(attrs, spans, requests)}{_first_preemption(spans)}")
    waits = _waiting_reasons(spans)
    if waits:
        lines.append(f"  requests left waiting, by reason (detailed steps): {waits}")

    ttft = [r.get(S.REQUEST_TTFT_MS) for r in requests if r.get(S.REQUEST_TTFT_MS) is not None]
    if ttft:
        lines.append(f"  time to first token: mean {_ms(sum(ttft) / len(ttft))}, max {_ms(max(ttft))} "
                     f"({len(ttft)} requests)")
    queue = [r.get(S.REQUEST_QUEUE_TIME_MS) for r in requests if r.get(S.REQUEST_QUEUE_TIME_MS) is not None]
    if queue:
        lines.append(f"  queue time: mean {_ms(sum(queue) / len(queue))}, max {_ms(max(queue))}")

    if S.TRACE_STEPS_AGGREGATED in attrs:
        line = (f"  trace: {attrs.get(S.TRACE_STEPS_DETAILED, len(steps))} steps detailed, "
                f"{attrs[S.TRACE_STEPS_AGGREGATED]} in {attrs.get(S.TRACE_AGGREGATE_SPANS, 0)} aggregate spans "
                f"({attrs.get(S.TRACE_STEPS_OVER_BUDGET, 0)} of them for the span budget)")
        if attrs.get(S.TRACE_SPANS_DROPPED):
            line += f", {attrs[S.TRACE_SPANS_DROPPED]} spans dropped at the exporter's hand-off"
        if attrs.get(S.TRACE_POLICY):
            line += f"; detailed: {attrs[S.TRACE_POLICY]}"
        lines.append(line)
    return lines


INTERRUPTS = ("KeyboardInterrupt", "SIGTERM", "ProcessExited", "TracingShutdown")


def _forward_part_lines(steps: list[_Span]) -> list[str]:
    """At `debug`, the time of each part of the forward (its child spans), summed over the
    detailed steps' forwards that have them, and its share of those forwards' time."""
    part_ms: dict[str, float] = defaultdict(float)
    forward_ms, forwards = 0.0, 0
    for step in steps:
        for forward in (s for s in step.descendants() if s.name == S.FORWARD):
            parts = [c for c in forward.children if c.name in S.FORWARD_PART_SPANS]
            if not parts:
                continue
            forwards += 1
            forward_ms += forward.ms
            for part in parts:
                part_ms[part.name] += part.ms
    if not forwards:
        return []
    def share(ms):
        return 100 * ms / forward_ms if forward_ms else 0.0

    lines = [f"  time per forward part (of {_ms(forward_ms)} in {forwards} {S.FORWARD} spans of detailed steps):"]
    for name in S.FORWARD_PART_SPANS:
        if name in part_ms:
            lines.append(f"    {name:<22} {_ms(part_ms[name]):>11}  {share(part_ms[name]):5.1f}%")
    rest = max(forward_ms - sum(part_ms.values()), 0.0)
    lines.append(f"    {'(outside the parts)':<22} {_ms(rest):>11}  {share(rest):5.1f}%")
    return lines


def _step_time_lines(attrs: dict, steps: list[_Span], spans: list[_Span]) -> list[str]:
    """Step times over every step (from llm.generate), and the slowest step: detailed or not."""
    lines = []
    by_index = {s.get(S.STEP_INDEX): s for s in steps}
    if S.STEP_TIME_MAX_MS in attrs:
        lines.append(f"  step time over all {attrs.get(S.STEPS_COUNT, '?')} steps: "
                     f"mean {_ms(attrs.get(S.STEP_TIME_MEAN_MS, 0))}, p50 {_ms(attrs.get(S.STEP_TIME_P50_MS, 0))}, "
                     f"p99 {_ms(attrs.get(S.STEP_TIME_P99_MS, 0))}, max {_ms(attrs[S.STEP_TIME_MAX_MS])}")
        index = attrs.get(S.SLOWEST_STEP_INDEX)
        slowest = by_index.get(index)
        if slowest is not None:
            lines.append(f"  slowest step: #{index} ({_phase_of(slowest)}, {slowest.get(S.NUM_SEQS, '?')} seqs, "
                         f"{slowest.get(S.NUM_BATCHED_TOKENS, '?')} tokens) {_ms(slowest.ms)}, detailed "
                         f"({slowest.get(S.STEP_DETAIL_REASON, '?')})")
        else:
            lines.append(f"  slowest step: #{index} {_ms(attrs[S.STEP_TIME_MAX_MS])}, not detailed "
                         f"(in an {S.STEPS} aggregate span)")
    elif steps:
        slowest = max(steps, key=lambda s: s.duration_us)
        lines.append(f"  slowest detailed step: #{slowest.get(S.STEP_INDEX, '?')} ({_phase_of(slowest)}, "
                     f"{slowest.get(S.NUM_SEQS, '?')} seqs, {slowest.get(S.NUM_BATCHED_TOKENS, '?')} tokens) "
                     f"{_ms(slowest.ms)}")
    return lines


def _hit_rate(attrs: dict, spans: list[_Span]) -> str:
    """Prompt tokens served from the prefix cache, of all prompt tokens, at first admissions (as
    vLLM counts it: a preempted request's recomputation is not counted); the block-lookup rate
    beside it is higher, since a sequence's lookups stop at its first miss."""
    rate = attrs.get(S.GEN_PREFIX_HIT_RATE)
    if rate is not None:
        if S.GEN_PREFIX_BLOCK_HIT_RATE not in attrs:   # a trace from before otvllm counted tokens
            return f"{100 * rate:.1f}% of block lookups"
        text = f"{100 * rate:.1f}% of prompt tokens"
        if S.GEN_PREFIX_CACHED_TOKENS in attrs:
            text += f" ({_num(attrs[S.GEN_PREFIX_CACHED_TOKENS])} tokens)"
        text += (f"; full-block lookups {100 * attrs[S.GEN_PREFIX_BLOCK_HIT_RATE]:.1f}% hits "
                 f"(a sequence's lookups stop at its first miss)")
        if attrs.get(S.GEN_PREEMPTIONS):
            text += "; re-admissions after preemption not counted"
        return text
    prefills = [s for s in spans if s.name == S.SCHEDULE and s.get(S.PHASE) in ("prefill", "mixed")]
    cached = sum(s.get(S.NUM_CACHED_TOKENS, 0) for s in prefills)
    computed = sum(s.get(S.NUM_PREFILL_TOKENS, s.get(S.NUM_BATCHED_TOKENS, 0)) for s in prefills)
    if not cached + computed:
        return "n/a"
    return f"{100 * cached / (cached + computed):.1f}% of prompt tokens (in traced steps)"


def _memory(attrs: dict, spans: list[_Span]) -> str:
    peaks = [s.get(S.MEM_PEAK) for s in spans if s.get(S.MEM_PEAK) is not None]
    if S.GEN_MEM_PEAK in attrs:
        peaks.append(attrs[S.GEN_MEM_PEAK])
    if not peaks:
        return "n/a (CPU)"
    text = f"peak {human_bytes(max(peaks))}"
    start, end = attrs.get(S.GEN_MEM_START), attrs.get(S.GEN_MEM_END)
    if start is not None and end is not None:
        growth = end - start
        text += f", allocated at start {human_bytes(start)}, at end {human_bytes(end)}"
        if growth:
            text += f" ({'+' if growth > 0 else '-'}{human_bytes(abs(growth))})"
    return text


def _preemptions(attrs: dict, spans: list[_Span], requests: list[_Span]):
    if S.GEN_PREEMPTIONS in attrs:
        return attrs[S.GEN_PREEMPTIONS]
    if any(S.REQUEST_PREEMPTIONS in r.attrs for r in requests):
        return sum(r.get(S.REQUEST_PREEMPTIONS, 0) for r in requests)
    counted = [s.get(S.NUM_PREEMPTED) for s in spans if s.name == S.SCHEDULE and s.get(S.NUM_PREEMPTED) is not None]
    return f"{sum(counted)} (in traced steps)" if counted else "n/a"


def _first_preemption(spans: list[_Span]) -> str:
    schedules = sorted((s for s in spans if s.name == S.SCHEDULE and s.get(S.PREEMPTED_FOR)), key=lambda s: s.start_us)
    if not schedules:
        return ""
    a, step = schedules[0].attrs, schedules[0].inherited(S.STEP_INDEX)
    victims, needing = _json_list(a.get(S.PREEMPTED_SEQ_IDS, [])), _json_list(a[S.PREEMPTED_FOR])
    return (f" (first at step {step}: seq {victims[0]} preempted for seq {needing[0]}, which needed "
            f"{a.get(S.PREEMPTION_BLOCKS_NEEDED, '?')} block(s) with {a.get(S.PREEMPTION_BLOCKS_FREE, '?')} free; "
            f"{a.get(S.BLOCKS_FREED, '?')} blocks freed)")


def _waiting_reasons(spans: list[_Span]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for s in spans:
        if s.name == S.SCHEDULE and s.get(S.WAITING_REASON):
            counts[s.get(S.WAITING_REASON)] += 1
    return ", ".join(f"{reason} in {n} steps" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


# ---- engine.init -------------------------------------------------------------------------------

def _init_lines(init: _Span) -> list[str]:
    found = {}
    for span in init.descendants():
        found.setdefault(span.name, span)
    lines = [f"  init {_ms(init.ms)}" + (f" FAILED ({init.error})" if init.error else "")]
    loads = [found[name] for name in (S.CONFIG_LOAD, S.TOKENIZER_LOAD) if name in found]
    if loads:
        lines.append("  " + ", ".join(f"{s.name} {_ms(s.ms)}" for s in loads))
    load = found.get(S.MODEL_LOAD)
    if load is not None:
        a = load.attrs
        parts = [f"{a[key]} {label}" for key, label in (
            (S.MODEL_LAYERS, "layers"), (S.MODEL_HIDDEN_SIZE, "hidden"), (S.MODEL_HEADS, "heads"),
            (S.MODEL_KV_HEADS, "kv heads"), (S.MODEL_HEAD_DIM, "head_dim"), (S.MODEL_VOCAB_SIZE, "vocab"))
            if key in a]
        if S.MODEL_DTYPE in a:
            parts.append(str(a[S.MODEL_DTYPE]))
        if S.MODEL_PARAMETER_BYTES in a:
            parts.append(f"{human_bytes(a[S.MODEL_PARAMETER_BYTES])} of parameters")
        lines.append(f"  model: {a.get(S.MODEL_ARCHITECTURE, '?')}: {', '.join(parts)}")
        lines.append(f"  model.load {_ms(load.ms)}")
    kv = found.get(S.KV_CACHE_ALLOCATE)
    if kv is not None:
        a = kv.attrs
        line = f"  KV cache: {a.get(S.BLOCKS_TOTAL, '?')} blocks of {a.get(S.BLOCK_SIZE, '?')} tokens"
        if S.KV_CACHE_BYTES in a:
            line += f", {human_bytes(a[S.KV_CACHE_BYTES])}"
        if kv.error is not None:
            lines.append(line + f" planned, FAILED ({kv.error})")
        else:
            lines.append(line + f" (allocated in {_ms(kv.ms)})")
    graphs = found.get(S.CUDA_GRAPH_CAPTURE)
    if graphs is not None:
        sizes = _json_list(graphs.get(S.CUDA_GRAPH_BATCH_SIZES, []))
        prefill = _json_list(graphs.get(S.CUDA_GRAPH_PREFILL_TOKENS, []))
        line = f"  CUDA graphs: {len(sizes) if isinstance(sizes, list) else '?'} decode batch sizes"
        if isinstance(prefill, list) and prefill:
            line += f", {len(prefill)} prefill token counts (up to {_num(max(prefill))} tokens)"
        lines.append(line + f" captured in {_ms(graphs.ms)}")
    peaks = [s.get(S.MEM_PEAK) for s in [init, *init.descendants()] if s.get(S.MEM_PEAK) is not None]
    lines.append(f"  CUDA memory: {f'peak {human_bytes(max(peaks))}' if peaks else 'n/a (CPU)'}")
    return lines


# ---- errors ------------------------------------------------------------------------------------

def _is_request(span: _Span) -> bool:
    return S.is_request(span.name, span.attrs)


def _error_lines(spans: list[_Span]) -> list[str]:
    """Every span in ERROR, where it failed first (innermost, earliest end) and what it took down
    after; request spans ended by the failure as one line."""
    failed = [s for s in spans if s.error is not None]
    if not failed:
        return []
    requests = [s for s in failed if _is_request(s)]
    others = [s for s in failed if not _is_request(s)]

    def depth(span):
        n = 0
        while span.up is not None:
            span, n = span.up, n + 1
        return n

    lines = [f"  errors: {len(failed)} spans in ERROR"]
    for span in sorted(others, key=lambda s: (s.start_us + s.duration_us, -depth(s))):
        where = []
        if span.get(S.LAYER_INDEX) is not None:
            where.append(f"layer {span.get(S.LAYER_INDEX)}")
        phase, step = span.inherited(S.PHASE), span.inherited(S.STEP_INDEX)
        if phase is not None:
            where.append(str(phase))
        if step is not None:
            where.append(f"step {step}")
        message = span.get("otel.status_description") or span.error
        lines.append(f"    {span.name}{' (' + ', '.join(where) + ')' if where else ''}: {message}")
        if span.get(S.ERROR_ADVICE):
            lines.append(f"      advice: {span.get(S.ERROR_ADVICE)}")
    if requests:
        kinds = sorted({r.error for r in requests})
        lines.append(f"    {len(requests)} request spans ({', '.join(kinds)}): "
                     f"{requests[0].get('otel.status_description') or requests[0].error}")
    return lines


def _content_lines(spans: list[_Span]) -> list[str]:
    """Whether request spans carry their content (opt-in): what the "wrong output" recipe needs."""
    requests = [s for s in spans if _is_request(s)]
    carrying = [r for r in requests if S.REQUEST_OUTPUT_TOKEN_IDS in r.attrs or S.GEN_AI_INPUT_MESSAGES in r.attrs]
    if not carrying:
        return []
    what = "prompt and output token ids"
    if all(S.GEN_AI_INPUT_MESSAGES in r.attrs for r in carrying):
        what += " and text"
    with_logprobs = [r for r in carrying if S.REQUEST_LOGPROBS in r.attrs]
    if with_logprobs:
        tops = sorted({r.get(S.REQUEST_TOP_LOGPROBS_N) for r in with_logprobs if r.get(S.REQUEST_TOP_LOGPROBS_N)})
        logprobs = f"log-probabilities in {len(with_logprobs)}" + (f" (top {'/'.join(map(str, tops))})" if tops else "")
    else:
        logprobs = "no log-probabilities (no request asked for logprobs)"
    return [f"  content captured: {len(carrying)} of {len(requests)} requests carry their {what}; {logprobs}"]


# ---- whole traces ------------------------------------------------------------------------------

def _trace_header(trace: dict, root: _Span | None, n_spans: int) -> str:
    services = sorted({p.get("serviceName", "?") for p in (trace.get("processes") or {}).values()})
    name = root.name if root is not None else "?"
    return f"{name}  trace {trace.get('traceID', '?')}  service {', '.join(services) or '?'}  ({n_spans} spans)"


def _summarize_trace(trace: dict) -> list[str]:
    spans = _tree(trace)
    if not spans:
        return [f"trace {trace.get('traceID', '?')}: no spans"]
    roots = [s for s in spans if s.parent is None or all(s.parent != o.id for o in spans)]
    lines = [_trace_header(trace, roots[0] if roots else spans[0], len(spans))]
    lines.extend(_error_lines(spans))
    gens = [s for s in spans if s.name in (S.GENERATE, S.ENGINE_LOOP)]
    inits = [s for s in spans if s.name == S.ENGINE_INIT]
    for init in inits:
        if len(inits) > 1:
            lines.append(f" {S.ENGINE_INIT}:")
        lines.extend(_init_lines(init))
    for gen in gens:
        if len(gens) > 1 or inits:
            lines.append(f" {gen.name} ({_ms(gen.ms)}):")
        lines.extend(_generate_lines(gen, list(gen.descendants())))
    if not gens and any(S.is_step(s.name) for s in spans):
        lines.append("  (no llm.generate span in this trace; figures from the step spans)")
        lines.extend(_generate_lines(None, spans))
    lines.extend(_content_lines(spans))
    if not gens and not inits and not any(S.is_step(s.name) for s in spans):
        counts: dict[str, int] = defaultdict(int)
        for s in spans:
            counts[s.name] += 1
        top = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1])[:8])
        lines.append(f"  no otvllm spans; duration {_ms(max(r.ms for r in roots or spans))}; spans: {top}")
    return lines


def summarize(traces: list[dict]) -> str:
    if not traces:
        return "no traces"
    def start(trace):
        return min((s.get("startTime", 0) for s in trace.get("spans") or []), default=0)

    blocks = ["\n".join(_summarize_trace(t)) for t in sorted(traces, key=start)]   # oldest first
    return "\n\n".join(blocks)


def summarize_file(path: str) -> str:
    traces = load_jaeger_json(path)
    return f"{path}: {len(traces)} trace(s)\n\n" + summarize(traces)
