"""otvllm against nano-vllm on the same GPU, workload and random Qwen3-0.6B weights.

nano-vllm (https://github.com/GeeeekExplorer/nano-vllm) is not a dependency: point
--nanovllm-path at a checkout. It calls flash-attn 2, which benchmarks/fa2_api_on_fa4 serves
with FlashAttention-4 (install flash-attn-4). Each run is a fresh process (both engines take
most of the GPU memory), alternating the two engines; each process warms up on prompts of the same
kind (another seed, 32 tokens each), then times the whole workload once.

    python benchmarks/nanovllm_side_by_side.py --nanovllm-path ../nano-vllm [--rounds 2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(ROOT, "benchmarks", "fa2_api_on_fa4")


def run_one(engine: str, model_dir: str, attention_backend: str) -> float:
    """Inside a child process: warm up, then time the workload; returns seconds."""
    sys.path.insert(0, ROOT)
    from benchmarks.throughput import workload
    prompts, max_tokens = workload(256)
    # Warm-up on other prompts of the same kind, so that neither prefix cache holds the timed ones.
    warm_prompts, warm_tokens = workload(256, seed=1)
    warm_tokens = [min(n, 32) for n in warm_tokens]
    if engine == "nanovllm":
        from nanovllm import LLM, SamplingParams
        llm = LLM(model_dir, enforce_eager=False, max_model_len=4096)
    else:
        from otvllm import LLM, SamplingParams
        llm = LLM(model_dir, max_model_len=4096, max_num_seqs=512, attention_backend=attention_backend,
                  trace_level="off")

    def generate(prompts, max_tokens):
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in max_tokens]
        return llm.generate(prompts, params, use_tqdm=False)

    import torch
    generate(warm_prompts, warm_tokens)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = generate(prompts, max_tokens)
    seconds = time.perf_counter() - start
    produced = sum(len(o["token_ids"] if isinstance(o, dict) else o.token_ids) for o in outputs)
    assert produced == sum(max_tokens), (produced, sum(max_tokens))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanovllm-path", help="a nano-vllm checkout (the directory holding nanovllm/)")
    parser.add_argument("--model-dir", default="/tmp/otvllm-bench-qwen3-0.6b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--attention-backend", default="auto", help="otvllm's (auto: FA4 where installed)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"seconds": run_one(args.child[0], args.child[1], args.attention_backend)}))
        return
    if not args.nanovllm_path or not os.path.isdir(os.path.join(args.nanovllm_path, "nanovllm")):
        parser.error("--nanovllm-path must name a nano-vllm checkout (a directory holding nanovllm/)")

    sys.path.insert(0, ROOT)
    from benchmarks.throughput import make_model, workload
    from otvllm.synthetic import byte_level_tokenizer
    model_dir = make_model(args.model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)   # nano-vllm loads a tokenizer with the model
    total = sum(workload(256)[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SHIM, os.path.abspath(args.nanovllm_path), ROOT,
                                                       os.environ.get("PYTHONPATH", "")]))
    seconds: dict[str, list[float]] = {"nanovllm": [], "otvllm": []}
    for _ in range(args.rounds):
        for engine in ("nanovllm", "otvllm"):
            out = subprocess.run([sys.executable, __file__, "--attention-backend", args.attention_backend,
                                  "--child", engine, model_dir], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{engine} run failed:\n{out.stderr[-3000:]}")
            seconds[engine].append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
            print(f"{engine:9s} {total / seconds[engine][-1]:9.0f} tok/s ({seconds[engine][-1]:.2f} s)", flush=True)
    tok_s = {e: total / statistics.median(s) for e, s in seconds.items()}
    print(f"medians: nano-vllm {tok_s['nanovllm']:.0f} tok/s, otvllm {tok_s['otvllm']:.0f} tok/s: "
          f"otvllm/nano-vllm = {tok_s['otvllm'] / tok_s['nanovllm']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs_s": seconds, "tok_per_s": tok_s, "output_tokens": total}, f, indent=2)


if __name__ == "__main__":
    main()
