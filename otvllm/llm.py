"""The public entry point: `LLM(model, **config).generate(prompts, sampling_params)`."""

import threading
from collections.abc import Sequence as SequenceABC

from tqdm.auto import tqdm

from otvllm import environment
from otvllm.config import EngineConfig
from otvllm.core.engine import LLMEngine
from otvllm.core.sequence import Sequence
from otvllm.outputs import RequestOutput
from otvllm.sampling_params import SamplingParams
from otvllm.synthetic import SYNTHETIC_MODEL, resolve_model
from otvllm.tokenizer import tokenize

Prompt = str | list[int]


class RequestError(ValueError):
    """One request of a generate call cannot run; `index` is its place in the call."""

    def __init__(self, index: int, problem: str):
        super().__init__(f"request {index}: {problem}")
        self.index, self.problem = index, problem


class LLM:
    """An inference engine over one model directory (or "synthetic", the built-in tiny random
    Qwen3 with a byte-level tokenizer, whose output is noise: the default).

    Every keyword is an `EngineConfig` field (max_num_seqs, max_num_batched_tokens,
    max_model_len, kvcache_block_size, num_kvcache_blocks, gpu_memory_utilization,
    enforce_eager, tensor_parallel_size, device, dtype, trace_level, ...). `config` is that
    config as given; what start-up decided from it is `engine.resolved`.
    """

    def __init__(self, model: str = SYNTHETIC_MODEL, **kwargs):
        environment.check("OTVLLM_")
        self.config = EngineConfig.from_kwargs(resolve_model(model), **kwargs)
        self.engine = LLMEngine(self.config)
        self._lock = threading.Lock()   # one generate call at a time: the engine has one batch
        self._owner: int | None = None

    def close(self) -> None:
        """Stop the engine's tensor-parallel worker processes, if it has any (they also stop when
        this process exits)."""
        self.engine.close()

    def reset_prefix_cache(self) -> None:
        """Drop the prefix cache of finished requests (e.g. between benchmark runs)."""
        self.engine.block_manager.reset_prefix_cache()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; returns one output per prompt, in input order.

        The whole call is checked before any work starts: one invalid prompt or parameter
        raises RequestError (a ValueError naming the request) and no request is run. Calls
        from several threads run one after another; a call from inside a running call raises
        RuntimeError. The progress bar shows the finished requests' input and output tokens
        per second.
        """
        if self._owner == threading.get_ident():
            raise RuntimeError("LLM.generate was called again from inside a generate call on the same "
                               "thread (from a callback?): one call runs at a time per LLM")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                return self._generate(prompts, sampling_params, use_tqdm)
            finally:
                self._owner = None

    def _generate(self, prompts, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        seqs = [self._make_sequence(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        engine = self.engine
        with engine.tracer.generate(seqs, prompts), _Progress(len(seqs), use_tqdm) as progress:
            try:
                for seq in seqs:
                    engine.add(seq)
                while not engine.is_finished():
                    finished = engine.step()
                    if finished:
                        progress.finished(finished)
            except BaseException:
                engine.abort(seqs)   # leave the engine usable for the next call
                raise
        return [self._output(i, p, seq) for i, (p, seq) in enumerate(zip(prompts, seqs))]

    @staticmethod
    def _params_per_prompt(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts: pass one, or one per prompt")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params[{i}] is a {type(p).__name__}, not a SamplingParams")
        return params

    def _make_sequence(self, index: int, prompt: Prompt, params: SamplingParams) -> Sequence:
        try:
            return self.engine.make_sequence(self.tokenize(prompt), params)
        except ValueError as e:
            raise RequestError(index, str(e)) from None

    def tokenize(self, prompt: Prompt) -> list[int]:
        """A prompt's token ids (a string through the model's tokenizer); ValueError if it has none."""
        return tokenize(self.tokenizer, prompt)

    def _output(self, index: int, prompt: Prompt, seq: Sequence) -> RequestOutput:
        ids = seq.completion_token_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else None
        return RequestOutput(
            request_id=index,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
            token_ids=ids,
            text=text,
            finish_reason=seq.finish_reason,
            logprobs=seq.logprobs if seq.params.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs,
            prompt_token_ranks=seq.prompt_ranks,
            num_cached_tokens=seq.max_cached_tokens,
            num_preemptions=seq.num_preemptions,
            metrics=seq.metrics(),
        )


class _Progress:
    """The progress bar: finished requests, and the input and output tokens per second of
    the finished ones since the call began (the estimate vLLM's bar shows)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc="Generating", disable=not enabled, dynamic_ncols=True)
        self.input_tokens = self.output_tokens = 0

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def finished(self, finished: list) -> None:
        if self.bar.disable:
            return
        self.input_tokens += sum(f.seq.num_prompt_tokens for f in finished)
        self.output_tokens += sum(f.seq.num_completion_tokens for f in finished)
        seconds = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(f"est. speed input: {self.input_tokens / seconds:.2f} toks/s, "
                                 f"output: {self.output_tokens / seconds:.2f} toks/s", refresh=False)
        self.bar.update(len(finished))


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, SequenceABC) or not prompts:
        raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of those")
    if all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    for i, p in enumerate(prompts):
        if not isinstance(p, str) and not (isinstance(p, SequenceABC) and all(isinstance(t, int) for t in p)):
            raise RequestError(i, f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
    return list(prompts)
