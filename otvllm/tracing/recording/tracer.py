"""The engine's tracer: records spans on the engine thread as plain objects and hands them
to a sink (sinks.py) as they finish, so a trace exists while the run goes on and after it
dies.

The contract, as the engine uses it:

    with tracer.init(config) as init:                 # engine.init, with the config as asked
        init.decided(resolved)                        # and as start-up resolved it
        init.phase(S.MODEL_LOAD, load, attrs=fn)      # one child span per start-up phase
        init.ranks(records)                           # tensor parallelism: each rank's part of it
    tracer.observe(scheduler, block_manager, layers)  # what later spans read
    with tracer.generate(seqs, prompts):              # llm.generate and one span per request
        with tracer.step() as step:                   # one engine step
            batch = step.phase(S.SCHEDULE, schedule, attrs=A.schedule_attrs)
            step.begin(batch)
            result = step.phase(name, fn, *args, attrs=attrs_fn)   # attrs_fn(result, *args)
            step.ranks(records)                                    # each rank's part of the forward
            step.postprocessed(batch, finished)

At level `off` the engine gets a NullTracer whose `phase` only calls the function. Which
steps keep their spans is decided after each step ends (retention.py).
"""

import os
import sys
import uuid
from collections import OrderedDict, deque
from contextlib import contextmanager

import torch
from opentelemetry import context as otel_context

from otvllm.environment import read as read_environment
from otvllm.tracing import schema as S
from otvllm.tracing.level import TraceLevel
from otvllm.tracing.recording import attributes as A
from otvllm.tracing.recording.cuda import GpuTimer, memory_snapshot
from otvllm.tracing.recording.failures import OOM_ADVICE, describe_failure
from otvllm.tracing.recording.nvml import GpuTelemetry
from otvllm.tracing.recording.profiler import StepProfiler
from otvllm.tracing.recording.records import (CLOSE, OPEN, SPANS, SpanRecord, error_type, now_ns,
                                               remote_parent_of)
from otvllm.tracing.recording.retention import RetentionPolicy, StepStats, StepStretch, StepSummary
from otvllm.tracing.recording.sinks import current_sink

LOOP_WINDOW_NS = 10_000_000_000   # the engine loop starts a new trace this often (while it has work)
MAX_LINKS = 128                   # links of a step to its requests, and of a request to its steps
RECENT_REQUESTS = 8192            # requests a step detailed late can still link to

_PARENT_RECORD = otel_context.create_key("otvllm-parent-record")


def _root(name: str, attrs: dict) -> SpanRecord:
    """A record under the enclosing `run_span`, or else under the caller's current span."""
    parent = otel_context.get_value(_PARENT_RECORD)
    record = SpanRecord(name, parent, now_ns(), attrs=attrs)
    if parent is None:
        record.remote_parent = remote_parent_of()
    return record


@contextmanager
def run_span(name: str, attrs: dict | None = None):
    """A span that encloses a whole program's run (the CLI's), announced when it starts:
    `engine.init` and `llm.generate` inside it join its trace."""
    sink = current_sink()
    record = _root(name, dict(attrs or {}))
    sink.send(OPEN, record)
    token = otel_context.attach(otel_context.set_value(_PARENT_RECORD, record))
    try:
        with record:
            yield record
    finally:
        otel_context.detach(token)
        sink.send(CLOSE, record)
        sink.drain()


def current_run_rid() -> int | None:
    """The rid of the enclosing `run_span`, for another process to join it (`joined_run`)."""
    record = otel_context.get_value(_PARENT_RECORD)
    return record.rid if record is not None else None


class _RunOfAnotherProcess:
    __slots__ = ("rid",)

    def __init__(self, rid: int):
        self.rid = rid


@contextmanager
def joined_run(rid: int | None):
    """Records made inside are children of run span `rid` of another process whose records go
    to the same export process (`otvllm serve`'s engine process joins the CLI's run)."""
    if rid is None:
        yield
        return
    token = otel_context.attach(otel_context.set_value(_PARENT_RECORD, _RunOfAnotherProcess(rid)))
    try:
        yield
    finally:
        otel_context.detach(token)


# ---- level off ------------------------------------------------------------------------------

class _NullPhases:
    __slots__ = ()

    def phase(self, name, fn, *args, attrs=None):
        return fn(*args)

    def decided(self, resolved) -> None:
        pass

    def begin(self, batch) -> None:
        pass

    def ranks(self, records) -> None:
        pass

    def postprocessed(self, batch, finished) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


_NULL = _NullPhases()


