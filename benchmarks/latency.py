"""Time to first token and time per output token at small batches, as a streaming client sees them.

For each context length and each system, one process loads the engine and, for each batch size,
warms up on other prompts of the same shape, then runs `--repeats` timed generations: a batch
of prompts of `--contexts` random token ids (other ones in every run: no prefix-cache hits),
`--output-len` new tokens each, greedy, EOS ignored.
Times are taken on the host with `time.perf_counter` in a streaming-like loop: the engine's
`step()` is called until the batch is done, and each token counts as arrived when it is on the
host after a step. Traces play no part (tracing is off).

  - TTFT: from adding the requests to a request's first token (mean over the batch; the median
    of the runs);
  - TPOT: the intervals between a request's consecutive tokens (the decode steps), over all
    requests and runs: their median (p50) and mean;
  - forward GPU (otvllm on CUDA): the median GPU time of a decode step's forward (the model and
    lm_head, not sampling), from CUDA events around it. Where TPOT is well above it, the GPU
    waits for the host between steps.

Systems: otvllm with each of `--attention-backends` (`flash_attn` only where FlashAttention-4
can serve the model; it is skipped with the reason elsewhere) and, with `--nano-vllm DIR`,
nano-vllm from that checkout (its flash-attn 2 calls served by FlashAttention-4 through
benchmarks/fa2_api_on_fa4, as in nanovllm_side_by_side.py; nano-vllm refuses greedy sampling,
so it samples at temperature 1e-5, which picks the same token at the same cost); with
`--eager-prefill`, also otvllm with its prefills launched eagerly instead of replayed from CUDA
graphs (what prefill graphs save). Each system and
context runs in a process of its own (each engine takes most of the GPU's memory).

    python benchmarks/latency.py [--batches 1,8] [--contexts 1024,4096,16384] [--output-len 512]
                                 [--nano-vllm ../nano-vllm] [--eager-prefill] [--repeats 3] [--json OUT]
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.arguments import positive_ints  # noqa: E402

SHIM = os.path.join(ROOT, "benchmarks", "fa2_api_on_fa4")
NANOVLLM = "nano-vllm"
EAGER_PREFILL = "otvllm-eager-prefill"   # otvllm with its prefills launched eagerly, not from CUDA graphs
NANOVLLM_TEMPERATURE = 1e-5   # nano-vllm asserts temperature > 1e-10: no greedy
WARMUP_SEED = 1 << 20         # warm-up prompts come from other seeds than the timed ones


def prompts_for(batch: int, context: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(context)] for _ in range(batch)]


class OtvllmSystem:
    def __init__(self, model_dir: str, device: str, backend: str, max_model_len: int, max_batch: int,
                 eager_prefill: bool = False):
        from benchmarks.forward_timer import DecodeForwardTimer
        from otvllm import LLM, SamplingParams
        from otvllm.core.sequence import PENDING_TOKEN
        more = dict(cudagraph_max_prefill_tokens=0) if eager_prefill else {}
        self.llm = LLM(model_dir, device=device, attention_backend=backend, max_model_len=max_model_len,
                       max_num_seqs=max_batch, max_num_batched_tokens=max_batch * max_model_len, trace_level="off",
                       **more)
        self.engine = self.llm.engine
        self.vocab = self.engine.spec.vocab_size
        self.backend = self.engine.resolved.attention_backend
        self.params = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        self.pending = PENDING_TOKEN
        # the GPU time of each decode step's forward (the model and lm_head)
        cuda = self.engine.runner.device.type == "cuda"
        self.forward_timer = DecodeForwardTimer(self.engine.runner) if cuda else None

    def decode_forward_ms(self) -> list[float]:
        """The GPU time of each decode forward since the last call."""
        return self.forward_timer.take_ms() if self.forward_timer is not None else []

    def host_tokens(self, seq) -> int:
        """Completion tokens of `seq` on the host (not those still on their way from the device)."""
        end = seq.num_tokens
        while end > seq.num_prompt_tokens and seq.token_ids[end - 1] == self.pending:
            end -= 1
        return end - seq.num_prompt_tokens

    def start(self, prompts, output_len: int) -> list:
        return [self.engine.make_sequence(p, self.params(output_len)) for p in prompts]

    def run(self, seqs, on_step) -> None:
        engine = self.engine
        with engine.tracer.generate(seqs, [None] * len(seqs)):
            for seq in seqs:
                engine.add(seq)
            while not engine.is_finished():
                engine.step()
                on_step()


class NanoVllmSystem:
    backend = "flash_attn (fa2_api_on_fa4)"

    def __init__(self, model_dir: str, device: str, backend: str, max_model_len: int, max_batch: int):
        from nanovllm import LLM, SamplingParams
        from nanovllm.engine.sequence import Sequence
        self.llm = LLM(model_dir, enforce_eager=False, max_model_len=max_model_len, max_num_seqs=max_batch,
                       max_num_batched_tokens=max_batch * max_model_len)
        self.vocab = self.llm.model_runner.config.hf_config.vocab_size
        self.make = lambda p, n: Sequence(p, SamplingParams(temperature=NANOVLLM_TEMPERATURE, max_tokens=n,
                                                            ignore_eos=True))

    @staticmethod
    def host_tokens(seq) -> int:
        return seq.num_completion_tokens   # nano-vllm's steps are synchronous

    def start(self, prompts, output_len: int) -> list:
        return [self.make(p, output_len) for p in prompts]

    def run(self, seqs, on_step) -> None:
        for seq in seqs:   # what nano-vllm's add_request does, keeping the Sequence to watch it
            self.llm.scheduler.add(seq)
        while not self.llm.is_finished():
            self.llm.step()
            on_step()


def timed_run(system, prompts, output_len: int) -> tuple[list[float], list[float]]:
    """(each request's TTFT in s, every interval between consecutive tokens of a request in s)."""
    seqs = system.start(prompts, output_len)
    arrivals: list[list[float]] = [[] for _ in seqs]

    def on_step():
        now = time.perf_counter()
        for seq, times in zip(seqs, arrivals):
            times.extend([now] * (system.host_tokens(seq) - len(times)))

    start = time.perf_counter()
    system.run(seqs, on_step)
    for times in arrivals:
        if len(times) != output_len:
            raise RuntimeError(f"a request produced {len(times)} tokens, not {output_len}")
    ttfts = [times[0] - start for times in arrivals]
    intervals = [b - a for times in arrivals for a, b in zip(times, times[1:])]
    return ttfts, intervals


def measure(system, batch: int, context: int, output_len: int, repeats: int) -> dict:
    sync = _device_sync()
    forward_ms = getattr(system, "decode_forward_ms", lambda: [])
    timed_run(system, prompts_for(batch, context, system.vocab, WARMUP_SEED + batch), output_len)
    forward_ms()
    ttft_runs, intervals, forwards = [], [], []
    for run in range(repeats):
        sync()
        ttfts, gaps = timed_run(system, prompts_for(batch, context, system.vocab, 1000 * batch + run), output_len)
        ttft_runs.append(ttfts)
        intervals += gaps
        forwards += forward_ms()
    ms = 1e3
    return {"context": context, "batch": batch, "output_len": output_len, "repeats": repeats,
            "output_tokens": batch * output_len * repeats,
            "ttft_ms": statistics.median(statistics.mean(r) for r in ttft_runs) * ms,
            "ttft_max_ms": max(max(r) for r in ttft_runs) * ms,
            "tpot_p50_ms": statistics.median(intervals) * ms,
            "tpot_mean_ms": statistics.mean(intervals) * ms,
            "decode_intervals": len(intervals),
            # where TPOT is well above it, the GPU waits for the host between steps
            "decode_forward_gpu_p50_ms": statistics.median(forwards) if forwards else None}


def _device_sync():
    import torch
    return torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


def child(args) -> dict:
    """In the system's own process: every batch size at one context."""
    name, backend = args.child
    if name != NANOVLLM and backend == "flash_attn":
        import torch
        from otvllm.ops import flash_attn4
        from otvllm.models.spec import model_spec, read_config
        spec = model_spec(*read_config(args.model_dir))
        why_not = flash_attn4.unavailable_reason(torch.device(args.device), torch.bfloat16, spec.head_dim) \
            if args.device.startswith("cuda") else "FlashAttention-4 needs a CUDA device"
        if why_not:
            return {"skipped": why_not}
    max_model_len = args.child_context + args.output_len
    if name == NANOVLLM:
        system = NanoVllmSystem(args.model_dir, args.device, backend, max_model_len, max(args.batches))
    else:
        system = OtvllmSystem(args.model_dir, args.device, backend, max_model_len, max(args.batches),
                              eager_prefill=name == EAGER_PREFILL)
    results = [measure(system, b, args.child_context, args.output_len, args.repeats) for b in args.batches]
    # which projections start-up put on the Triton GEMV, at which token counts: it times them each run
    gemv = system.engine.runner.gemv_choice if isinstance(system, OtvllmSystem) else None
    return {"attention_backend": system.backend, "results": results, **({"gemv_choice": gemv} if gemv else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="/tmp/otvllm-bench-qwen3-0.6b",
                        help="model directory (a random Qwen3-0.6B is written there when it holds none)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batches", type=positive_ints, default=[1, 8], help="batch sizes (default 1,8)")
    parser.add_argument("--contexts", type=positive_ints, default=[1024],
                        help="prompt lengths in tokens (default 1024; e.g. 1024,4096,16384)")
    parser.add_argument("--output-len", type=int, default=512, help="new tokens per request (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (default 3)")
    parser.add_argument("--attention-backends", default=None,
                        help="otvllm's backends, comma-separated (default: triton,flash_attn on CUDA, torch on CPU)")
    parser.add_argument("--nano-vllm", metavar="DIR", help="also time nano-vllm from this checkout")
    parser.add_argument("--eager-prefill", action="store_true",
                        help=f"also time otvllm ({EAGER_PREFILL}) with its prefills launched eagerly rather "
                             "than replayed from CUDA graphs (cudagraph_max_prefill_tokens=0)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.output_len < 2:
        parser.error("--output-len must be at least 2 (time per output token needs two tokens)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.nano_vllm and not os.path.isdir(os.path.join(args.nano_vllm, "nanovllm")):
        parser.error(f"--nano-vllm {args.nano_vllm}: not a nano-vllm checkout (no nanovllm/ directory in it)")
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(child(args)))
        return
    on_cuda = args.device.startswith("cuda")
    backends = (args.attention_backends or ("triton,flash_attn" if on_cuda else "torch")).split(",")
    from otvllm.ops import ATTENTION_BACKENDS
    for backend in backends:
        if backend not in ATTENTION_BACKENDS:
            parser.error(f"--attention-backends: unknown backend {backend!r} "
                         f"(choose from {', '.join(ATTENTION_BACKENDS)})")
        if backend != "torch" and not on_cuda:
            parser.error(f"--attention-backends: {backend} needs a CUDA device; on {args.device} use torch")
    if args.nano_vllm and not on_cuda:
        parser.error("--nano-vllm needs a CUDA device")

    from benchmarks.throughput import make_model
    model_dir = make_model(args.model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        limit = json.load(f).get("max_position_embeddings")
    if limit and max(args.contexts) + args.output_len > limit:
        parser.error(f"context {max(args.contexts)} + --output-len {args.output_len} is more than the model's "
                     f"{limit} positions")
    systems = [("otvllm", b) for b in backends]
    if args.eager_prefill:
        systems += [(EAGER_PREFILL, b) for b in backends]
    if args.nano_vllm:
        from otvllm.synthetic import byte_level_tokenizer
        byte_level_tokenizer().save_pretrained(model_dir)   # nano-vllm loads a tokenizer with the model
        systems.append((NANOVLLM, "flash_attn"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        ([SHIM, os.path.abspath(args.nano_vllm)] if args.nano_vllm else []) + [ROOT, os.environ.get("PYTHONPATH", "")]))

    rows = []
    print(f"{'system':28s} {'context':>7s} {'batch':>5s} {'TTFT ms':>9s} {'TPOT p50 ms':>11s} "
          f"{'TPOT mean ms':>12s} {'forward GPU p50 ms':>18s}", flush=True)
    for context in args.contexts:
        for name, backend in systems:
            command = [sys.executable, os.path.abspath(__file__), "--model-dir", model_dir, "--device", args.device,
                       "--batches", ",".join(map(str, args.batches)), "--output-len", str(args.output_len),
                       "--repeats", str(args.repeats), "--child", name, backend, "--child-context", str(context)]
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{name} ({backend}) at context {context} failed:\n{out.stderr[-3000:]}")
            report = json.loads(out.stdout.strip().splitlines()[-1])
            label = f"{name} {report.get('attention_backend', backend)}"
            if "skipped" in report:
                print(f"{label:28s} skipped: {report['skipped']}", flush=True)
                continue
            for r in report["results"]:
                rows.append({"system": name, "attention_backend": report["attention_backend"], **r,
                             **({"gemv_choice": report["gemv_choice"]} if "gemv_choice" in report else {})})
                gpu = r["decode_forward_gpu_p50_ms"]
                print(f"{label:28s} {context:7d} {r['batch']:5d} {r['ttft_ms']:9.2f} {r['tpot_p50_ms']:11.3f} "
                      f"{r['tpot_mean_ms']:12.3f} {'-' if gpu is None else f'{gpu:.3f}':>18s}", flush=True)
            if "gemv_choice" in report:
                print(f"  Triton GEMV (projection: token counts): {report['gemv_choice']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "model_dir": model_dir, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
