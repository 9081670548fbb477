"""Records the engine's spans on the engine thread: timestamps and attributes in plain
objects, handed to a sink (emit.py) once `LLM(...)` or `generate` is done.

The engine wraps each phase in one call: `tracer.phase(name, fn, *args)`. At level `off`
the engine gets a `NullTracer`, whose `phase` only calls `fn`.

A long generation stays browsable: a step gets its own spans (a "detailed" step) when it is
among the first steps of the call, a prefill, a step that preempted, or every
`OTVLLM_TRACE_STEP_STRIDE`-th decode step, within `OTVLLM_TRACE_MAX_SPANS` spans per trace.
What was left out is counted on the `llm.generate` span.
"""

import os
from contextlib import contextmanager

import torch
from opentelemetry import context as otel_context

from otvllm.tracing import attributes as A
from otvllm.tracing import schema as S
from otvllm.tracing.cuda import GpuTimer, memory_snapshot
from otvllm.tracing.records import SpanRecord, now_ns
from otvllm.tracing.sinks import current_sink

FIRST_DETAILED_STEPS = 32
OOM_ADVICE = ("CUDA ran out of memory: lower gpu_memory_utilization (leaves more for activations), "
              "max_num_seqs or max_num_batched_tokens (smaller batches), or max_model_len")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


class NullTracer:
    """Trace level `off`: no records, no timestamps."""

    level = "off"

    def phase(self, name, fn, *args):
        return fn(*args)

    @contextmanager
    def step(self):
        yield

    @contextmanager
    def init(self, config):
        yield

    @contextmanager
    def generate(self, seqs, prompts):
        yield


class _GenerateState:
    def __init__(self, root: SpanRecord, seqs, prompts, max_spans: int):
        self.root = root
        self.records = [root]
        self.seqs = seqs
        self.prompts = prompts
        self.budget = max_spans - 1 - len(seqs)   # request spans are always kept
        self.events: dict[int, list] = {}
        self.launch_index: dict[int, int] = {}   # id of a launched batch -> its step index
        self.steps = self.prefill_steps = self.drain_steps = 0
        self.prefill_ns = self.decode_ns = 0
        self.detailed = self.dropped = 0


class _StepState:
    __slots__ = ("batch", "children", "detailed", "forward_record", "postprocessed", "record")

    def __init__(self, record: SpanRecord):
        self.record = record
        self.batch = None
        self.detailed = False
        self.postprocessed = False
        self.children: list[SpanRecord] = []
        self.forward_record: SpanRecord | None = None


