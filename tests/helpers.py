"""What the test modules share: the tiny model variants, random prompts, the one factory of
test engines, a recorder of CUDA graph use and one of spans. Test modules import this, never
each other."""

import random
from contextlib import contextmanager

from otvllm import LLM, SamplingParams
from otvllm.tracing import configure
from otvllm.tracing import schema as S
from tests.otlp_receiver import OtlpReceiver

# Each architecture with the variations the loader must handle: GQA, a head_dim that is
# not hidden_size / heads, untied output embeddings, q/k/v biases (Qwen2).
MODEL_VARIANTS = {
    "qwen3": dict(architecture="Qwen3ForCausalLM"),
    "qwen3-untied": dict(architecture="Qwen3ForCausalLM", tie_word_embeddings=False, head_dim=64),
    "qwen2": dict(architecture="Qwen2ForCausalLM", num_key_value_heads=1),
    "llama": dict(architecture="LlamaForCausalLM", tie_word_embeddings=False, num_key_value_heads=4,
                  max_shard_size="100KB"),   # several safetensors files
    "llama3-rope": dict(architecture="LlamaForCausalLM", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(architecture="MistralForCausalLM", sliding_window=None, num_attention_heads=8, head_dim=16),
}

# Small limits, so that the KV cache and the warm-up stay small; on CUDA 30% of the GPU, so
# that a test can hold two engines, and no tracing unless a test asks for it.
_SMALL = {
    "cpu": dict(kvcache_block_size=16, max_model_len=256, max_num_batched_tokens=512),
    "cuda": dict(kvcache_block_size=16, max_model_len=512, max_num_batched_tokens=1024, gpu_memory_utilization=0.3,
                 trace_level="off"),
}


def make_llm(model_dir: str, **settings) -> LLM:
    """An engine over a test model with small limits: on the CPU unless `device` says otherwise;
    `settings` override the limits."""
    device = settings.setdefault("device", "cpu")
    return LLM(model_dir, **{**_SMALL[device], **settings})


@contextmanager
def two_ranks(model_dir, **settings):
    """An engine over two tensor-parallel ranks (gloo on the CPU), closed afterwards."""
    llm = make_llm(model_dir, tensor_parallel_size=2, **settings)
    try:
        yield llm
    finally:
        llm.close()


def random_prompts(lengths, vocab=256, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def record_graph_use(llm) -> list[bool]:
    """Whether each later forward of `llm` replayed a CUDA graph."""
    replayed, forward = [], llm.engine.runner.forward

    def recording(inputs):
        logits, used_graph = forward(inputs)
        replayed.append(used_graph)
        return logits, used_graph

    llm.engine.runner.forward = recording
    return replayed


@contextmanager
def recorded_spans():
    """The spans otvllm records inside the block, each built as it is sent, through an SDK
    provider of the test's own: yields the in-memory exporter that receives them."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otvllm.tracing.recording.builder import SpanBuilder
    from otvllm.tracing.recording.sinks import set_sink

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))

    class Sink:
        active = True
        builder = SpanBuilder(provider.get_tracer("otvllm"))

        def send(self, kind, payload):
            self.builder.handle(kind, payload)
            return True

        def pump(self):
            pass

        def drain(self):
            pass

    set_sink(Sink())
    try:
        yield memory
    finally:
        set_sink(None)


# ---- a traced run through a real OTLP receiver ----------------------------------------------------

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[7] * 20, [9] * 35, [11] * 3]


def traced_run(model_dir, level="step", prompts=PROMPTS, params=PARAMS, **kwargs):
    """Generate with tracing exported to a fresh receiver; returns (spans, outputs, llm)."""
    with OtlpReceiver() as receiver:
        session = configure(endpoint=receiver.endpoint, service_name="otvllm-test")
        try:
            llm = make_llm(model_dir, trace_level=level, **kwargs)
            outputs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            report = session.shutdown()
        network = report.result["network"]
        assert network["failed"] == 0 and network["finished"]
        return receiver.spans(), outputs, llm


def by_name(spans, name):
    """Spans named `name`; for engine.step and engine.steps, whatever phase their names carry."""
    match = {S.STEP: S.is_step, S.STEPS: S.is_steps}.get(name, name.__eq__)
    return [s for s in spans if match(s["name"])]


def traced(tmp_path, body):
    """Run `body()` with tracing to a real OTLP receiver and to a trace file: (the receiver's
    spans, `otvllm trace summary` of the file)."""
    from otvllm.tracing.tools.summary import summarize_file

    path = tmp_path / "trace.json"
    with OtlpReceiver() as receiver:
        session = configure(endpoint=receiver.endpoint, trace_file=str(path))
        try:
            body()
        finally:
            session.shutdown()
        return receiver.spans(), summarize_file(str(path))


def lines(summary: str) -> list[str]:
    return [line.strip() for line in summary.splitlines()]
