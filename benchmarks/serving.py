"""Serving benchmark: `otvllm serve` under an open-loop client, against offline `generate`
on the same workload, same machine, same engine settings.

Workload: nano-vllm's (benchmarks/throughput.py: 256 requests of 100-1024 random token ids,
100-1024 output tokens, ignore EOS, temperature 0.6). First the offline engine runs it in a
subprocess (a warm-up run, then a timed one). Then, for each stream interval among the
modes, a server starts with step-level tracing exported over OTLP to a receiver in another
process, and metrics on; after a warm-up (the workload's prompt lengths with 32 tokens
each), a client sends the workload at `--rate` requests/s (Poisson arrivals; `inf`: all at
once, the saturation point) once per mode, each time with fresh token ids so that no run
finds an earlier one in the prefix cache, and measures time to first token (streaming),
time per output token and end-to-end latency per request, and output tokens per second
from the first request sent to the last response read.

The client speaks the OpenAI API over aiohttp with bodies encoded before the clock starts,
as vLLM's serving benchmark does: the `openai` client's own work per request (about 7 ms on
the H200's host for a 500-token prompt) would otherwise be what is measured.

With `--repeats R` the offline run and every mode run R times (the modes taking turns on their
server): throughput is the median of the runs, latencies are those of the median run (the lower
middle one of an even count); every run's throughput is in the JSON.

    python benchmarks/serving.py [--rate inf] [--num-seqs 256] [--modes nostream,stream,stream@50]
                                 [--repeats 1] [--json OUT]
"""

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.throughput import make_model, workload  # noqa: E402

ENGINE_ARGS = ["--max-model-len", "4096", "--max-num-seqs", "512"]

