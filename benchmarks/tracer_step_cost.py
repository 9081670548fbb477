"""The engine thread's cost of tracing one step at `step` level, without the model.

Runs the engine's step protocol (schedule, prepare, forward, sample, postprocess, each
wrapped by the tracer with its attribute function) over a fixed decode batch whose phases
do no work, with the real tracer and a sink that only takes the records, against the same
loop with the `off` tracer. The difference is what tracing adds to every step on the
engine thread (recording, attributes, retention); exporting happens elsewhere (the export
process, or the caller's provider between steps) and is not included.

    python benchmarks/tracer_step_cost.py [--batch 64] [--steps 2000]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from otvllm.core.model_runner import ModelInputs  # noqa: E402
from otvllm.core.scheduler import ScheduledBatch  # noqa: E402
from otvllm.core.sequence import Sequence  # noqa: E402
from otvllm.layers.attention import ForwardContext  # noqa: E402
from otvllm.layers.sampler import SamplingBatch  # noqa: E402
from otvllm.sampling_params import SamplingParams  # noqa: E402
from otvllm.tracing import schema as S  # noqa: E402
from otvllm.tracing.level import TraceLevel  # noqa: E402
from otvllm.tracing.recording import attributes as A  # noqa: E402
from otvllm.tracing.recording.sinks import set_sink  # noqa: E402
from otvllm.tracing.recording.tracer import NullTracer, make_tracer  # noqa: E402


class TakingSink:
    active = True

    def send(self, kind, payload) -> bool:
        return True

    def pump(self) -> None:
        pass

    def drain(self) -> None:
        pass


class Counters:
    num_cache_queries = num_cache_hits = num_prompt_tokens_queried = num_prompt_tokens_cached = num_preemptions = 0
    num_blocks = 1000


class InFlight:
    def __init__(self, batch):
        self.batch = batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()

    set_sink(TakingSink())
    seqs = [Sequence([1, 2, 3], SamplingParams(max_tokens=1 << 30), 16) for _ in range(args.batch)]
    batch = ScheduledBatch([])
    for seq in seqs:
        batch.add_decode(seq)
    ids = torch.zeros(len(seqs), dtype=torch.long)
    ctx = ForwardContext(is_prefill=False, slot_mapping=ids, context_lens=ids,
                         block_tables=torch.zeros(len(seqs), 8, dtype=torch.int32))
    sampling = SamplingBatch.from_params([s.params for s in seqs], [len(s) for s in seqs], 1000, torch.device("cpu"))
    inputs = ModelInputs(ids, ids, ctx, None, sampling)
    logits = torch.zeros(len(seqs), 1000)
    previous = InFlight(batch)

    def steps(tracer, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            with tracer.step() as trace:
                scheduled = trace.phase(S.SCHEDULE, lambda: batch, attrs=A.schedule_attrs)
                trace.begin(scheduled)
                prepared = trace.phase(S.PREPARE_INPUTS, lambda b: inputs, scheduled, attrs=A.prepare_attrs)
                out, _ = trace.phase(S.FORWARD, lambda i: (logits, True), prepared, attrs=A.forward_attrs)
                trace.phase(S.SAMPLE, lambda lg, i: None, out, prepared, attrs=A.sample_attrs)
                finished = trace.phase(S.POSTPROCESS, lambda p: [], previous, attrs=A.postprocess_attrs)
                trace.postprocessed(previous.batch, finished)
        return (time.perf_counter() - start) / n

    tracer = make_tracer(TraceLevel.STEP, torch.device("cpu"), "bench")
    tracer.observe(Counters(), Counters(), [])
    with tracer.generate(seqs, [None] * len(seqs)):
        steps(tracer, 200)   # warm-up
        traced = min(steps(tracer, args.steps) for _ in range(5))
    untraced = min(steps(NullTracer(), args.steps) for _ in range(5))
    print(f"decode batch of {args.batch}, best of 5 x {args.steps} steps: step level {traced * 1e6:.1f} us/step, "
          f"off {untraced * 1e6:.1f} us/step: tracing adds {(traced - untraced) * 1e6:.1f} us per step "
          f"on the engine thread")


if __name__ == "__main__":
    main()
