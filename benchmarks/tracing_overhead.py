"""Per-step cost of tracing at `request`, `step` and `debug` level against `off`, in one run.

Runs the same generation at each level on one engine (CPU by default, with a 2-layer
random Qwen3; `--device cuda --model DIR` on a GPU), with spans exported by otvllm's
export process to a Jaeger JSON file, and prints the mean step time per level and its
ratio to `off`. Levels are interleaved over `--repeats` rounds so drift hits all alike.

    python benchmarks/tracing_overhead.py [--requests 16] [--max-tokens 128] [--repeats 3]
"""

import argparse
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model directory (default: a 2-layer random Qwen3 whose steps are short, so the "
                             "engine's own per-step cost shows)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from otvllm import LLM, SamplingParams
    from otvllm.synthetic import write_model
    from otvllm.tracing import configure

    trace_file = os.path.join(tempfile.mkdtemp(), "overhead.json")
    session = configure(trace_file=trace_file)
    model = args.model or write_model(os.path.join(tempfile.mkdtemp(), "tiny-qwen3"))
    prompts = [[(i * 7 + j) % 200 for j in range(32 + 8 * i)] for i in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    engines = {"debug": LLM(model, device=args.device, trace_level="debug", kvcache_block_size=16)}
    engines["off"] = LLM(model, device=args.device, trace_level="off", kvcache_block_size=16)
    per_step: dict[str, list[float]] = {level: [] for level in ("off", "request", "step", "debug")}
    for llm in engines.values():
        llm.generate(prompts[:2], params, use_tqdm=False)   # warm-up
    torch.set_num_threads(1)   # steadier timings: the engine's own cost is what is measured
    levels = list(per_step)
    for round_index in range(args.repeats):
        for level in levels[round_index % 4:] + levels[:round_index % 4]:   # rotate the order
            llm = engines["debug" if level == "debug" else "off"]
            if level != "debug":
                llm.engine.set_trace_level(level)
            steps_before = llm.engine.step_index
            llm.reset_prefix_cache()
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            per_step[level].append((time.perf_counter() - start) / (llm.engine.step_index - steps_before))
    session.shutdown()
    base = statistics.median(per_step["off"])
    print(f"{args.requests} requests x {args.max_tokens} tokens on {args.device}, "
          f"median of {args.repeats} interleaved runs per level")
    for level, times in per_step.items():
        t = statistics.median(times)
        print(f"  {level:8s} {t * 1e3:8.3f} ms/step   {t / base:6.3f}x off   (+{(t - base) * 1e6:7.1f} us/step)")


if __name__ == "__main__":
    main()
