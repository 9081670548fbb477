"""Where an engine step's time goes: one prefill and steady decode steps under torch.profiler.

A batch of `--batch` prompts of `--context` random token ids is prefilled (that one step is
profiled), decodes `--warmup-steps` steps, then `--steps` decode steps are profiled together
(after a warm-up generation of the same shape, so nothing compiles inside the profile). For each
of the two it prints:

  - on CUDA: kernels per step (and per layer), GPU time per step by kernel family (GEMM,
    attention, norm, rope, KV store, rope+store: q/k norm, rotary and KV store in one kernel,
    sampling, other) and by kernel; for the GEMMs and the attention, the bytes they must move
    (every weight once plus their inputs and outputs; every sequence's K and V once plus q and
    the output) over their time: the achieved GB/s, against
    the device copy rate measured in the same run with a large device-to-device copy (and
    TFLOP/s, which is what bounds a prefill); and, for decode, `--steps` more steps whose
    forwards (the model and lm_head, from a CUDA graph where one is captured) are timed without
    the profiler by CUDA events around each: what that adds to the kernels' time is the GPU
    idling between kernels (the profiler itself widens those gaps, so they are not read from
    the profile; the events leave out the host's work between forwards, and the sampling
    kernels, a few of the step's);
  - on CPU (so that the script can be checked without a GPU): torch.profiler's aten-operator
    table, and the same families over the operators' self time.

The family of a kernel is read from its name (cuBLAS, Triton, FlashAttention-4 and
torch.compile's fused kernels, whose names list the operations they fuse), so it is a guide:
the table of kernels beside it says what each family holds. Profiling runs apart from the
engine's own profiled steps (OTVLLM_TRACE_PROFILE_STEPS); tracing is off.

    python benchmarks/profile_step.py [--batch 1] [--context 1024] [--steps 20]
                                      [--attention-backend triton] [--json OUT]
"""

import argparse
import json
import os
import random
import re
import statistics
import sys
import time

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.forward_timer import DecodeForwardTimer  # noqa: E402
from otvllm.tracing.recording.profiler import short_name  # noqa: E402

FAMILIES = ("GEMM", "attention", "norm", "rope", "KV store", "rope+store", "sampling", "other")
# (family, pattern searched in the lower-cased kernel or operator name): the first match wins.
_RULES = [
    ("rope+store", r"rope_store"),
    ("KV store", r"store_kvcache|reshape_and_cache|index_put"),
    ("sampling", r"argmax|gumbel|exponential|multinomial|topk|sort|log_softmax|uniform"),
    ("attention", r"decode_stage|prefill_kernel|flash|fmha|attention|attn|softmax"),
    ("GEMM", r"gemm|gemv|nvjet|cutlass|xmma|splitkreduce|cublas|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("norm", r"rsqrt|norm"),
    ("rope", r"rotary|rope|cat.*neg|neg.*cat"),
]


def kernel_family(name: str) -> str:
    lower = name.lower()
    return next((family for family, pattern in _RULES if re.search(pattern, lower)), "other")


# ---------------------------------------------------------------- what the step must move

def gemm_work(model: nn.Module, num_tokens: int, num_seqs: int, itemsize: int) -> tuple[int, int]:
    """(bytes, FLOPs) of a forward's matrix products: every weight read once, inputs read and
    outputs written once; the output head only for the tokens that are sampled."""
    moved = flops = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Embedding) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            rows = num_seqs if name.endswith("lm_head") else num_tokens
            out_features, in_features = weight.shape
            moved += (weight.numel() + rows * (in_features + out_features)) * itemsize
            flops += 2 * rows * in_features * out_features
    return moved, flops