OFFLINE = """
import sys, time, json
sys.path.insert(0, {root!r})
from benchmarks.throughput import workload
from otvllm import LLM, SamplingParams
prompts, max_tokens = workload({n})
llm = LLM({model!r}, max_model_len=4096, max_num_seqs=512, trace_level="off")
params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
llm.generate(prompts, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=min(m, 32)) for m in max_tokens],
             use_tqdm=False)
runs = []
for _ in range({repeats}):
    llm.reset_prefix_cache()
    start = time.perf_counter()
    out = llm.generate(prompts, params, use_tqdm=False)
    runs.append({{"seconds": time.perf_counter() - start, "tokens": sum(len(o.token_ids) for o in out)}})
print(json.dumps(runs))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def one_request(session, url: str, body: bytes, stream: bool, start_at: float) -> dict:
    """One completion request, sent at `start_at` (perf_counter); streaming responses are read
    line by line and only the usage chunk is parsed, so the client costs little per token."""
    delay = start_at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    start = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        if stream:
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                if first is None:
                    first = time.perf_counter()
                if b'"usage":{' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        else:
            tokens = (await response.json())["usage"]["completion_tokens"]
    end = time.perf_counter()
    result = {"e2e_s": end - start, "tokens": tokens, "start": start, "end": end}
    if first is not None:
        result["ttft_s"] = first - start
        if tokens > 1:
            result["tpot_s"] = (end - first) / (tokens - 1)
    return result


async def run_load(base_url: str, model: str, prompts, max_tokens, rate: float, stream: bool) -> tuple[list, float]:
    """Open loop: request i is sent at its Poisson arrival time whatever the server's state.
    Bodies are encoded before the clock starts. The time is from the first request sent to
    the last response read."""
    import aiohttp

    bodies = []
    for prompt, n in zip(prompts, max_tokens):
        request = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.6, "ignore_eos": True,
                   "stream": stream}
        if stream:
            request["stream_options"] = {"include_usage": True}
        bodies.append(json.dumps(request).encode())
    rng = random.Random(1)
    offsets, t = [], 0.0
    for _ in bodies:
        offsets.append(t)
        if rate != float("inf"):
            t += rng.expovariate(rate)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        begin = time.perf_counter() + 0.05
        url = f"{base_url}/completions"
        results = await asyncio.gather(*(one_request(session, url, body, stream, begin + offset)
                                         for body, offset in zip(bodies, offsets)))
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    return results, seconds


def wait_ready(proc, port: int, timeout: float = 600) -> None:
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def summary(results: list[dict], seconds: float) -> dict:
    out = {"requests": len(results), "output_tokens": sum(r["tokens"] for r in results), "seconds": seconds}
    out["output_tok_s"] = out["output_tokens"] / seconds
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        values = [r[key] for r in results if key in r]
        if values:
            out[key] = {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
                        "mean": statistics.fmean(values)}
    return out


def fresh_tokens(prompts: list[list[int]], variant: int) -> list[list[int]]:
    """The same prompt lengths with other token ids, so a run finds nothing of an earlier
    run in the prefix cache (offline generate resets its cache between warm-up and run)."""
    return [[(t + 7919 * variant) % 10000 for t in p] for p in prompts]


def parse_mode(mode: str) -> tuple[bool, float]:
    """'nostream' | 'stream' | 'stream@MS' (stream, the server sending at most every MS ms)."""
    if mode == "nostream":
        return False, 0.0
    if mode == "stream" or mode.startswith("stream@"):
        return True, float(mode.partition("@")[2] or 0)
    raise SystemExit(f"--modes: unknown mode {mode!r}: use nostream, stream or stream@MS")


def start_server(model_dir: str, interval_ms: float, args, endpoint: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, "-m", "otvllm.cli", "serve", "--model", model_dir, "--port", str(port),
               "--max-queue", "100000", "--stream-interval-ms", str(interval_ms), "--trace-level", args.trace_level,
               "--otlp-endpoint", endpoint, *ENGINE_ARGS]
    if args.trace_file:
        command += ["--trace-file", f"{args.trace_file}.{interval_ms:g}ms.json"]
    return subprocess.Popen(command, env=dict(os.environ, OTEL_METRIC_EXPORT_INTERVAL="5000")), port


def report(label: str, result: dict, offline_tok_s: float | None) -> None:
    line = f"server, {label}: {result['output_tok_s']:.0f} tok/s"
    if len(result["runs_tok_s"]) > 1:
        line += f" (median of {', '.join(f'{r:.0f}' for r in result['runs_tok_s'])})"
    if offline_tok_s:
        line += f" = {100 * result['output_tok_s'] / offline_tok_s:.1f}% of offline"
    print(line, flush=True)
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        if key in result:
            v = result[key]
            print(f"  {key[:-2]:5s} p50 {1e3 * v['p50']:9.1f} ms  p99 {1e3 * v['p99']:9.1f} ms  "
                  f"mean {1e3 * v['mean']:9.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="/tmp/otvllm-bench-qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    parser.add_argument("--modes", default="nostream,stream,stream@50",
                        help="comma-separated: nostream, stream (a chunk per engine step), stream@MS (the "
                             "server's --stream-interval-ms MS); one server per interval")
    parser.add_argument("--trace-level", default="step")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the offline workload and of each mode")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--trace-file", default=None, help="each server also writes its trace to PREFIX.<interval>.json")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    by_interval: dict[float, list[str]] = {}
    for mode in modes:
        by_interval.setdefault(parse_mode(mode)[1], []).append(mode)

    model_dir = make_model(args.model_dir)
    prompts, max_tokens = workload(args.num_seqs)
    results: dict = {"workload": {"requests": len(prompts), "output_tokens": sum(max_tokens)}, "rate": args.rate,
                     "server": {}}
    offline_tok_s = None
    if not args.skip_offline:
        code = OFFLINE.format(root=ROOT, n=args.num_seqs, model=model_dir, repeats=args.repeats)
        runs = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                         text=True).stdout.strip().splitlines()[-1])
        rates = [r["tokens"] / r["seconds"] for r in runs]
        offline_tok_s = results["offline_tok_s"] = statistics.median(rates)
        results["offline_runs_tok_s"] = rates
        print(f"offline generate: {offline_tok_s:.0f} tok/s (median of {', '.join(f'{r:.0f}' for r in rates)})",
              flush=True)

    receiver = subprocess.Popen([sys.executable, "-m", "tests.otlp_receiver"], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    endpoint = f"http://127.0.0.1:{receiver.stdout.readline().strip()}"
    name = os.path.basename(os.path.normpath(model_dir))
    variant = 0
    try:
        for interval_ms, interval_modes in by_interval.items():
            server, port = start_server(model_dir, interval_ms, args, endpoint)
            try:
                wait_ready(server, port)
                base_url = f"http://127.0.0.1:{port}/v1"
                variant += 1   # warm-up: compiles and captures what the run will use
                asyncio.run(run_load(base_url, name, fresh_tokens(prompts, variant), [min(n, 32) for n in max_tokens],
                                     float("inf"), False))
                runs: dict[str, list[dict]] = {mode: [] for mode in interval_modes}
                for _ in range(args.repeats):
                    for mode in interval_modes:
                        variant += 1
                        load, seconds = asyncio.run(run_load(base_url, name, fresh_tokens(prompts, variant),
                                                             max_tokens, args.rate, parse_mode(mode)[0]))
                        runs[mode].append(summary(load, seconds))
                for mode, mode_runs in runs.items():
                    rates = [r["output_tok_s"] for r in mode_runs]
                    # latencies of the median run (the lower middle one of an even count)
                    result = sorted(mode_runs, key=lambda r: r["output_tok_s"])[(len(mode_runs) - 1) // 2]
                    result = results["server"][mode] = dict(result, output_tok_s=statistics.median(rates),
                                                            runs_tok_s=rates)
                    if offline_tok_s:
                        result["over_offline"] = result["output_tok_s"] / offline_tok_s
                    report(f"{mode}, rate {args.rate}", result, offline_tok_s)
            finally:
                server.terminate()
                server.wait(timeout=120)
    finally:
        receiver.stdin.close()
        print(f"OTLP receiver got {receiver.stdout.readline().strip()} spans")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