class NullTracer:
    level = TraceLevel.OFF

    def serve(self):
        return _NULL

    def request_arrived(self, seq, prompt, parent, operation=None, response_id=None, choice=(0, 1)) -> None:
        pass

    def request_ended(self, seq, reason: str) -> None:
        pass

    def init(self, config):
        return _NULL

    def observe(self, *parts, **named) -> None:
        pass

    def generate(self, seqs, prompts):
        return _NULL

    def step(self):
        return _NULL


# ---- start-up -------------------------------------------------------------------------------

class _InitTrace:
    """engine.init and its phases; sent as each ends."""

    def __init__(self, sink, config, device: torch.device):
        self.sink, self.device = sink, device
        self.record = _root(S.ENGINE_INIT, A.config_attrs(config))
        self.last: SpanRecord | None = None   # the latest phase

    def __enter__(self):
        self.sink.send(OPEN, self.record)
        self.record.__enter__()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.record.__exit__(kind, exc, tb)
        self.sink.send(CLOSE, self.record)
        self.sink.drain()

    def decided(self, resolved) -> None:
        """What start-up decided (a ResolvedConfig) replaces what was asked, where it differs."""
        self.record.attrs.update(A.config_attrs(resolved))

    def phase(self, name, fn, *args, attrs=None):
        """`attrs(result, *args)`; on failure `attrs(None, *args)`: what was planned."""
        record = self.last = SpanRecord(name, self.record, now_ns())
        try:
            with record:
                result = fn(*args)
        except Exception as e:
            describe_failure(record, e, attrs, args, self.device)
            self.sink.send(SPANS, [record])
            if isinstance(e, torch.cuda.OutOfMemoryError):   # the caller's message says what to change
                raise torch.cuda.OutOfMemoryError(f"{OOM_ADVICE}. During {name}: {e}") from e
            raise
        except BaseException:
            self.sink.send(SPANS, [record])
            raise
        if attrs is not None:
            record.attrs.update(attrs(result, *args))
        record.attrs.update(memory_snapshot(self.device))
        self.sink.send(SPANS, [record])
        return result

    def ranks(self, records: list[SpanRecord]) -> None:
        """Each tensor-parallel rank's records of the latest phase, as its children."""
        if records:
            for record in records:
                record.parent = self.last.rid
            self.sink.send(SPANS, records)


# ---- one generate call ------------------------------------------------------------------------

class _Call:
    """The steps of one `generate` call, or of one window of the engine loop (serving)."""

    def __init__(self, root: SpanRecord, level: TraceLevel, max_spans: int, requests: dict, origins: dict,
                 launch_index: dict, request_rids: dict, first_index: int = 0, seqs=None):
        self.root = root
        self.seqs = seqs                          # a generate call's sequences (None for a window)
        self.requests = requests                  # seq id -> its open request record
        self.origins = origins                    # seq id -> (its sequence, its prompt)
        self.launch_index = launch_index          # id of a launched batch -> its step index
        self.first_index = first_index            # index of this call's first step
        self.request_rids = request_rids          # seq id -> its request record's rid (ended or not), for links
        self.stats = StepStats()
        self.policy = RetentionPolicy(every_step=level is TraceLevel.DEBUG, first_index=first_index)
        self.ring: deque[_StepTrace] = deque()   # the newest undecided steps
        self.ahead: deque[int] = deque()   # detailed steps the open stretch has not reached yet
        self.stretch = StepStretch()
        self.awaiting_gpu: deque[_StepTrace] = deque()   # detailed, their GPU time not known yet
        # Spans of this call's steps: the root (and a generate call's request spans and their group)
        # are always kept.
        self.budget = max_spans - 1 - (len(seqs) + 1 if seqs is not None else 0)
        self.steps = self.prefill_steps = self.drain_steps = 0
        self.prefill_ns = self.decode_ns = 0
        self.last_end_ns = 0
        self.over_budget = self.dropped_spans = self.aggregates = 0
        self.detailed_indexes: set[int] = set()


class _Serving:
    """The engine loop's tracing state, across its windows."""

    def __init__(self):
        self.requests: dict[int, SpanRecord] = {}
        self.origins: dict[int, object] = {}
        self.request_rids: OrderedDict[int, int] = OrderedDict()   # recent requests, ended or not
        self.launch_index: dict[int, int] = {}
        self.window: _Call | None = None
        self.windows = 0
        self.next_index = 0


