"""`otvllm trace plot FILE -o run.html`: a run's shape over its steps, drawn with plotly from a
Jaeger JSON trace file alone: step time split by phase (and GPU time), batch size, tokens
(prompt tokens and decode tokens, stacked), KV blocks used and free, preemptions, CUDA memory
and GPU utilisation.

One point per detailed step (`engine.step`), at its `otvllm.step.index`, lines broken where
steps are not detailed; those show as their stretch's mean time (`engine.steps`). Rows with nothing to show
(CUDA memory on CPU) are left out. Output: `.html` (self-contained, opens offline) or
`.json` (the plotly figure)."""

import os
from dataclasses import dataclass, field

from otvllm.tracing import schema as S
from otvllm.tracing.export.trace_file import directory_problem, file_mode, write_atomically
from otvllm.tracing.tools.jaeger_reader import load_jaeger_json, parent_id, span_tags

FORMATS = (".html", ".json")
OTHER = "other"                       # step time outside its phase spans
GPU_TIME = "GPU time (CUDA events)"
STRETCH_MEAN = "steps not detailed (mean of each stretch)"
GiB = 1 << 30


@dataclass
class Call:
    """The steps of one llm.generate call (or of a server's engine loop, all windows)."""

    label: str
    steps: list[dict] = field(default_factory=list)        # one dict of figures per detailed step
    stretches: list[tuple] = field(default_factory=list)   # (first index, last index, mean ms)


def read_calls(path: str) -> list[Call]:
    """The calls of a trace file, in the order they started; ValueError naming the file when
    it is not a trace file or has no engine steps."""
    spans = [s for trace in load_jaeger_json(path) for s in trace["spans"]]
    by_id = {s["spanID"]: s for s in spans}
    children: dict[str, list[dict]] = {}
    for s in spans:
        children.setdefault(parent_id(s), []).append(s)
    roots = sorted((s for s in spans if s.get("operationName") in (S.GENERATE, S.ENGINE_LOOP)),
                   key=lambda s: s.get("startTime", 0))
    calls, loop, generates = [], None, 0
    for root in roots:
        if root["operationName"] == S.ENGINE_LOOP:   # a server's windows continue one another
            if loop is None:
                loop = Call("engine loop")
                calls.append(loop)
            call = loop
        else:
            call = Call(f"{S.GENERATE} #{generates}")
            generates += 1
            calls.append(call)
        for child in children.get(root["spanID"], ()):
            if S.is_step(child.get("operationName", "")):
                call.steps.append(_step_figures(child, children))
            elif S.is_steps(child.get("operationName", "")):
                a = span_tags(child)
                call.stretches.append((a.get(S.STEPS_FIRST_INDEX), a.get(S.STEPS_LAST_INDEX),
                                       a.get(S.STEP_TIME_MEAN_MS)))
    calls = [c for c in calls if c.steps]
    if not calls:
        orphan = any(S.is_step(s.get("operationName", "")) and parent_id(s) not in by_id for s in spans)
        raise ValueError(f"{path}: no engine steps to plot" + (
            " (their llm.generate span is not in the file)" if orphan else
            " (traced at level request or off? steps need level step or debug)"))
    for call in calls:
        call.steps.sort(key=lambda s: s["index"])
        call.stretches.sort(key=lambda s: s[0] if s[0] is not None else -1)
    return calls


def _step_figures(step: dict, children: dict) -> dict:
    a = span_tags(step)
    ms = step.get("duration", 0) / 1000
    figures = {"index": a.get(S.STEP_INDEX), "phase": a.get(S.PHASE), "time_ms": ms,
               "seqs": a.get(S.NUM_SEQS), "prefill_tokens": a.get(S.NUM_PREFILL_TOKENS),
               "decode_tokens": a.get(S.NUM_DECODE_TOKENS),
               "utilization": a.get(S.GPU_UTILIZATION), "memory_utilization": a.get(S.GPU_MEMORY_UTILIZATION)}
    phases = dict.fromkeys(S.STEP_PHASE_SPANS, 0.0)
    for child in children.get(step["spanID"], ()):
        name = child.get("operationName")
        if name not in phases:
            continue
        phases[name] += child.get("duration", 0) / 1000
        c = span_tags(child)
        if name == S.SCHEDULE:
            figures.update(blocks_used=c.get(S.BLOCKS_USED), blocks_free=c.get(S.BLOCKS_FREE),
                           preempted=c.get(S.NUM_PREEMPTED))
        elif name == S.FORWARD:
            figures.update(gpu_ms=c.get(S.GPU_TIME_MS), mem_allocated=c.get(S.MEM_ALLOCATED),
                           mem_reserved=c.get(S.MEM_RESERVED), mem_peak=c.get(S.MEM_PEAK))
    figures.update(phases)
    figures[OTHER] = max(0.0, ms - sum(phases.values()))
    return figures


def _series(call: Call, key: str, scale: float = 1.0) -> list | None:
    """One value per step (None where a step lacks it), or None when no step has it."""
    values = [s.get(key) for s in call.steps]
    if all(v is None for v in values):
        return None
    return [v / scale if v is not None else None for v in values]


