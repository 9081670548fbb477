"""Throughput on nano-vllm's benchmark workload, side by side in one process.

Workload (nano-vllm's bench.py): 256 requests, Python random.seed(0), prompts of
randint(100, 1024) random token ids in [0, 10000], outputs of randint(100, 1024) tokens,
ignore EOS, temperature 0.6; Qwen3-0.6B architecture in bf16 with random weights.

Systems: otvllm with tracing off; otvllm at `step` level exporting over OTLP/gRPC to a
receiver on loopback; transformers' own continuous batching on the 64-request variant
(it takes minutes on the full one), with otvllm on the same 64 requests for the ratio.
Also prints the workload's memory-bandwidth limit from a measured device copy.

    python benchmarks/throughput.py [--num-seqs 256] [--baseline-seqs 64] [--skip-transformers] [--json OUT]
"""

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0)


def workload(num_seqs: int, seed: int = 0, prompt_lens: tuple[int, int] = (100, 1024),
             output_lens: tuple[int, int] = (100, 1024), max_token_id: int = 10000):
    """nano-vllm's bench.py workload: (prompt token ids, max_tokens) per request. Other ranges
    give a workload of the same kind at another scale (or for a model with a smaller vocabulary)."""
    random.seed(seed)
    prompts = [[random.randint(0, max_token_id) for _ in range(random.randint(*prompt_lens))] for _ in range(num_seqs)]
    max_tokens = [random.randint(*output_lens) for _ in range(num_seqs)]
    return prompts, max_tokens


def make_model(path: str) -> str:
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import transformers
    config = transformers.Qwen3Config(**QWEN3_0_6B)
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return path


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write of a 1 GiB tensor)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * src.element_size() * 20 / (start.elapsed_time(end) / 1e3)


def bandwidth_limit(prompts, max_tokens, param_bytes: int, kv_bytes_per_token: int, decode_steps: int,
                    bandwidth: float) -> dict:
    """The fastest the workload can decode if every decode step reads the weights once and
    every sequence's KV once (prefill is compute-bound and left out)."""
    kv_reads = sum(sum(len(p) + k for k in range(1, n)) for p, n in zip(prompts, max_tokens)) * kv_bytes_per_token
    weight_reads = decode_steps * param_bytes
    seconds = (kv_reads + weight_reads) / bandwidth
    return {"kv_read_tb": kv_reads / 1e12, "weight_read_tb": weight_reads / 1e12, "seconds": seconds,
            "tok_per_s": sum(max_tokens) / seconds, "copy_bandwidth_tb_s": bandwidth / 1e12}


def run_otvllm(llm, prompts, max_tokens, level: str, repeats: int) -> list[float]:
    from otvllm import SamplingParams
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in max_tokens]
    llm.engine.set_trace_level(level)
    times = []
    for _ in range(repeats):
        steps_before = llm.engine.step_index
        llm.reset_prefix_cache()   # each run computes its prompts, as the first one did
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        assert sum(len(o.token_ids) for o in outputs) == sum(max_tokens)
        llm.last_generate_steps = llm.engine.step_index - steps_before
    return times