def attention_work(spec, q_lens: list[int], context_lens: list[int], itemsize: int) -> tuple[int, int]:
    """(bytes, FLOPs) of a forward's attention: each sequence's K and V read once, q read and the
    output written once; causal FLOPs for the new tokens over their context."""
    kv_per_token = 2 * spec.num_kv_heads * spec.head_dim * itemsize
    q_per_token = 2 * spec.num_heads * spec.head_dim * itemsize   # q in, output out
    moved = sum(context_lens) * kv_per_token + sum(q_lens) * q_per_token
    pairs = sum(q * (c - q) + q * (q + 1) // 2 for q, c in zip(q_lens, context_lens))
    flops = 4 * spec.num_heads * spec.head_dim * pairs
    return moved * spec.num_layers, flops * spec.num_layers


# ---------------------------------------------------------------- profiling

def profiled(fn, cuda: bool):
    """Run fn under torch.profiler; (the profile, host seconds)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    prof = profile(activities=activities)
    prof.start()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    prof.stop()
    return prof, seconds


def kernel_times(prof, cuda: bool) -> dict[str, list]:
    """short name -> [calls, total ns, family]: device kernels (copies and fills included) on
    CUDA, operators' self time on CPU. The family is read from the full name (a short name may
    be cut before the template arguments that tell it, such as ArgMaxOps)."""
    times: dict[str, list] = {}
    if cuda:
        for e in prof.profiler.kineto_results.events():
            if e.device_type() == DeviceType.CUDA and not e.is_user_annotation():
                entry = times.setdefault(short_name(e.name()), [0, 0, kernel_family(e.name())])
                entry[0] += 1
                entry[1] += e.end_ns() - e.start_ns()
    else:
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0:
                times[avg.key] = [avg.count, int(avg.self_cpu_time_total * 1e3), kernel_family(avg.key)]
    return times


def summarise(times: dict, steps: int, work: dict, copy_bytes_s: float | None, num_layers: int) -> dict:
    per_step = 1 / steps
    total_ns = sum(ns for _, ns, _ in times.values())
    families = {f: {"kernels_per_step": 0.0, "time_us_per_step": 0.0} for f in FAMILIES}
    for calls, ns, family in times.values():
        fam = families[family]
        fam["kernels_per_step"] += calls * per_step
        fam["time_us_per_step"] += ns * per_step / 1e3
    for name, fam in families.items():
        fam["share"] = fam["time_us_per_step"] * 1e3 / (total_ns * per_step) if total_ns else 0.0
        if name in work and fam["time_us_per_step"] > 0:
            moved, flops = work[name]
            seconds = fam["time_us_per_step"] / 1e6
            fam.update(bytes_per_step=moved, gb_s=moved / seconds / 1e9, tflop_s=flops / seconds / 1e12)
            if copy_bytes_s:
                fam["of_copy"] = moved / seconds / copy_bytes_s
    kernels = sum(calls for calls, _, _ in times.values()) * per_step
    top = sorted(times.items(), key=lambda item: -item[1][1])
    return {"steps": steps, "kernels_per_step": kernels, "kernels_per_layer": kernels / num_layers,
            "time_us_per_step": total_ns * per_step / 1e3, "families": families,
            "kernels": [{"name": name, "family": family, "calls_per_step": calls * per_step,
                         "time_us_per_step": ns * per_step / 1e3} for name, (calls, ns, family) in top]}


def unprofiled_forward_gpu_us(engine, steps: int) -> float:
    """Median GPU time of the model's forward in `steps` engine steps (not of the steps: their
    host work, during which the GPU may wait, stays out)."""
    timer = DecodeForwardTimer(engine.runner)
    try:
        for _ in range(steps):
            engine.step()
    finally:
        timer.remove()
    return statistics.median(timer.take_ms()) * 1e3


def print_phase(title: str, summary: dict, cuda: bool, top: int) -> None:
    what, unit = ("kernels", "GPU") if cuda else ("operators", "CPU (operators' self time)")
    print(f"\n{title}")
    print(f"  {what} per step {summary['kernels_per_step']:.1f} ({summary['kernels_per_layer']:.1f} per layer); "
          f"{unit} time per step {summary['time_us_per_step']:.1f} us; host wall time per step "
          f"{summary['wall_us_per_step']:.1f} us")
    print(f"  {'family':10s} {'kernels':>8s} {'us/step':>10s} {'share':>7s} {'MB/step':>9s} {'GB/s':>8s} "
          f"{'of copy':>8s} {'TFLOP/s':>8s}")
    for name, f in summary["families"].items():
        if not f["kernels_per_step"]:
            continue
        extra = ""
        if "gb_s" in f:
            of_copy = f"{100 * f['of_copy']:7.1f}%" if "of_copy" in f else f"{'':>8s}"
            extra = f" {f['bytes_per_step'] / 1e6:9.2f} {f['gb_s']:8.1f} {of_copy} {f['tflop_s']:8.2f}"
        print(f"  {name:10s} {f['kernels_per_step']:8.1f} {f['time_us_per_step']:10.1f} "
              f"{100 * f['share']:6.1f}%{extra}")
    if "unprofiled_gpu_us_per_step" in summary:
        idle = summary["unprofiled_gpu_us_per_step"] - summary["time_us_per_step"]
        print(f"  without the profiler: {summary['unprofiled_gpu_us_per_step']:.1f} us of GPU time per forward "
              f"(CUDA events, median), {idle:.1f} us more than the step's kernels "
              f"({idle / summary['kernels_per_step']:.2f} us per kernel): the GPU idle between them")
    print(f"  top {top} by time:")
    for k in summary["kernels"][:top]:
        print(f"    {k['time_us_per_step']:9.1f} us {k['calls_per_step']:7.1f}x  {k['family']:9s} {k['name'][:110]}")


# ---------------------------------------------------------------- the run

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="/tmp/otvllm-bench-qwen3-0.6b",
                        help="model directory (a random Qwen3-0.6B is written there when it holds none)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoding together (default 1)")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens per sequence (default 1024)")
    parser.add_argument("--steps", type=int, default=20, help="decode steps profiled (default 20)")
    parser.add_argument("--warmup-steps", type=int, default=4, help="decode steps before the profiled ones")
    parser.add_argument("--attention-backend", default="auto", help="otvllm's (default auto)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per phase (default 15)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    for name in ("batch", "context", "steps", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")

    from benchmarks.throughput import copy_bandwidth, make_model
    from otvllm import LLM, SamplingParams
    new_tokens = args.warmup_steps + 2 * args.steps + 2
    max_model_len = args.context + new_tokens
    try:
        llm = LLM(make_model(args.model_dir), device=device, attention_backend=args.attention_backend,
                  enforce_eager=args.enforce_eager, max_model_len=max_model_len, max_num_seqs=args.batch,
                  max_num_batched_tokens=args.batch * max_model_len, trace_level="off")
    except ValueError as e:
        parser.error(str(e))
    engine = llm.engine
    spec, runner = engine.spec, engine.runner
    itemsize = runner.dtype.itemsize
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    rng = random.Random(0)
    vocab = min(spec.vocab_size, 10000)
    prompts = [[[rng.randrange(vocab) for _ in range(args.context)] for _ in range(args.batch)] for _ in range(2)]
    llm.generate(prompts[0], params, use_tqdm=False)   # warm-up: every kernel compiles here
    copy_rate = copy_bandwidth() if cuda else None

    seqs = [engine.make_sequence(p, params) for p in prompts[1]]
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "batch": args.batch,
               "context": args.context, "attention_backend": engine.resolved.attention_backend,
               "cuda_graphs": bool(runner.graphs), "dtype": str(runner.dtype).removeprefix("torch."),
               "copy_gb_s": copy_rate / 1e9 if copy_rate else None}
    with engine.tracer.generate(seqs, [None] * len(seqs)):
        for seq in seqs:
            engine.add(seq)
        prof, seconds = profiled(engine.step, cuda)    # the prefill: launched, and waited for
        lens = [args.context] * args.batch
        work = {"GEMM": gemm_work(runner.model, sum(lens), args.batch, itemsize),
                "attention": attention_work(spec, lens, lens, itemsize)}
        prefill = summarise(kernel_times(prof, cuda), 1, work, copy_rate, spec.num_layers)
        prefill["wall_us_per_step"] = seconds * 1e6
        if not cuda:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        for _ in range(args.warmup_steps):
            engine.step()
        contexts = []

        def decode_steps():
            for _ in range(args.steps):
                contexts.append([len(s) for s in seqs])
                engine.step()

        prof, seconds = profiled(decode_steps, cuda)
        mean_lens = [round(sum(c[i] for c in contexts) / len(contexts)) for i in range(args.batch)]
        work = {"GEMM": gemm_work(runner.model, args.batch, args.batch, itemsize),
                "attention": attention_work(spec, [1] * args.batch, mean_lens, itemsize)}
        decode = summarise(kernel_times(prof, cuda), args.steps, work, copy_rate, spec.num_layers)
        decode["wall_us_per_step"] = seconds * 1e6 / args.steps
        decode["mean_context"] = sum(mean_lens) / len(mean_lens)
        if cuda:
            decode["unprofiled_gpu_us_per_step"] = unprofiled_forward_gpu_us(engine, args.steps)
        else:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        while not engine.is_finished():
            engine.step()
    results.update(prefill=prefill, decode=decode)

    print(f"{results['device']}: {results['attention_backend']} attention, {results['dtype']}, CUDA graphs "
          f"{'on' if results['cuda_graphs'] else 'off'}" +
          (f"; device copy rate {results['copy_gb_s']:.0f} GB/s" if cuda else ""))
    print_phase(f"prefill: {args.batch} x {args.context} tokens, one step", prefill, cuda, args.top)
    print_phase(f"decode: batch {args.batch}, context ~{decode['mean_context']:.0f}, {args.steps} steps",
                decode, cuda, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