class _StepTrace:
    """One step: its span, its phases' spans, and its few numbers."""

    __slots__ = ("tracer", "call", "record", "children", "batch", "gpu", "used_graph", "postprocessed_any",
                 "summary", "forward", "profiled")

    def __init__(self, tracer: "EngineTracer", call: _Call):
        self.tracer, self.call = tracer, call
        self.record = SpanRecord(S.STEP, call.root, 0)
        self.children: list[SpanRecord] = []
        self.batch = None
        self.gpu = None
        self.forward: SpanRecord | None = None
        self.used_graph = True
        self.postprocessed_any = False
        self.summary: StepSummary | None = None
        self.profiled = False

    def __enter__(self):
        self.record.start_ns = now_ns()
        self.tracer._current_step = self
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.record.__exit__(kind, exc, tb)
        self.tracer._current_step = None
        self.tracer._end_step(self, exc)

    def phase(self, name, fn, *args, attrs=None):
        profiler = self.tracer.profiler if name == S.FORWARD else None
        profile = profiler.begin(self.call.first_index + self.call.steps) if profiler is not None else None
        record = SpanRecord(name, self.record, now_ns())
        self.children.append(record)   # before the spans the phase itself records (debug layers)
        timer = None
        if name == S.FORWARD:
            self.forward = record
            timer = self.tracer.gpu_timer
            if timer is not None:
                start = timer.start()
        try:
            with record:
                result = fn(*args) if profile is None else profile.run(fn, *args)
        except Exception as e:
            describe_failure(record, e, attrs, args, self.tracer.device, self.batch.phase if self.batch else None)
            raise
        if timer is not None:
            self.gpu = timer.stop(start)
        if name == S.FORWARD:
            self.used_graph = result[1]
        if attrs is not None:
            record.attrs = attrs(result, *args)
        if profile is not None:   # its kernels, after their parent
            self.children += profile.finish(record)
            self.profiled = True
        return result

    def begin(self, batch) -> None:
        """The batch this step launches (scheduled by its first phase)."""
        self.batch = batch
        self.tracer._on_schedule(self.call, batch)

    def ranks(self, records: list) -> None:
        """Each tensor-parallel rank's record of this step's forward, as its children."""
        forward = self.forward
        if forward is not None:
            for record in records:
                record.parent = forward.rid
            self.children.extend(records)

    def postprocessed(self, batch, finished) -> None:
        """The tokens of `batch` (launched by this step or the one before) are in."""
        self.postprocessed_any = True
        if finished and self.tracer.level is TraceLevel.DEBUG:   # its span is the phase just recorded
            self.children[-1].attrs[S.BLOCK_IDS_FREED] = [i for f in finished for i in f.freed_block_ids]
        self.tracer._on_postprocess(self.call, batch, finished)


class _RequestLevelStep(_StepTrace):
    """Level `request`: the step is measured (for the call's statistics), its phases are not."""

    __slots__ = ()

    def phase(self, name, fn, *args, attrs=None):
        result = fn(*args)
        if name == S.FORWARD:
            self.used_graph = result[1]
        return result