class EngineTracer:
    def __init__(self, level: str, engine):
        self.level = level
        self.engine = engine
        self.device = engine.config.torch_device
        self.model_name = os.path.basename(os.path.normpath(engine.config.model))
        self.max_spans = _env_int("OTVLLM_TRACE_MAX_SPANS", 2000)
        self.stride = _env_int("OTVLLM_TRACE_STEP_STRIDE", 16)
        self.gpu_timer = GpuTimer() if self.device.type == "cuda" else None
        self._init_root: SpanRecord | None = None
        self._init_records: list[SpanRecord] = []
        self._gen: _GenerateState | None = None
        self._step: _StepState | None = None
        self._layer_hooks = []

    # ---- engine.init and its children ---------------------------------------------------------

    @contextmanager
    def init(self, config):
        parent = otel_context.get_current()
        root = SpanRecord(S.ENGINE_INIT, None, now_ns(), attrs=A.config_attrs(config))
        self._init_root, self._init_records = root, [root]
        try:
            yield
            root.attrs.update(A.config_attrs(config))   # sizes decided during init
            if self.level == "debug":
                self._install_layer_hooks()
        except BaseException as e:
            root.fail(e)
            raise
        finally:
            root.end_ns = now_ns()
            self._init_root = None
            current_sink().emit(self._init_records, parent)

    def _init_phase(self, name, fn, args):
        runner = self.engine.runner
        record = SpanRecord(name, self._init_root, now_ns())
        self._init_records.append(record)
        try:
            result = fn(*args)
        except torch.cuda.OutOfMemoryError as e:
            record.attrs.update(memory_snapshot(self.device))
            record.attrs[S.ERROR_ADVICE] = OOM_ADVICE
            record.fail(e)
            raise torch.cuda.OutOfMemoryError(f"{OOM_ADVICE}. During {name}: {e}") from e
        except BaseException as e:
            record.fail(e)
            raise
        finally:
            record.end_ns = now_ns()
        if name == S.MODEL_LOAD:
            record.attrs.update(A.model_attrs(runner))
        elif name == S.KV_CACHE_ALLOCATE:
            record.attrs.update(A.kv_cache_attrs(runner))
        elif name == S.CUDA_GRAPH_CAPTURE:
            record.attrs[S.CUDA_GRAPH_BATCH_SIZES] = list(runner.graphs.sizes)
        record.attrs.update(memory_snapshot(self.device))
        return result

    # ---- llm.generate and request spans ---------------------------------------------------------

    @contextmanager
    def generate(self, seqs, prompts):
        parent = otel_context.get_current()
        engine = self.engine
        root = SpanRecord(S.GENERATE, None, now_ns(), attrs={
            S.GEN_AI_OPERATION: "text_completion", S.GEN_AI_SYSTEM: "otvllm",
            S.GEN_AI_REQUEST_MODEL: self.model_name, S.GEN_NUM_REQUESTS: len(seqs),
            S.GEN_PROMPT_TOKENS: sum(s.num_prompt_tokens for s in seqs), S.TRACE_LEVEL: self.level,
        })
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            root.attrs[S.GEN_MEM_START] = memory_snapshot(self.device)[S.MEM_ALLOCATED]
        manager, scheduler = engine.block_manager, engine.scheduler
        before = (manager.num_cache_queries, manager.num_cache_hits, scheduler.num_preemptions)
        self._gen = gen = _GenerateState(root, seqs, prompts, self.max_spans)
        try:
            yield
        except BaseException as e:
            root.fail(e)
            raise
        finally:
            root.end_ns = now_ns()
            self._gen = self._step = None
            if self.gpu_timer is not None:   # after a failure the device may not answer
                self.gpu_timer.resolve() if root.error is None else self.gpu_timer.discard()
            queries = manager.num_cache_queries - before[0]
            root.attrs.update(self._generate_totals(gen, manager.num_cache_hits - before[1], queries,
                                                    scheduler.num_preemptions - before[2]))
            gen.records.extend(self._request_records(gen))
            current_sink().emit(gen.records, parent)

    def _generate_totals(self, gen: _GenerateState, hits: int, queries: int, preemptions: int) -> dict:
        output_tokens = sum(s.num_completion_tokens for s in gen.seqs)
        seconds = max(gen.root.end_ns - gen.root.start_ns, 1) / 1e9
        attrs = {
            S.GEN_OUTPUT_TOKENS: output_tokens, S.GEN_STEPS: gen.steps, S.GEN_PREFILL_STEPS: gen.prefill_steps,
            S.GEN_DECODE_STEPS: gen.steps - gen.prefill_steps - gen.drain_steps,
            S.GEN_PREFILL_TIME_MS: gen.prefill_ns / 1e6, S.GEN_DECODE_TIME_MS: gen.decode_ns / 1e6,
            S.GEN_THROUGHPUT: output_tokens / seconds, S.GEN_PREEMPTIONS: preemptions,
            S.GEN_PREFIX_HIT_RATE: hits / queries if queries else 0.0,
        }
        if self.level in ("step", "debug"):
            attrs.update({
                S.TRACE_STEPS_DETAILED: gen.detailed, S.TRACE_STEPS_SAMPLED_AWAY: gen.steps - gen.detailed,
                S.TRACE_STEPS_OVER_BUDGET: gen.dropped,
                S.TRACE_POLICY: ("every step" if self.level == "debug" else
                                 f"first {FIRST_DETAILED_STEPS} steps, prefills, preemptions, "
                                 f"every {self.stride}th decode step") + f"; at most {self.max_spans} spans",
            })
        if self.device.type == "cuda":
            snapshot = memory_snapshot(self.device)
            attrs[S.GEN_MEM_END] = snapshot[S.MEM_ALLOCATED]
            attrs[S.GEN_MEM_PEAK] = snapshot[S.MEM_PEAK]
        return attrs

    def _request_records(self, gen: _GenerateState) -> list[SpanRecord]:
        records = []
        end = gen.root.end_ns
        texts = self.engine.tokenizer is not None and A.trace_content_enabled()
        for seq, prompt in zip(gen.seqs, gen.prompts):
            completion = self.engine.tokenizer.decode(seq.completion_token_ids) if texts else None
            prompt_text = prompt if isinstance(prompt, str) else None
            record = SpanRecord(S.REQUEST, gen.root, seq.arrival_ns or gen.root.start_ns,
                                seq.finished_ns or end, A.request_attrs(seq, self.model_name, prompt_text, completion))
            record.events = gen.events.get(seq.seq_id, [])
            if seq.finish_reason is None and gen.root.error is not None:
                record.error = ("Unfinished", "the generate call failed before this request finished", "")
            records.append(record)
        return records

    # ---- engine.step and its phases --------------------------------------------------------------

    @contextmanager
    def step(self):
        gen = self._gen
        record = SpanRecord(S.STEP, gen.root, now_ns())
        self._step = step = _StepState(record)
        try:
            yield
        except BaseException as e:
            record.fail(e)
            step.detailed = True
            raise
        finally:
            record.end_ns = now_ns()
            self._step = None
            self._close_step(gen, step)

    def _close_step(self, gen: _GenerateState, step: _StepState) -> None:
        batch = step.batch
        if batch is None or not (batch.seqs or step.postprocessed):   # all preempted, nothing done
            return
        index = gen.steps
        gen.steps += 1
        duration = step.record.end_ns - step.record.start_ns
        if batch.is_prefill:
            gen.prefill_steps += 1
            gen.prefill_ns += duration
        elif batch.seqs:
            gen.decode_ns += duration
        else:
            gen.drain_steps += 1
        if not step.detailed:
            return
        if self.gpu_timer is not None:
            self.gpu_timer.resolve(wait=False)   # waiting here would stall the step in flight
        step.record.attrs.update(A.batch_attrs(batch))
        step.record.attrs[S.STEP_INDEX] = index
        gen.records.append(step.record)
        gen.records.extend(step.children)
        gen.budget -= 1 + len(step.children)
        gen.detailed += 1

    def _wants_detail(self, gen: _GenerateState, batch) -> bool:
        if self.level == "request":
            return False
        wanted = (self.level == "debug" or gen.steps < FIRST_DETAILED_STEPS or batch.is_prefill
                  or not batch.seqs or bool(batch.preempted) or gen.steps % self.stride == 0)
        if wanted and gen.budget < self._step_span_cost(batch):
            gen.dropped += 1
            return False
        return wanted

    def _step_span_cost(self, batch) -> int:
        spans = 2 + len(S.STEP_PHASE_SPANS)
        if self.level == "debug":
            spans += len(batch.allocations) + self.engine.spec.num_layers
        return spans

    def phase(self, name, fn, *args):
        if self._init_root is not None:
            return self._init_phase(name, fn, args)
        step = self._step
        record = None
        gpu_start = None
        if step.detailed:
            # Appended now, before any span the phase itself records (attention layers).
            record = SpanRecord(name, step.record, now_ns())
            step.children.append(record)
            if name == S.FORWARD:
                step.forward_record = record
                if self.gpu_timer is not None:
                    gpu_start = self.gpu_timer.start()
        try:
            result = fn(*args)
        except BaseException as e:
            if record is None:
                record = SpanRecord(name, step.record, step.record.start_ns)
                step.children.append(record)
            record.end_ns = now_ns()
            record.fail(e)
            raise
        end = now_ns()
        if name == S.SCHEDULE:
            step.batch = result
            self._on_schedule(step, result, end)
            if step.detailed:
                record = SpanRecord(name, step.record, step.record.start_ns, end,
                                    A.schedule_attrs(result, self.engine.scheduler))
                step.children.append(record)
                self._block_records(step, result, record)
            return result
        if name == S.POSTPROCESS:   # of the step launched before this one
            step.postprocessed = True
            self._on_postprocess(args[0].batch, result, end)
        if record is None:
            return result
        record.end_ns = end
        if name == S.FORWARD:
            record.attrs.update(A.forward_attrs(args[0], result, self.engine.runner.last_forward_used_graph))
            record.attrs.update(memory_snapshot(self.device))
            if gpu_start is not None:
                self.gpu_timer.stop(gpu_start, record.attrs)
        elif name == S.SAMPLE:
            record.attrs.update(A.sample_attrs(args[0], step.batch.seqs))
        elif name == S.POSTPROCESS:
            record.attrs.update(A.postprocess_attrs(args[0].batch, result))
        elif name == S.PREPARE_INPUTS:
            record.attrs.update(A.batch_attrs(step.batch))
        return result

    def _on_schedule(self, step: _StepState, batch, now: int) -> None:
        gen = self._gen
        step.detailed = (bool(batch.seqs) or self.engine.in_flight is not None) and self._wants_detail(gen, batch)
        index = gen.steps
        if batch.seqs:
            gen.launch_index[id(batch)] = index
        events = gen.events
        if batch.is_prefill:
            for seq in batch.seqs:
                events.setdefault(seq.seq_id, []).append(
                    (S.EVENT_SCHEDULED, now, {S.EVENT_STEP: index, S.NUM_CACHED_TOKENS: seq.num_cached_tokens}))
        for seq in batch.preempted:
            events.setdefault(seq.seq_id, []).append((S.EVENT_PREEMPTED, now, {S.EVENT_STEP: index}))

    def _on_postprocess(self, batch, finished, now: int) -> None:
        gen = self._gen
        index = gen.launch_index.pop(id(batch), gen.steps)   # events name the step that computed the token
        events = gen.events
        if batch.is_prefill:
            for seq, token_index in zip(batch.seqs, batch.token_indexes):
                if token_index == seq.num_prompt_tokens:
                    events.setdefault(seq.seq_id, []).append((S.EVENT_FIRST_TOKEN, now, {S.EVENT_STEP: index}))
        for f in finished:
            events.setdefault(f.seq.seq_id, []).append(
                (S.EVENT_FINISHED, now, {S.EVENT_STEP: index, S.EVENT_REASON: f.reason}))

    def _block_records(self, step: _StepState, batch, schedule_record: SpanRecord) -> None:
        manager = self.engine.block_manager
        if batch.allocations:
            first, last = batch.allocations[0], batch.allocations[-1]
            start, end = first.start_ns, last.end_ns
        elif batch.new_decode_blocks or batch.preempted:
            start, end = schedule_record.start_ns, schedule_record.end_ns
        else:
            return
        parent = SpanRecord(S.BLOCK_ALLOCATE, schedule_record, start, end, A.block_allocate_attrs(batch, manager))
        step.children.append(parent)
        if self.level == "debug":
            for allocation in batch.allocations:
                step.children.append(SpanRecord(S.BLOCK_ALLOCATE, parent, allocation.start_ns, allocation.end_ns,
                                                A.sequence_allocate_attrs(allocation)))

    # ---- debug: one span per attention layer -----------------------------------------------------

    def _install_layer_hooks(self) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *a: None)
        for layer in self.engine.runner.model.attention_layers():
            self._layer_hooks.append(layer.register_forward_pre_hook(self._layer_start(sync)))
            self._layer_hooks.append(layer.register_forward_hook(self._layer_end(sync)))

    def _layer_start(self, sync):
        def hook(module, args):
            step = self._step
            if step is not None and step.forward_record is not None:
                sync()
                module._otvllm_start_ns = now_ns()
        return hook

    def _layer_end(self, sync):
        def hook(module, args, output):
            step = self._step
            if step is None or step.forward_record is None:
                return
            sync()
            q, k, v = args[0], args[1], args[2]
            step.children.append(SpanRecord(S.ATTENTION, step.forward_record, module._otvllm_start_ns, now_ns(), {
                S.LAYER_INDEX: module.layer_index, S.PHASE: "prefill" if args[3].is_prefill else "decode",
                S.SHAPE_PREFIX + "q": A.shape(q), S.SHAPE_PREFIX + "k": A.shape(k),
                S.SHAPE_PREFIX + "v": A.shape(v), S.SHAPE_PREFIX + "k_cache": A.shape(module.k_cache),
                S.SHAPE_PREFIX + "v_cache": A.shape(module.v_cache), S.SHAPE_PREFIX + "output": A.shape(output),
                S.ATTENTION_BACKEND: module.backend.name,
            }))
        return hook


def make_tracer(level: str, engine):
    return NullTracer() if level == "off" else EngineTracer(level, engine)