def _axis(call: Call) -> tuple[list, list, list]:
    """The x values (step indexes), each step's phase, and which step each x shows: None at a
    gap between detailed steps, where lines break (steps not detailed have no values)."""
    x, phase, keep = [], [], []
    for i, step in enumerate(call.steps):
        if x and x[-1] is not None and step["index"] is not None and step["index"] > x[-1] + 1:
            x.append(x[-1] + 1)
            phase.append("")
            keep.append(None)
        x.append(step["index"])
        phase.append(step["phase"])
        keep.append(i)
    return x, phase, keep


def figure(call: Call, title: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    x, phase, keep = _axis(call)
    # (row title, [(series name, values, kind)]): kind "bar" stacks, "line" draws.
    rows = [("step time (ms)", [(name, _series(call, name), "bar") for name in (*S.STEP_PHASE_SPANS, OTHER)]
             + [(GPU_TIME, _series(call, "gpu_ms"), "line")]),
            ("sequences in the batch", [("sequences", _series(call, "seqs"), "line")]),
            ("batched tokens", [("prompt tokens", _series(call, "prefill_tokens"), "bar"),
                                ("decode tokens", _series(call, "decode_tokens"), "bar")]),
            ("KV-cache blocks", [("KV blocks used", _series(call, "blocks_used"), "line"),
                                 ("KV blocks free", _series(call, "blocks_free"), "line")]),
            ("preempted sequences", [("preempted", _series(call, "preempted"), "bar")]),
            ("CUDA memory (GiB)", [("CUDA allocated", _series(call, "mem_allocated", GiB), "line"),
                                   ("CUDA reserved", _series(call, "mem_reserved", GiB), "line"),
                                   ("CUDA peak", _series(call, "mem_peak", GiB), "line")]),
            ("GPU utilisation (%, NVML)", [("GPU utilisation", _series(call, "utilization"), "line"),
                                           ("GPU memory utilisation", _series(call, "memory_utilization"), "line")])]
    rows = [(name, [s for s in series if s[1] is not None]) for name, series in rows]
    rows = [(name, series) for name, series in rows if series]
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=[name for name, _ in rows])
    for row, (row_title, series) in enumerate(rows, start=1):
        for name, values, kind in series:
            common = dict(x=x, y=[values[i] if i is not None else None for i in keep], name=name, text=phase,
                          legendgroup=str(row), legendgrouptitle_text=row_title,
                          hovertemplate=f"step %{{x}} (%{{text}})<br>{name}: %{{y}}<extra></extra>")
            trace = go.Bar(**common) if kind == "bar" else go.Scatter(mode="lines+markers", **common)
            fig.add_trace(trace, row=row, col=1)
    if call.stretches:   # steps without their own spans: their stretch's mean, as a level line
        sx, sy = [], []
        for first, last, mean in call.stretches:
            sx += [first, last, None]
            sy += [mean, mean, None]
        fig.add_trace(go.Scatter(x=sx, y=sy, name=STRETCH_MEAN, mode="lines", line=dict(dash="dot"),
                                 legendgroup="1"), row=1, col=1)
    fig.update_layout(title=title, barmode="stack", height=230 * len(rows) + 120, hovermode="x unified")
    fig.update_xaxes(title_text="step (otvllm.step.index)", row=len(rows), col=1)
    return fig


def check_output(path: str, source: str) -> str:
    """The absolute output path, or ValueError if a plot cannot be written there."""
    out = os.path.abspath(path)
    if os.path.splitext(out)[1].lower() not in FORMATS:
        raise ValueError(f"-o {path}: the plot is written as {' or '.join(FORMATS)} (plotly); name the file so")
    if out == os.path.abspath(source):
        raise ValueError(f"-o {path} is the trace file itself: give another file name")
    if os.path.isdir(out):
        raise ValueError(f"-o {path} is a directory: give a file name")
    problem = directory_problem(out)
    if problem:
        raise ValueError(f"-o {path}: {problem}")
    return out


def plot_file(path: str, out: str, call_index: int = 0) -> str:
    """Plot call `call_index` of trace file `path` into `out`; returns a line saying what was drawn."""
    out = check_output(out, path)
    try:
        import plotly  # noqa: F401  (checked before the work)
    except ImportError:
        raise ValueError("otvllm trace plot needs plotly: pip install 'otvllm[plot]'") from None
    calls = read_calls(path)
    if not 0 <= call_index < len(calls):
        raise ValueError(f"--call {call_index}: {path} has {len(calls)} call(s) with steps "
                         f"(0 to {len(calls) - 1})")
    call = calls[call_index]
    title = f"{os.path.basename(path)}: {call.label}, {len(call.steps)} detailed steps"
    fig = figure(call, title)
    text = fig.to_json() if out.lower().endswith(".json") else fig.to_html(include_plotlyjs=True, full_html=True)
    write_atomically(out, text.encode(), file_mode(private=False))
    return f"plot of {call.label} ({len(call.steps)} detailed steps) written to {out}"