class EngineTracer:
    def __init__(self, level: TraceLevel, device: torch.device, model_name: str):
        self.level = level
        self.device = device
        self.model_name = model_name
        self.max_spans = read_environment("OTVLLM_TRACE_MAX_SPANS")
        self.gpu_timer = GpuTimer() if device.type == "cuda" and level >= TraceLevel.STEP else None
        self.profiler = StepProfiler.from_env(device) if level >= TraceLevel.STEP else None
        self.gpu_telemetry = GpuTelemetry.open(device) if device.type == "cuda" and level >= TraceLevel.STEP else None
        self.sink = current_sink()
        self.tokenizer = None
        self._uses_graphs = False
        self._call: _Call | None = None
        self._serving: _Serving | None = None
        self._current_step: _StepTrace | None = None
        self._part_hooks = []

    # ---- start-up ---------------------------------------------------------------------------------

    def init(self, config) -> _InitTrace:
        self.sink = current_sink()
        trace = _InitTrace(self.sink, config, self.device)
        if self.profiler is not None:   # within engine.init's time
            self.profiler.warm_up()
        return trace

    def observe(self, scheduler, block_manager, parts, tokenizer=None, uses_graphs: bool = False) -> None:
        """What later spans read: the scheduler's and block manager's counters (for each call's
        totals), the tokenizer (for opt-in content), and at `debug` the model's parts, (part,
        layer index or None, the module it starts with, the one it ends with) in the order a
        forward runs them, one span each per forward."""
        self.block_manager, self.scheduler = block_manager, scheduler
        self.tokenizer = tokenizer
        self._uses_graphs = uses_graphs
        if self.level is TraceLevel.DEBUG and not self._part_hooks:
            sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *a: None)
            for part, index, first, last in parts:
                # the part's start (ns) and input shape: set by `first`'s pre-hook, read by `last`'s hook
                started = [0, []]
                self._part_hooks.append(first.register_forward_pre_hook(self._part_start(sync, started)))
                self._part_hooks.append(last.register_forward_hook(self._part_end(sync, part, index, started),
                                                                   always_call=True))

    # ---- serving: the engine loop's own traces ------------------------------------------------
    #
    # A step serves requests from many client traces, so it cannot be a child of them: steps
    # live in the engine loop's own traces, one `engine.loop` span per window of
    # LOOP_WINDOW_NS, and link to the request spans of their batch; request spans (children
    # of the HTTP server span) link back to the detailed steps that served them.

    @contextmanager
    def serve(self):
        self.sink = sink = current_sink()
        if not sink.active:
            yield
            return
        self._serving = serving = _Serving()
        failure = None
        try:
            yield
        except BaseException as e:
            failure = e
            raise
        finally:
            self._close_window()
            for seq_id in list(serving.requests):
                self._close_request(serving.requests, serving.origins, seq_id, failure=failure,
                                    reason="shutdown")
            self._serving = None
            sink.drain()

    def request_arrived(self, seq, prompt, parent, operation: str = S.OPERATION_TEXT_COMPLETION,
                        response_id: str | None = None, choice: tuple[int, int] = (0, 1)) -> None:
        """A request joined the engine loop; `parent`: the HTTP server span it continues,
        `response_id`: the id of the HTTP response, `choice`: (its index among the response's
        choices, the choices asked per prompt)."""
        serving = self._serving
        if serving is None:
            return
        index, count = choice
        attrs = {S.REQUEST_CHOICE_INDEX: index} | ({S.GEN_AI_REQUEST_CHOICE_COUNT: count} if count != 1 else {})
        record = self._open_request(serving.requests, serving.origins, seq, prompt, None, seq.arrival_ns or now_ns(),
                                    remote_parent=parent, operation=operation, response_id=response_id, attrs=attrs)
        serving.request_rids[seq.seq_id] = record.rid
        if len(serving.request_rids) > RECENT_REQUESTS:
            serving.request_rids.popitem(last=False)

    def request_ended(self, seq, reason: str) -> None:
        """A request left the engine early (aborted by its client, or ended by a stop string)."""
        serving = self._serving
        if serving is not None and seq.seq_id in serving.requests:
            self._close_request(serving.requests, serving.origins, seq.seq_id, reason=reason)

    def _window(self) -> _Call:
        serving = self._serving
        call = serving.window
        now = now_ns()
        if call is not None and now - call.root.start_ns > LOOP_WINDOW_NS:
            self._close_window()
            call = None
        if call is None:
            root = SpanRecord(S.ENGINE_LOOP, None, now, attrs={S.LOOP_WINDOW: serving.windows,
                                                                S.TRACE_LEVEL: str(self.level)})
            serving.windows += 1
            call = _Call(root, self.level, self.max_spans, serving.requests, serving.origins,
                         serving.launch_index, serving.request_rids, first_index=serving.next_index)
            serving.window = self._call = call
            self.sink.send(OPEN, root)
        return call

    def _close_window(self) -> None:
        serving = self._serving
        call = serving.window if serving is not None else None
        if call is None:
            return
        self._finish_steps(call, failed=False)
        call.root.end_ns = call.last_end_ns or now_ns()
        call.root.attrs.update(self._step_totals(call))
        call.root.attrs.update({S.LOOP_PREFILL_STEPS: call.prefill_steps,
                                S.LOOP_DECODE_STEPS: call.steps - call.prefill_steps - call.drain_steps})
        serving.next_index = call.first_index + call.steps
        serving.window = self._call = None
        self.sink.send(CLOSE, call.root)

    # ---- llm.generate and request spans ---------------------------------------------------------

    @contextmanager
    def generate(self, seqs, prompts):
        self.sink = sink = current_sink()
        if not sink.active:   # nobody would see the spans
            yield
            return
        root = _root(S.GENERATE, {
            S.GEN_AI_OPERATION: "text_completion", S.GEN_AI_SYSTEM: "otvllm",
            S.GEN_AI_REQUEST_MODEL: self.model_name, S.GEN_NUM_REQUESTS: len(seqs),
            S.GEN_PROMPT_TOKENS: sum(s.num_prompt_tokens for s in seqs), S.TRACE_LEVEL: str(self.level),
        })
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            root.attrs[S.GEN_MEM_START] = memory_snapshot(self.device)[S.MEM_ALLOCATED]
        before = self._counters()
        self._call = call = _Call(root, self.level, self.max_spans, {}, {}, {}, {}, seqs=seqs)
        sink.send(OPEN, root)
        group = SpanRecord(S.REQUESTS, root, root.start_ns, attrs={S.GEN_NUM_REQUESTS: len(seqs)})
        sink.send(OPEN, group)
        records = [self._open_request(call.requests, call.origins, seq, prompt, group, seq.arrival_ns or root.start_ns)
                   for seq, prompt in zip(seqs, prompts)]
        call.request_rids.update((seq.seq_id, record.rid) for seq, record in zip(seqs, records))
        try:
            with root:
                yield
        finally:
            self._call = None
            self._finish_steps(call, failed=root.error is not None)
            for seq in seqs:
                if seq.seq_id in call.requests:
                    self._close_request(call.requests, call.origins, seq.seq_id, failure=root.error)
            group.end_ns = max(r.end_ns for r in records)
            sink.send(CLOSE, group)
            root.attrs.update(self._generate_totals(call, *(a - b for a, b in zip(self._counters(), before))))
            sink.send(CLOSE, root)
            sink.drain()

    def _counters(self) -> tuple:
        """The engine's running totals a call reports the change of, in _generate_totals' order."""
        manager = self.block_manager
        return (manager.num_cache_queries, manager.num_cache_hits, manager.num_prompt_tokens_queried,
                manager.num_prompt_tokens_cached, self.scheduler.num_preemptions)

    def _open_request(self, requests: dict, origins: dict, seq, prompt, parent: SpanRecord | None, start_ns: int,
                      remote_parent=None, operation: str = S.OPERATION_TEXT_COMPLETION,
                      response_id: str | None = None, attrs: dict | None = None) -> SpanRecord:
        """Announce a request's span with what identifies it (the rest comes when it ends)."""
        record = SpanRecord(S.request_name(operation, self.model_name), parent, start_ns, attrs={
            S.GEN_AI_OPERATION: operation, S.GEN_AI_SYSTEM: "otvllm", S.GEN_AI_REQUEST_MODEL: self.model_name,
            S.GEN_AI_RESPONSE_ID: response_id or f"otvllm-{uuid.uuid4().hex}", S.SEQ_ID: seq.seq_id, **(attrs or {})})
        record.remote_parent = remote_parent
        requests[seq.seq_id] = record
        origins[seq.seq_id] = (seq, prompt)
        self.sink.send(OPEN, record)
        return record

    def _close_request(self, requests: dict, origins: dict, seq_id: int, failure=None,
                       reason: str | None = None) -> None:
        """End a request's span. `failure`: what ended the call or loop before the request
        finished (an exception, or a record's error); `reason`: why it ended early."""
        record = requests.pop(seq_id)
        seq, prompt = origins.pop(seq_id)
        record.end_ns = seq.finished_ns or now_ns()
        record.attrs.update(A.request_attrs(seq, self.model_name, reason))
        if A.trace_content_enabled():
            record.attrs.update(A.content_attrs(seq, prompt, self.tokenizer, reason))
        if seq.finish_reason is None and failure is not None:
            kind, message = (failure[0], failure[1]) if isinstance(failure, tuple) else \
                (error_type(failure), str(failure))
            record.error = (kind, f"the run ended before this request finished ({message or kind})", "")
        self.sink.send(CLOSE, record)

    def _generate_totals(self, call: _Call, queries: int, hits: int, prompt_tokens: int, cached_tokens: int,
                         preemptions: int) -> dict:
        output_tokens = sum(s.num_completion_tokens for s in call.seqs)
        seconds = max(call.root.end_ns - call.root.start_ns, 1) / 1e9
        attrs = {
            S.GEN_OUTPUT_TOKENS: output_tokens, S.GEN_STEPS: call.steps, S.GEN_PREFILL_STEPS: call.prefill_steps,
            S.GEN_DECODE_STEPS: call.steps - call.prefill_steps - call.drain_steps,
            S.GEN_PREFILL_TIME_MS: call.prefill_ns / 1e6, S.GEN_DECODE_TIME_MS: call.decode_ns / 1e6,
            S.GEN_THROUGHPUT: output_tokens / seconds, S.GEN_PREEMPTIONS: preemptions,
            S.GEN_PREFIX_HIT_RATE: cached_tokens / prompt_tokens if prompt_tokens else 0.0,
            S.GEN_PREFIX_CACHED_TOKENS: cached_tokens,
            S.GEN_PREFIX_BLOCK_HIT_RATE: hits / queries if queries else 0.0,
        }
        attrs.update(self._step_totals(call))
        if self.device.type == "cuda" and call.root.error is None:
            snapshot = memory_snapshot(self.device)
            attrs[S.GEN_MEM_END] = snapshot[S.MEM_ALLOCATED]
            attrs[S.GEN_MEM_PEAK] = snapshot[S.MEM_PEAK]
        return attrs

    def _step_totals(self, call: _Call) -> dict:
        """Step statistics over every step of a call or window, and what its trace kept."""
        attrs = call.stats.attrs()
        if self.level >= TraceLevel.STEP:
            detailed = len(call.detailed_indexes)
            slowest = call.stats.slowest
            attrs.update({
                S.TRACE_STEPS_DETAILED: detailed, S.TRACE_STEPS_AGGREGATED: call.steps - detailed,
                S.TRACE_AGGREGATE_SPANS: call.aggregates, S.TRACE_STEPS_OVER_BUDGET: call.over_budget,
                S.TRACE_SPANS_DROPPED: call.dropped_spans,
                S.SLOWEST_STEP_DETAILED: slowest is not None and slowest.index in call.detailed_indexes,
                S.TRACE_POLICY: f"{call.policy.describe()}; at most {self.max_spans} spans",
            })
        return attrs

    # ---- engine.step and its phases --------------------------------------------------------------

    def step(self):
        call = self._window() if self._serving is not None else self._call
        if call is None:
            return _NULL
        if self.level is TraceLevel.REQUEST:
            return _RequestLevelStep(self, call)
        return _StepTrace(self, call)

    def _on_schedule(self, call: _Call, batch) -> None:
        index = call.first_index + call.steps
        if batch.seqs:
            call.launch_index[id(batch)] = index
        now = now_ns()
        requests = call.requests
        for allocation in batch.allocations:   # the sequences admitted
            if allocation.seq_id in requests:
                requests[allocation.seq_id].events.append((S.EVENT_SCHEDULED, now, {
                    S.EVENT_STEP: index, S.NUM_CACHED_TOKENS: allocation.cached_tokens}))
        if batch.num_prefill_tokens:
            self._prefill_chunks(requests, batch, index, now)
        for seq, needing in zip(batch.preempted, batch.preempted_for):
            if seq.seq_id in requests:
                requests[seq.seq_id].events.append((S.EVENT_PREEMPTED, now, {S.EVENT_STEP: index,
                                                                             S.PREEMPTED_FOR: needing}))

    @staticmethod
    def _prefill_chunks(requests: dict, batch, index: int, now: int) -> None:
        """A `prefill_chunk` event for each prompt this step computes in part (before the
        scheduler counts the step's tokens as computed)."""
        for row in range(batch.num_decode_tokens, len(batch.seqs)):   # prompt chunks follow the decodes
            seq, num_tokens = batch.seqs[row], batch.query_lens[row]
            start = seq.num_computed_tokens
            if (start > seq.num_cached_tokens or start + num_tokens < seq.num_tokens) and seq.seq_id in requests:
                requests[seq.seq_id].events.append((S.EVENT_PREFILL_CHUNK, now, {
                    S.EVENT_STEP: index, S.CHUNK_START: start, S.CHUNK_TOKENS: num_tokens}))

    def _on_postprocess(self, call: _Call, batch, finished) -> None:
        # Events name the step that computed the token.
        index = call.launch_index.pop(id(batch), call.first_index + call.steps)
        now = now_ns()
        if batch.num_prefill_tokens:
            for seq, token_index in zip(batch.sampled_seqs, batch.token_indexes):
                if token_index == seq.num_prompt_tokens and seq.seq_id in call.requests:
                    call.requests[seq.seq_id].events.append(
                        (S.EVENT_FIRST_TOKEN, seq.first_token_ns or now, {S.EVENT_STEP: index}))
        if finished and call.awaiting_gpu:   # steps whose tokens are in are built before requests link to them
            self._send_timed(call, wait=False)
        for f in finished:
            if f.seq.seq_id in call.requests:
                call.requests[f.seq.seq_id].events.append(
                    (S.EVENT_FINISHED, now, {S.EVENT_STEP: index, S.EVENT_REASON: f.reason}))
                self._close_request(call.requests, call.origins, f.seq.seq_id)

    def _end_step(self, step: _StepTrace, exc: BaseException | None) -> None:
        call = step.call
        batch = step.batch
        failed = exc is not None
        if not failed and (batch is None or not (batch.seqs or step.postprocessed_any)):
            self._release_gpu(step)   # all preempted, nothing done: not a step
            return
        index = call.first_index + call.steps
        call.steps += 1
        record = step.record
        call.last_end_ns = record.end_ns
        duration = record.end_ns - record.start_ns
        phase = batch.phase if batch is not None else "unknown"
        if phase in ("prefill", "mixed"):
            call.prefill_steps += 1
            call.prefill_ns += duration
        elif phase == "drain":
            call.drain_steps += 1
        else:
            call.decode_ns += duration
        step.summary = summary = StepSummary(
            index, phase, record.start_ns, record.end_ns, len(batch.seqs) if batch is not None else 0,
            batch.num_batched_tokens if batch is not None else 0, bool(batch is not None and batch.preempted),
            failed, self._uses_graphs and phase == "decode" and not step.used_graph)
        call.stats.add(summary)
        if self.level is TraceLevel.REQUEST:
            return
        # A profiled step is perturbed: it says so, and stays out of the slow-step history.
        reason = "profile" if step.profiled and not failed else call.policy.reason(summary)
        if reason is None or not self._detail(call, step, reason):
            self._hold(call, step)
        self._send_timed(call, wait=False)
        self.sink.pump()

    # A step that is not detailed waits in the ring (it may turn out to be among the last);
    # leaving it, it joins the open stretch of consecutive steps, one `engine.steps` span.
    # Budget: a detailed step is taken only if, after it, a span remains for each stretch
    # boundary still to come (one per detailed step the stretch has not reached yet) and one
    # for the last stretch, so a call never goes past OTVLLM_TRACE_MAX_SPANS.

    def _hold(self, call: _Call, step: _StepTrace) -> None:
        call.ring.append(step)
        if len(call.ring) > call.policy.last:
            self._aggregate(call, call.ring.popleft())

    def _aggregate(self, call: _Call, step: _StepTrace) -> None:
        self._release_gpu(step)
        index = step.summary.index
        passed = False
        while call.ahead and call.ahead[0] < index:
            call.ahead.popleft()
            passed = True
        if passed:   # a detailed step lies between the stretch and this one
            self._close_stretch(call)
        call.stretch.add(step.summary)
        if call.stretch.too_long() and call.budget > 1 + len(call.ahead):
            self._close_stretch(call)

    def _close_stretch(self, call: _Call) -> None:
        stretch = call.stretch
        if not len(stretch):
            return
        first, last = stretch.steps[0], stretch.steps[-1]
        attrs = stretch.attrs()
        self._send_spans(call, [SpanRecord(S.steps_name(attrs[S.PHASE]), call.root, first.start_ns, last.end_ns,
                                           attrs)])
        call.budget -= 1
        call.aggregates += 1
        call.stretch = StepStretch()

    def _detail(self, call: _Call, step: _StepTrace, reason: str) -> bool:
        """Send the step's spans (once its GPU time is known); False if the budget is spent."""
        extra = self._block_records(step) if step.batch is not None else []
        cost = 1 + len(step.children) + len(extra)
        if call.budget - cost < 2 + len(call.ahead):
            call.over_budget += 1
            return False
        call.budget -= cost
        summary = step.summary
        call.ahead.append(summary.index)
        call.detailed_indexes.add(summary.index)
        step.record.name = S.step_name(summary.phase)
        step.record.attrs.update({
            S.STEP_INDEX: summary.index, S.PHASE: summary.phase, S.NUM_SEQS: summary.num_seqs,
            S.NUM_BATCHED_TOKENS: summary.num_tokens, S.STEP_DETAIL_REASON: reason})
        if step.batch is not None:
            step.record.attrs.update({S.NUM_PREFILL_TOKENS: step.batch.num_prefill_tokens,
                                      S.NUM_DECODE_TOKENS: step.batch.num_decode_tokens})
        step.children.extend(extra)
        if step.batch is not None and step.batch.seqs:
            seq_ids = step.record.attrs[S.BATCH_SEQ_IDS] = [seq.seq_id for seq in step.batch.seqs]
            self._link(call, step.record, seq_ids)
        if step.forward is not None and step.forward.end_ns:
            try:
                step.forward.attrs.update(memory_snapshot(self.device))
            except RuntimeError:   # a device that failed may not answer
                pass
        if self.gpu_telemetry is not None:
            step.record.attrs.update(self.gpu_telemetry.read())
        if step.gpu is not None and not summary.failed:
            call.awaiting_gpu.append(step)
        else:
            self._release_gpu(step)
            self._send_step(call, step)
        return True

    def _link(self, call: _Call, record: SpanRecord, seq_ids: list[int]) -> None:
        """A step and the request spans of its batch, each linked to the other (bounded): in
        Jaeger a step's batch and a request's steps are one click away. A request whose span
        has already ended keeps the link from the step only."""
        rids, requests, rid = call.request_rids, call.requests, record.rid
        record.links = [rids[i] for i in seq_ids[:MAX_LINKS] if i in rids]
        for i in seq_ids:
            request = requests.get(i)
            if request is not None:
                links = request.links
                if links is None:
                    request.links = [rid]
                elif len(links) < MAX_LINKS:
                    links.append(rid)

    def _send_timed(self, call: _Call, wait: bool) -> None:
        """Send the detailed steps whose forward has finished on the device, with its GPU time."""
        waiting = call.awaiting_gpu
        while waiting and (wait or GpuTimer.done(waiting[0].gpu)):
            step = waiting.popleft()
            step.forward.attrs[S.GPU_TIME_MS] = self.gpu_timer.elapsed_ms(step.gpu)
            step.gpu = None
            self._send_step(call, step)

    def _send_step(self, call: _Call, step: _StepTrace) -> None:
        self._send_spans(call, [step.record, *step.children])

    def _send_spans(self, call: _Call, records: list[SpanRecord]) -> None:
        if not self.sink.send(SPANS, records):
            call.dropped_spans += len(records)

    def _release_gpu(self, step: _StepTrace) -> None:
        if step.gpu is not None:
            self.gpu_timer.release(step.gpu)
            step.gpu = None

    def _finish_steps(self, call: _Call, failed: bool) -> None:
        """The call ended: its newest undecided steps are its last ones."""
        if self.level < TraceLevel.STEP:
            return
        last = list(call.ring)
        call.ring.clear()
        for step in last:
            if not self._detail(call, step, "last"):
                self._aggregate(call, step)
        self._close_stretch(call)
        if failed:   # the device may not answer: no GPU times
            while call.awaiting_gpu:
                step = call.awaiting_gpu.popleft()
                step.gpu = None
                self._send_step(call, step)
        else:
            self._send_timed(call, wait=True)

    def _block_records(self, step: _StepTrace) -> list[SpanRecord]:
        batch = step.batch
        schedule = step.children[0] if step.children and step.children[0].name == S.SCHEDULE else None
        if schedule is None or not (batch.allocations or batch.new_decode_blocks or batch.preempted):
            return []
        if batch.allocations:
            start, end = batch.allocations[0].start_ns, batch.allocations[-1].end_ns
        else:
            start, end = schedule.start_ns, schedule.end_ns
        parent = SpanRecord(S.BLOCK_ALLOCATE, schedule, start, end, A.block_allocate_attrs(batch))
        records = [parent]
        if self.level is TraceLevel.DEBUG:
            records += [SpanRecord(S.BLOCK_ALLOCATE, parent, a.start_ns, a.end_ns, A.sequence_allocate_attrs(a))
                        for a in batch.allocations]
            if batch.new_decode_block_ids:
                parent.attrs[S.BLOCK_IDS_NEW] = batch.new_decode_block_ids
            if batch.preempt_freed_block_ids:
                schedule.attrs[S.BLOCK_IDS_FREED] = batch.preempt_freed_block_ids
        return records

    # ---- debug: one span per part of the forward (embedding, each layer's norms, attention and
    # MLP, the final norm, the output head), the device synchronised around each ----------------

    def _forward_in_progress(self) -> SpanRecord | None:
        step = self._current_step
        forward = step.forward if step is not None else None
        return forward if forward is not None and not forward.end_ns else None

    def _part_start(self, sync, started: list):
        def hook(module, args):
            if self._forward_in_progress() is not None:
                sync()
                started[:] = now_ns(), A.shape(args[0])
        return hook

    def _part_end(self, sync, part: str, index: int | None, started: list):
        name = PART_SPANS[part]

        def hook(module, args, output):   # also called when the part raised (output None)
            forward = self._forward_in_progress()
            if forward is None:
                return
            failure = sys.exc_info()[1] if output is None else None
            if failure is None:
                try:
                    sync()   # where a failed kernel surfaces: this part launched it
                except Exception as e:
                    failure = e
            record = SpanRecord(name, forward, started[0], now_ns(),
                                A.part_attrs(part, index, started[1], module, args, output))
            if failure is not None:
                record.fail(failure)
            # After the forward's record in the step's list: the builder meets the parent first.
            self._current_step.children.append(record)
            if failure is not None and output is not None:
                raise failure
        return hook


PART_SPANS = {"embedding": S.EMBEDDING, "input_norm": S.NORM, "attention": S.ATTENTION,
              "post_attention_norm": S.NORM, "mlp": S.MLP, "final_norm": S.NORM, "lm_head": S.LM_HEAD}


def make_tracer(level: TraceLevel, device: torch.device, model: str):
    if level is TraceLevel.OFF:
        return NullTracer()
    return EngineTracer(level, device, os.path.basename(os.path.normpath(model)))