def profile_steps(llm, prompts, max_tokens) -> None:
    import cProfile
    import pstats
    profile = cProfile.Profile()
    profile.enable()
    run_otvllm(llm, prompts, max_tokens, "off", 1)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def run_transformers(model_dir: str, prompts, max_tokens) -> float:
    import transformers
    from transformers.generation.continuous_batching.utils import WorkloadHints
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa").cuda().eval()
    del config
    gc_ = transformers.GenerationConfig(do_sample=True, temperature=0.6, max_new_tokens=max(max_tokens),
                                        eos_token_id=-1, pad_token_id=0)
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(max_tokens),
                          num_requests=len(prompts))
    with model.continuous_batching_context_manager(generation_config=gc_, workload_hints=hints, block=True) as mgr:
        start = time.perf_counter()
        for i, (ids, n) in enumerate(zip(prompts, max_tokens)):
            mgr.add_request(ids, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        tokens = 0
        for _ in prompts:
            result = mgr.get_result(timeout=600)
            tokens += len(result.generated_tokens)
        seconds = time.perf_counter() - start
    assert tokens == sum(max_tokens), (tokens, sum(max_tokens))
    del model, mgr
    gc.collect()
    torch.cuda.empty_cache()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="/tmp/otvllm-bench-qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--baseline-seqs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--cudagraph-max-prefill-tokens", type=int, default=None,
                        help="largest prefill or mixed step replayed from a CUDA graph (0: prefill eagerly; "
                             "default: the engine's)")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--block-size", type=int, default=256, help="KV-cache block (page) size in tokens")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split over")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="print where the engine's Python time goes")
    parser.add_argument("--trace-file", default=None, help="also write the traced runs to this Jaeger JSON file "
                                                           "and print their summary")
    args = parser.parse_args()

    from otvllm import LLM
    from otvllm.tracing import configure

    model_dir = make_model(args.model_dir)
    prompts, max_tokens = workload(args.num_seqs)
    print(f"workload: {len(prompts)} requests, {sum(map(len, prompts))} prompt tokens, "
          f"{sum(max_tokens)} output tokens; GPU: {torch.cuda.get_device_name()}", flush=True)

    receiver = subprocess.Popen([sys.executable, "-m", "tests.otlp_receiver"], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    endpoint = f"http://127.0.0.1:{receiver.stdout.readline().strip()}"
    session = configure(endpoint=endpoint, service_name="otvllm-bench", trace_file=args.trace_file)
    prefill_graphs = ({} if args.cudagraph_max_prefill_tokens is None
                      else dict(cudagraph_max_prefill_tokens=args.cudagraph_max_prefill_tokens))
    llm = LLM(model_dir, max_model_len=4096, max_num_seqs=512, enforce_eager=args.enforce_eager,
              attention_backend=args.attention_backend, kvcache_block_size=args.block_size, trace_level="off",
              tensor_parallel_size=args.tensor_parallel_size, **prefill_graphs)
    engine = llm.engine
    print(f"otvllm: {engine.runner.backend.name} attention, {engine.block_manager.num_blocks} KV blocks of "
          f"{engine.resolved.kvcache_block_size}, CUDA graphs: {bool(engine.runner.graphs)}, prefill graphs up to "
          f"{engine.resolved.cudagraph_max_prefill_tokens} tokens", flush=True)
    # Warm-up: the workload's own prefill batches and a few decode steps, so that the kernels'
    # per-shape specialisations (Triton specialises integer arguments) compile outside the timing.
    run_otvllm(llm, prompts, [min(n, 32) for n in max_tokens], "off", 1)
    results: dict = {"gpu": torch.cuda.get_device_name(), "output_tokens": sum(max_tokens)}
    off, step = [], []
    for round_ in range(args.repeats):   # interleaved, first one then the other, so drift hits both alike
        for level in (("off", "step") if round_ % 2 == 0 else ("step", "off")):
            (off if level == "off" else step).extend(run_otvllm(llm, prompts, max_tokens, level, 1))
    if args.profile:
        profile_steps(llm, *workload(args.baseline_seqs))
    total = sum(max_tokens)
    results["otvllm_off_tok_s"] = total / statistics.median(off)
    results["otvllm_step_otlp_tok_s"] = total / statistics.median(step)
    results["otvllm_off_runs_s"], results["otvllm_step_runs_s"] = off, step
    results["tracing_cost"] = 1 - results["otvllm_step_otlp_tok_s"] / results["otvllm_off_tok_s"]
    spec = engine.spec
    kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * engine.runner.dtype.itemsize
    limit = bandwidth_limit(prompts, max_tokens, engine.runner.parameter_bytes, kv_per_token,
                            llm.last_generate_steps, copy_bandwidth())
    results["bandwidth_limit"] = limit
    print(f"otvllm, tracing off:        {results['otvllm_off_tok_s']:9.0f} tok/s  (runs {off})")
    print(f"otvllm, step level + OTLP:  {results['otvllm_step_otlp_tok_s']:9.0f} tok/s  (runs {step})  tracing cost {100 * results['tracing_cost']:.2f}%")
    print(f"bandwidth limit: {limit['kv_read_tb']:.1f} TB KV + {limit['weight_read_tb']:.2f} TB weights "
          f"({llm.last_generate_steps} steps) at {limit['copy_bandwidth_tb_s']:.2f} TB/s = "
          f"{limit['seconds']:.2f} s = {limit['tok_per_s']:.0f} tok/s; otvllm reaches "
          f"{100 * results['otvllm_off_tok_s'] / limit['tok_per_s']:.1f}% of it", flush=True)

    if not args.skip_transformers:
        small_prompts, small_tokens = workload(args.baseline_seqs)
        small = run_otvllm(llm, small_prompts, small_tokens, "off", 1)[0]
        del llm, engine
        gc.collect()
        torch.cuda.empty_cache()
        hf = run_transformers(model_dir, small_prompts, small_tokens)
        small_total = sum(small_tokens)
        results["baseline_requests"] = args.baseline_seqs
        results["otvllm_small_tok_s"] = small_total / small
        results["transformers_cb_tok_s"] = small_total / hf
        results["speedup_vs_transformers"] = hf / small
        print(f"{args.baseline_seqs}-request workload ({small_total} output tokens): otvllm "
              f"{results['otvllm_small_tok_s']:.0f} tok/s, transformers continuous batching "
              f"{results['transformers_cb_tok_s']:.0f} tok/s: {results['speedup_vs_transformers']:.1f}x")
    session.shutdown()
    receiver.stdin.close()
    print(f"OTLP receiver got {receiver.stdout.readline().strip()} spans")
    if args.trace_file:
        from otvllm.tracing.tools.summary import summarize_file
        print(summarize_file(args.trace_file))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
