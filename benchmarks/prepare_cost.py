"""The host time of `ModelRunner.prepare` alone: turning one scheduled batch into the step's
input tensors (token ids, positions, slot mapping, block tables, cu_seqlens, context lengths,
sampling settings), without the model.

Cases, each at each block size:
  prefill  32 prompts x 512 tokens, nothing cached
  decode   256 sequences at ~1k tokens of context, their last tokens still on the device
  mixed    128 such decodes and 8 prompt chunks of 512 tokens, half after a cached prefix
  penalties  the decode case with presence, frequency and repetition penalties on every
           sequence: their prompt and output tokens are read each step (--cases penalties;
           not in the default set)
  biases   the decode case with a logit_bias of 1,000 tokens on every sequence, each still short
           of its min_tokens (--cases biases; not in the default set)

Prints µs per step, the best of --repeats rounds of --steps calls (the host is shared: the
best round is the one least disturbed). On CUDA the copies are queued, not waited for:
what is timed is what the engine thread pays.

    python benchmarks/prepare_cost.py [--device cpu] [--block-sizes 16,256] [--json out.json]
"""

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.arguments import positive_ints  # noqa: E402
from otvllm.config import EngineConfig  # noqa: E402
from otvllm.core.model_runner import ModelRunner  # noqa: E402
from otvllm.core.resolved_config import resolve_config  # noqa: E402
from otvllm.core.scheduler import ScheduledBatch  # noqa: E402
from otvllm.core.sequence import Sequence  # noqa: E402
from otvllm.models.spec import model_spec  # noqa: E402
from otvllm.sampling_params import SamplingParams  # noqa: E402
from otvllm.tracing.level import TraceLevel  # noqa: E402

MAX_MODEL_LEN = 4096
PARAMS = SamplingParams(temperature=0.0, max_tokens=1024, ignore_eos=True)
PENALISED = SamplingParams(temperature=0.0, max_tokens=1024, ignore_eos=True, presence_penalty=0.5,
                           frequency_penalty=0.5, repetition_penalty=1.2)
BIASED = SamplingParams(temperature=0.0, max_tokens=1024, min_tokens=1024, stop_token_ids=[13],
                        logit_bias={token: -100.0 for token in range(1000)})
CASES = ("prefill", "decode", "mixed", "penalties", "biases")


def make_runner(device: str, block_size: int) -> ModelRunner:
    """A model runner for Qwen3-0.6B's shapes; prepare needs no weights."""
    from transformers import Qwen3Config
    spec = model_spec("Qwen3ForCausalLM", Qwen3Config(vocab_size=151936, max_position_embeddings=MAX_MODEL_LEN))
    config = EngineConfig(model="(no weights)", device=device, kvcache_block_size=block_size,
                          max_model_len=MAX_MODEL_LEN)
    return ModelRunner(resolve_config(config, spec, TraceLevel.OFF, device), spec)


class Blocks:
    """Hands out distinct block ids in a shuffled order, as a cache in use would."""

    def __init__(self, count: int, rng: random.Random):
        self.ids = list(range(count))
        rng.shuffle(self.ids)
        self.next = 0

    def take(self, n: int) -> list[int]:
        self.next += n
        return self.ids[self.next - n:self.next]


def decoding_seq(context: int, row: int, block_size: int, blocks: Blocks, rng: random.Random,
                 params: SamplingParams = PARAMS) -> Sequence:
    """A sequence in steady decode: `context` tokens, half of them generated, the last one still
    to be sampled by row `row` of the step in flight."""
    tokens = [rng.randrange(151936) for _ in range(context - 1)]
    seq = Sequence(tokens[:context // 2], params, block_size)
    for token in tokens[context // 2:]:
        seq.append_token(token)
    seq.append_pending(row)
    seq.num_computed_tokens = context - 1
    seq.is_prefill = False
    seq.block_table = blocks.take(seq.num_blocks)
    return seq


def prompt_chunk(length: int, cached: int, block_size: int, blocks: Blocks, rng: random.Random) -> Sequence:
    """A prompt of `length` tokens whose first `cached` are already in the cache."""
    seq = Sequence([rng.randrange(151936) for _ in range(length)], PARAMS, block_size)
    seq.block_table = blocks.take(seq.num_blocks)
    seq.num_computed_tokens = seq.num_cached_tokens = cached
    return seq


def build_case(name: str, block_size: int, rng: random.Random) -> tuple[ScheduledBatch, torch.Tensor | None]:
    blocks = Blocks(1 << 16, rng)
    batch = ScheduledBatch([])
    num_decodes = {"prefill": 0, "decode": 256, "mixed": 128, "penalties": 256, "biases": 256}[name]
    params = {"penalties": PENALISED, "biases": BIASED}.get(name, PARAMS)
    for row in range(num_decodes):
        batch.add_decode(decoding_seq(rng.randint(896, 1152), row, block_size, blocks, rng, params))
    if name == "prefill":
        for _ in range(32):
            seq = prompt_chunk(512, 0, block_size, blocks, rng)
            batch.add_chunk(seq, 512)
    elif name == "mixed":
        for i in range(8):
            cached = 0 if i % 2 else block_size * (256 // block_size or 1)
            seq = prompt_chunk(cached + 512, cached, block_size, blocks, rng)
            batch.add_chunk(seq, 512)
    previous = torch.arange(num_decodes, dtype=torch.int64) if num_decodes else None
    return batch, previous


def time_prepare(runner: ModelRunner, batch: ScheduledBatch, previous, steps: int, repeats: int) -> float:
    """Best µs per call over `repeats` rounds of `steps` calls."""
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    runner.prepare(batch, previous)   # warm-up: first-call allocations, pinned pools
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            runner.prepare(batch, previous)
        best = min(best, (time.perf_counter() - start) / steps)
        sync()
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-sizes", type=positive_ints, default=[16, 256])
    parser.add_argument("--cases", default="prefill,decode,mixed")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be positive")

    results = []
    print(f"{'case':9} {'block':>5} {'seqs':>5} {'tokens':>7} {'us/step':>9}")
    for block_size in args.block_sizes:
        runner = make_runner(args.device, block_size)
        for name in cases:
            batch, previous = build_case(name, block_size, random.Random(0))
            if previous is not None:
                previous = previous.to(runner.device)
            us = time_prepare(runner, batch, previous, args.steps, args.repeats)
            row = {"case": name, "block_size": block_size, "seqs": len(batch.seqs),
                   "tokens": batch.num_batched_tokens, "us_per_step": round(us, 1)}
            results.append(row)
            print(f"{name:9} {block_size:5} {row['seqs']:5} {row['tokens']:7} {us:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
