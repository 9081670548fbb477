"""The engine loop: each step schedules, prepares inputs, runs the model, samples and
postprocesses, each phase a method of its own so that tracing can wrap it.

A step launches its forward and sampling on the device and then postprocesses the step
launched before it, whose tokens are on the host by then: the host's bookkeeping runs while
the device computes, and the next step's input tokens are read from the device."""

import time
from dataclasses import dataclass, replace

import torch

from otvllm.config import EngineConfig
from otvllm.core.block_manager import BlockManager
from otvllm.core.model_runner import ModelInputs, ModelRunner
from otvllm.core.parallel import Workers
from otvllm.core.request_limits import RequestLimits
from otvllm.core.resolved_config import resolve_config, resolve_device
from otvllm.core.scheduler import Finished, ScheduledBatch, Scheduler
from otvllm.core.sequence import Sequence
from otvllm.layers.sampler import SampleResult
from otvllm.models.spec import model_spec, read_config
from otvllm.sampling_params import SamplingParams
from otvllm.tokenizer import load_tokenizer
from otvllm.tracing import schema as S
from otvllm.tracing.level import TraceLevel
from otvllm.tracing.recording import attributes as A
from otvllm.tracing.recording.tracer import make_tracer


@dataclass
class InFlight:
    """A launched step whose sampled tokens have not been postprocessed yet."""

    batch: ScheduledBatch
    result: SampleResult | None   # None: only prompt chunks that sample nothing (nor want their logprobs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config   # as the user gave it, never changed: what start-up decides is self.resolved
        level, device = config.requested_trace_level(), resolve_device(config)
        self.step_index = 0
        self.in_flight: InFlight | None = None
        self.workers: Workers | None = None   # tensor parallelism's ranks 1..N-1
        self.tracer = make_tracer(level, torch.device(device), config.model)
        try:
            self._start(config, level, device)
        except BaseException:
            self.close()   # no worker outlives a start-up that failed
            raise
        self._observe()

    def _start(self, config: EngineConfig, level: TraceLevel, device: str) -> None:
        with self.tracer.init(config) as init:
            arch, hf_config = init.phase(S.CONFIG_LOAD, read_config, config.model, attrs=A.config_load_attrs)
            self.spec = model_spec(arch, hf_config)
            self.resolved = resolve_config(config, self.spec, level, device)
            init.decided(self.resolved)
            if self.resolved.cpu_threads is not None:
                torch.set_num_threads(self.resolved.cpu_threads)
            self.tokenizer = init.phase(S.TOKENIZER_LOAD, load_tokenizer, config.model, attrs=A.tokenizer_attrs)
            self.eos_token_ids = self._eos_token_ids()
            self.runner = ModelRunner(self.resolved, self.spec, eos_token_ids=self.eos_token_ids)
            if self.resolved.tensor_parallel_size > 1:
                self.workers = init.phase(S.TP_START, Workers, self.resolved, self.spec, attrs=A.tp_start_attrs)
            init.phase(S.MODEL_LOAD, self.on_all_ranks, "load_model", attrs=lambda *_: A.model_attrs(self.runner))
            init.ranks(self.rank_records())
            init.phase(S.KV_CACHE_ALLOCATE, self.allocate_kv_cache, attrs=lambda _: A.kv_cache_attrs(self.runner))
            init.ranks(self.rank_records())
            init.decided(self.resolved)   # now with the number of KV blocks
            if self.resolved.cuda_graphs:
                init.phase(S.CUDA_GRAPH_CAPTURE, self.on_all_ranks, "capture_cuda_graphs",
                           attrs=lambda *_: A.cuda_graph_attrs(self.runner))
                init.ranks(self.rank_records())

    def _observe(self) -> None:
        self.tracer.observe(self.scheduler, self.block_manager, self.runner.model.traced_parts(),
                            self.tokenizer, self.resolved.cuda_graphs)

    def set_trace_level(self, level: str) -> None:
        """Change the detail of later generate calls (debug needs an engine built at debug)."""
        new = TraceLevel.parse(level)
        current = self.resolved.trace_level
        if (new is TraceLevel.DEBUG) != (TraceLevel.parse(current) is TraceLevel.DEBUG):
            raise ValueError(f"cannot switch trace level from {current!r} to {level!r}: "
                             f"choose one of off, request, step (debug only for an engine built at debug)")
        self.resolved = replace(self.resolved, trace_level=str(new))
        self.tracer = make_tracer(new, self.resolved.torch_device, self.config.model)
        self._observe()

    def on_all_ranks(self, method: str, *args) -> list:
        """`self.runner.<method>(*args)`, with tensor parallelism on every rank: each rank's result."""
        if self.workers is None:
            return [getattr(self.runner, method)(*args)]
        return self.workers.call(self.runner, method, *args)

    def rank_records(self) -> list:
        return self.workers.take_records() if self.workers is not None else []

    def close(self) -> None:
        """Stop the tensor-parallel workers (an engine without them has nothing to stop)."""
        if self.workers is not None:
            self.workers.close()

    def allocate_kv_cache(self) -> None:
        cfg = self.resolved
        # Every rank holds the same blocks (of its own heads): as many as the tightest rank fits.
        num_blocks = self.runner.num_kvcache_blocks = min(self.on_all_ranks("plan_num_kvcache_blocks"))
        needed = -(-cfg.max_model_len // cfg.kvcache_block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache has room for {num_blocks} blocks of {cfg.kvcache_block_size} tokens, but one "
                f"sequence of max_model_len={cfg.max_model_len} needs {needed}: raise num_kvcache_blocks or "
                f"gpu_memory_utilization, or lower max_model_len")
        self.on_all_ranks("allocate_kv_cache", num_blocks)
        self.resolved = replace(cfg, num_kvcache_blocks=num_blocks)
        self.block_manager = BlockManager(num_blocks, cfg.kvcache_block_size)
        self.scheduler = Scheduler(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len,
                                   self.block_manager, self.eos_token_ids)

    def _eos_token_ids(self) -> set[int]:
        ids = set(self.spec.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        try:
            from transformers import GenerationConfig
            eos = GenerationConfig.from_pretrained(self.config.model).eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            pass
        return ids

    # ---- requests -------------------------------------------------------------------------

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.spec.vocab_size, self.resolved.max_model_len, self.resolved.max_logprobs)

    def make_sequence(self, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        """A request checked against the engine's limits; raises ValueError naming the problem."""
        self.limits.check(prompt_token_ids, params)
        return Sequence(prompt_token_ids, params, self.resolved.kvcache_block_size)

    def add(self, seq: Sequence) -> None:
        seq.arrival_ns = seq.arrival_ns or time.time_ns()   # a server stamps it when the request arrives
        self.scheduler.add(seq)

    def is_finished(self) -> bool:
        return self.in_flight is None and self.scheduler.is_finished()

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop the unfinished sequences of a failed call, and whatever step was in flight."""
        self.in_flight = None
        self.scheduler.abort(seqs)

    def abort_request(self, seq: Sequence) -> None:
        """Drop one unfinished request and free its blocks (its client went away, or a stop
        string ended it); its row of the step in flight is ignored, the other rows are not."""
        self.scheduler.abort([seq])

    # ---- one step: schedule, prepare, forward, sample, postprocess ------------------------

    def step(self) -> list[Finished]:
        with self.tracer.step() as trace:
            batch = trace.phase(S.SCHEDULE, self.schedule, attrs=A.schedule_attrs)
            trace.begin(batch)
            launched = None
            if batch.seqs:   # empty when everything was preempted: the next step re-admits it
                inputs = trace.phase(S.PREPARE_INPUTS, self.prepare_inputs, batch, attrs=A.prepare_attrs)
                logits, _ = trace.phase(S.FORWARD, self.forward, inputs, attrs=A.forward_attrs)
                if self.workers is not None:
                    trace.ranks(self.workers.take_records())
                result = None
                if batch.sampled_seqs or inputs.prompt_owners:
                    result = trace.phase(S.SAMPLE, self.sample, logits, inputs, attrs=A.sample_attrs)
                launched = InFlight(batch, result)
                self._first_tokens_arrived(launched)
                self.scheduler.reserve_tokens(batch)
            previous, self.in_flight = self.in_flight, launched
            finished = []
            if previous is not None:
                finished = trace.phase(S.POSTPROCESS, self.postprocess, previous, attrs=A.postprocess_attrs)
                trace.postprocessed(previous.batch, finished)
            if launched is not None and self.scheduler.nothing_to_launch():
                # The last step of a run: collect its tokens now rather than in an idle step.
                self.in_flight = None
                done = trace.phase(S.POSTPROCESS, self.postprocess, launched, attrs=A.postprocess_attrs)
                trace.postprocessed(batch, done)
                finished += done
            return finished

    def schedule(self) -> ScheduledBatch:
        batch = self.scheduler.schedule()
        if batch.allocations:   # sequences were admitted
            now = time.time_ns()
            for seq in batch.seqs:
                if not seq.first_scheduled_ns:
                    seq.first_scheduled_ns = now
        return batch

    def prepare_inputs(self, batch: ScheduledBatch) -> ModelInputs:
        in_flight = self.in_flight
        previous_tokens = in_flight.result.token_ids if in_flight is not None and in_flight.result else None
        return self.runner.prepare(batch, previous_tokens)

    def forward(self, inputs: ModelInputs):
        """(logits, whether a CUDA graph was replayed); with tensor parallelism, on every rank"""
        if self.workers is not None:
            return self.workers.forward(self.runner, inputs)
        return self.runner.forward(inputs)

    def sample(self, logits, inputs: ModelInputs) -> SampleResult:
        return self.runner.sample(logits, inputs)

    def postprocess(self, step: InFlight) -> list[Finished]:
        batch, result = step.batch, step.result
        if result is None:
            token_ids = []
        else:
            token_ids = result.host_token_ids()   # waits for that step's device work, not for later steps
            if result.sampled_logprobs is not None:
                self._record_logprobs(batch.sampled_seqs, token_ids, result)
            if result.prompt_owners:
                self._record_prompt_logprobs(result)
        self._first_tokens_arrived(step)
        now = time.time_ns()
        finished = self.scheduler.postprocess(batch, token_ids)
        for f in finished:
            f.seq.finished_ns = now
        self.step_index += 1
        return finished

    @staticmethod
    def _first_tokens_arrived(step: InFlight) -> None:
        """Stamp a prefill's first tokens when they reach the host: right after sampling on a
        device that runs synchronously (CPU), else when postprocess has waited for them."""
        batch = step.batch
        if not batch.num_prefill_tokens or step.result is None or not step.result.on_host():
            return   # a first token comes from a prompt's last chunk
        now = time.time_ns()
        for seq in batch.sampled_seqs[batch.num_decode_tokens:]:
            if not seq.first_token_ns:
                seq.first_token_ns = now

    @staticmethod
    def _record_logprobs(seqs: list[Sequence], token_ids: list[int], result: SampleResult) -> None:
        sampled, top_values, top_ids = result.host_logprobs()
        for row, seq in enumerate(seqs):
            n = seq.params.logprobs
            if n is None or seq.is_finished:
                continue
            seq.logprobs.append(_logprob_entry(top_ids, top_values, row, n, token_ids[row], sampled[row]))

    @staticmethod
    def _record_prompt_logprobs(result: SampleResult) -> None:
        chosen, ranks, top_values, top_ids = result.host_prompt_logprobs()
        row = 0
        for seq, first, count in result.prompt_owners:
            n = seq.params.prompt_logprobs
            for position in range(first, first + count):
                seq.prompt_logprobs[position] = _logprob_entry(top_ids, top_values, row, n, seq.token_ids[position],
                                                               chosen[row])
                seq.prompt_ranks[position] = ranks[row]
                row += 1


def _logprob_entry(top_ids: list | None, top_values: list | None, row: int, n: int, token: int,
                   logprob: float) -> dict[int, float]:
    """One token's entry: the n likeliest of row `row` (top ids and values as lists), then the token."""
    entry = dict(zip(top_ids[row][:n], top_values[row][:n])) if n else {}
    entry[token] = logprob
    return entry
