"""How cost grows with the work: throughput against the number of requests, and the KV cache
and memory against max_model_len.

(a) KV cache and memory: for each of `--max-model-lens`, an engine started in a process of its
    own (each takes most of the GPU's memory) reports its KV blocks, their bytes, how many
    sequences of the full length they hold, and the device memory after start-up (allocated,
    reserved, and the peak, which includes the warm-up prefill of max_num_batched_tokens tokens
    that sizes the cache; max_num_batched_tokens is the larger of 16,384 and max_model_len).
(b) Throughput: otvllm with tracing off on workloads of nano-vllm's benchmark kind (prompts of
    100-1024 random token ids, outputs of 100-1024 tokens, ignore EOS, temperature 0.6; the
    same draw as benchmarks/throughput.py, seed 0) of each of `--num-requests` requests, on one
    engine (max_model_len 4096 or the model's limit, up to 512 sequences a batch, as throughput.py), after a warm-up
    on the largest workload's prefills; the median of `--repeats` runs each, with the steps and
    preemptions the run took.

Time to first token and time per output token against the context: benchmarks/latency.py
--contexts 1024,4096,16384.

    python benchmarks/scaling.py [--num-requests 64,256,1024] [--max-model-lens 4096,16384,40960]
                                 [--repeats 2] [--json OUT]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import positive_ints  # noqa: E402

MAX_MODEL_LEN = 4096        # the throughput engine's, as in throughput.py
MAX_NUM_SEQS = 512
MIN_BATCHED_TOKENS = 16384  # EngineConfig's default max_num_batched_tokens


def kv_cache_report(model_dir: str, device: str, max_model_len: int) -> dict:
    """In a process of its own: start an engine at this max_model_len and say what it holds."""
    import torch
    from otvllm import LLM
    batched = max(MIN_BATCHED_TOKENS, max_model_len)
    llm = LLM(model_dir, device=device, max_model_len=max_model_len, max_num_seqs=MAX_NUM_SEQS,
              max_num_batched_tokens=batched, trace_level="off")
    engine, runner = llm.engine, llm.engine.runner
    blocks, block_size = engine.resolved.num_kvcache_blocks, engine.resolved.kvcache_block_size
    report = {"max_model_len": max_model_len, "max_num_batched_tokens": batched, "kv_blocks": blocks,
              "block_size": block_size, "kv_tokens": blocks * block_size, "kv_bytes": blocks * runner.block_bytes,
              "full_length_seqs": blocks // -(-max_model_len // block_size),
              "weight_bytes": runner.parameter_bytes}
    if device.startswith("cuda"):
        report.update(cuda_allocated_bytes=torch.cuda.memory_allocated(),
                      cuda_reserved_bytes=torch.cuda.memory_reserved(),
                      cuda_peak_bytes=torch.cuda.max_memory_allocated(),
                      cuda_total_bytes=torch.cuda.get_device_properties(device).total_memory)
    return report


def throughput(model_dir: str, device: str, max_model_len: int, num_requests: list[int], repeats: int,
               lens: dict) -> list[dict]:
    import torch
    from benchmarks.throughput import workload
    from otvllm import LLM, SamplingParams
    llm = LLM(model_dir, device=device, max_model_len=max_model_len, max_num_seqs=MAX_NUM_SEQS, trace_level="off")
    engine = llm.engine
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(prompts, max_tokens) -> tuple[float, int, int]:
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in max_tokens]
        llm.reset_prefix_cache()   # each run computes its prompts, as the first one did
        steps_before = engine.step_index
        sync()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        if sum(len(o.token_ids) for o in outputs) != sum(max_tokens):
            raise RuntimeError("a request stopped before its max_tokens")
        return seconds, engine.step_index - steps_before, sum(o.num_preemptions for o in outputs)

    warm_prompts, warm_tokens = workload(max(num_requests), seed=1, **lens)
    run(warm_prompts, [min(n, 32) for n in warm_tokens])   # kernels compile here, not in the timing
    rows = []
    for n in num_requests:
        prompts, max_tokens = workload(n, **lens)
        runs = [run(prompts, max_tokens) for _ in range(repeats)]
        seconds = [r[0] for r in runs]
        rows.append({"requests": n, "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(max_tokens),
                     "runs_s": seconds, "tok_s": sum(max_tokens) / statistics.median(seconds),
                     "steps": runs[-1][1], "preemptions": runs[-1][2]})
    return rows


def length_range(text: str) -> tuple[int, int]:
    values = positive_ints(text)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range LOW,HIGH of positive integers")
    return values[0], values[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="/tmp/otvllm-bench-qwen3-0.6b",
                        help="model directory (a random Qwen3-0.6B is written there when it holds none)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--num-requests", type=positive_ints, default=[64, 256, 1024])
    parser.add_argument("--max-model-lens", type=positive_ints, default=[4096, 16384, 40960])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per workload (default 2)")
    parser.add_argument("--prompt-lens", type=length_range, default=(100, 1024),
                        help="prompt lengths, LOW,HIGH (default 100,1024: the benchmark's)")
    parser.add_argument("--output-lens", type=length_range, default=(100, 1024),
                        help="output lengths, LOW,HIGH (default 100,1024: the benchmark's)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--child-kv", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child_kv:
        print(json.dumps(kv_cache_report(args.model_dir, device, args.child_kv)))
        return

    from benchmarks.throughput import make_model
    from otvllm.models.spec import model_spec, read_config
    model_dir = make_model(args.model_dir)
    spec = model_spec(*read_config(model_dir))
    too_long = [n for n in args.max_model_lens if n > spec.max_position_embeddings]
    if too_long:
        parser.error(f"--max-model-lens {too_long[0]} is more than the model's "
                     f"{spec.max_position_embeddings} positions")
    max_model_len = min(MAX_MODEL_LEN, spec.max_position_embeddings)
    if args.prompt_lens[1] + args.output_lens[1] > max_model_len:
        parser.error(f"--prompt-lens and --output-lens: the longest request ({args.prompt_lens[1]} + "
                     f"{args.output_lens[1]} tokens) must fit the throughput engine's max_model_len {max_model_len}")
    results: dict = {"device": device, "kv_cache": []}   # this process touches the GPU after its children

    gib = 1 << 30
    print(f"KV cache and memory against max_model_len ({device})")
    print(f"{'max_model_len':>13s} {'batched':>8s} {'KV blocks':>9s} {'KV tokens':>10s} {'KV GiB':>7s} "
          f"{'full-length seqs':>16s} {'allocated GiB':>13s} {'peak GiB':>8s}", flush=True)
    for max_model_len in args.max_model_lens:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--model-dir", model_dir, "--device", device,
                              "--child-kv", str(max_model_len)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"the engine at max_model_len={max_model_len} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results["kv_cache"].append(r)
        memory = (f"{r['cuda_allocated_bytes'] / gib:13.2f} {r['cuda_peak_bytes'] / gib:8.2f}"
                  if "cuda_allocated_bytes" in r else f"{'':>13s} {'':>8s}")
        print(f"{max_model_len:13d} {r['max_num_batched_tokens']:8d} {r['kv_blocks']:9d} {r['kv_tokens']:10d} "
              f"{r['kv_bytes'] / gib:7.2f} {r['full_length_seqs']:16d} {memory}", flush=True)

    lens = dict(prompt_lens=args.prompt_lens, output_lens=args.output_lens,
                max_token_id=min(10000, spec.vocab_size - 1))
    print(f"\nthroughput against the number of requests (tracing off, median of {args.repeats})")
    print(f"{'requests':>8s} {'prompt tok':>10s} {'output tok':>10s} {'tok/s':>9s} {'steps':>6s} "
          f"{'preemptions':>11s}  runs (s)", flush=True)
    if device.startswith("cuda"):
        results["device"] = torch.cuda.get_device_name()
    results["throughput"] = throughput(model_dir, device, max_model_len, args.num_requests, args.repeats, lens)
    for r in results["throughput"]:
        print(f"{r['requests']:8d} {r['prompt_tokens']:10d} {r['output_tokens']:10d} {r['tok_s']:9.0f} "
              f"{r['steps']:6d} {r['preemptions']:11d}  {', '.join(f'{s:.3f}' for s in r['runs_s'])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
