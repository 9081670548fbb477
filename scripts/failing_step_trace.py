"""Write the trace of a run whose third forward (a decode step) runs out of CUDA memory, as the
debugging guide shows it (docs/debugging.md): the out-of-memory error is raised on purpose, on
CPU, with the synthetic model. usage: python scripts/failing_step_trace.py TRACE.json [LEVEL]"""

import sys

import torch

from otvllm import LLM, SamplingParams
from otvllm.synthetic import synthetic_model_dir
from otvllm.tracing import configure


def fail_on_call(obj, name, n, exc):
    """Make the `n`-th call of `obj.name` raise `exc`."""
    real, calls = getattr(obj, name), []

    def broken(*args):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*args)
    setattr(obj, name, broken)


def main(path, level="step"):
    session = configure(trace_file=path)
    try:
        llm = LLM(synthetic_model_dir(), device="cpu", trace_level=level, max_model_len=128)
        fail_on_call(llm.engine.runner, "forward", 3,
                     torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        try:
            llm.generate(["Hello, otvllm", "Bonjour"], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
        except torch.cuda.OutOfMemoryError as e:
            print(f"failed as intended: {e}", file=sys.stderr)
    finally:
        session.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
