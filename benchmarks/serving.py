"""Serving benchmark: `otvllm serve` under an open-loop client, against offline `generate`
on the same workload, same machine, same engine settings.

Workload: nano-vllm's (benchmarks/throughput.py: 256 requests of 100-1024 random token ids,
100-1024 output tokens, ignore EOS, temperature 0.6). First the offline engine runs it in a
subprocess (a warm-up run, then a timed one). Then a server starts with step-level tracing
exported over OTLP to a receiver in another process, and metrics on; after a warm-up of the
workload's prompts with 32 tokens each, a client sends the workload at `--rate` requests/s
(Poisson arrivals; `inf`: all at once, the saturation point) through the OpenAI API with
the official `openai` client, streaming, and measures time to first token, time per output
token and end-to-end latency per request, and output tokens per second overall.

    python benchmarks/serving.py [--rate inf] [--num-seqs 256] [--no-stream] [--json OUT]
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
llm.reset_prefix_cache()
start = time.perf_counter()
out = llm.generate(prompts, params, use_tqdm=False)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "tokens": sum(len(o.token_ids) for o in out)}}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def one_request(client, model: str, prompt: list[int], max_tokens: int, stream: bool) -> dict:
    start = time.perf_counter()
    first = None
    if stream:
        tokens = 0
        response = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.6, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in response:
            if first is None and chunk.choices:   # a chunk carries one step's tokens (text or not)
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    else:
        response = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                   temperature=0.6, extra_body={"ignore_eos": True})
        tokens = response.usage.completion_tokens
    end = time.perf_counter()
    result = {"e2e_s": end - start, "tokens": tokens}
    if first is not None:
        result["ttft_s"] = first - start
        if tokens > 1:
            result["tpot_s"] = (end - first) / (tokens - 1)
    return result


async def run_load(base_url: str, model: str, prompts, max_tokens, rate: float, stream: bool) -> tuple[list, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600)
    rng = random.Random(1)
    tasks = []
    start = time.perf_counter()
    for prompt, n in zip(prompts, max_tokens):
        tasks.append(asyncio.create_task(one_request(client, model, prompt, n, stream)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    seconds = time.perf_counter() - start
    await client.close()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="/tmp/otvllm-bench-qwen3-0.6b")
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--rate", type=float, default=float("inf"), help="requests per second (inf: all at once)")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--trace-level", default="step")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--stream-interval-ms", type=float, default=0.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model_dir = make_model(args.model_dir)
    prompts, max_tokens = workload(args.num_seqs)
    results: dict = {"workload": {"requests": len(prompts), "output_tokens": sum(max_tokens)}, "rate": args.rate,
                     "stream": not args.no_stream}
    if not args.skip_offline:
        code = OFFLINE.format(root=ROOT, n=args.num_seqs, model=model_dir)
        offline = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                            text=True).stdout.strip().splitlines()[-1])
        results["offline_tok_s"] = offline["tokens"] / offline["seconds"]
        print(f"offline generate: {results['offline_tok_s']:.0f} tok/s ({offline['seconds']:.2f} s)", flush=True)

    receiver = subprocess.Popen([sys.executable, "-m", "tests.otlp_receiver"], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    endpoint = f"http://127.0.0.1:{receiver.stdout.readline().strip()}"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "otvllm.cli", "serve", "--model", model_dir, "--port", str(port), "--max-queue",
         "100000", "--stream-interval-ms", str(args.stream_interval_ms), "--trace-level", args.trace_level, "--otlp-endpoint", endpoint, *ENGINE_ARGS],
        env=dict(os.environ, OTEL_METRIC_EXPORT_INTERVAL="5000"))
    try:
        wait_ready(server, port)
        base_url, name = f"http://127.0.0.1:{port}/v1", os.path.basename(os.path.normpath(model_dir))
        asyncio.run(run_load(base_url, name, prompts, [min(n, 32) for n in max_tokens], float("inf"), False))
        load, seconds = asyncio.run(run_load(base_url, name, prompts, max_tokens, args.rate, not args.no_stream))
    finally:
        server.terminate()
        server.wait(timeout=120)
        receiver.stdin.close()
        spans = receiver.stdout.readline().strip()
    results["server"] = summary(load, seconds)
    server_tok_s = results["server"]["output_tok_s"]
    mode = f"streaming every {args.stream_interval_ms:g} ms" if not args.no_stream else "not streaming"
    line = f"server ({mode}, rate {args.rate}): {server_tok_s:.0f} tok/s"
    if "offline_tok_s" in results:
        results["server_over_offline"] = server_tok_s / results["offline_tok_s"]
        line += f" = {100 * results['server_over_offline']:.1f}% of offline"
    print(line)
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        if key in results["server"]:
            v = results["server"][key]
            print(f"  {key[:-2]:5s} p50 {1e3 * v['p50']:9.1f} ms  p99 {1e3 * v['p99']:9.1f} ms  mean {1e3 * v['mean']:9.1f} ms")
    print(f"OTLP receiver got {spans} spans")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
