"""What the server's streaming text costs its front end per chunk (serving/detokenize.TextStream):
a completion of N tokens fed one token a chunk, as `otvllm serve` streams every step, with the
synthetic model's byte-level tokenizer (one token a byte: the most tokens per character).

    python benchmarks/detokenize_cost.py [--lengths 128,512,1024] [--stop]
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.arguments import positive_ints  # noqa: E402
from otvllm.serving.detokenize import TextStream  # noqa: E402
from otvllm.synthetic import byte_level_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=positive_ints, default=[128, 512, 1024],
                        help="completion lengths in tokens (default 128,512,1024)")
    parser.add_argument("--stop", action="store_true", help="with a stop string that never appears")
    args = parser.parse_args()
    tokenizer = byte_level_tokenizer()
    rng = random.Random(0)
    words = ["the", "cat", "sat", "señor", "東京", "café", "🚀", "on", "a", "mat"]
    for n in args.lengths:
        text = ""
        while len(tokenizer.encode(text)) < n:
            text += rng.choice(words) + " "
        ids = tokenizer.encode(text)[:n]
        stream = TextStream(tokenizer, ["<never>"] if args.stop else [])
        start = time.perf_counter()
        deltas = [stream.add([token], final=i == n - 1) for i, token in enumerate(ids)]
        us = (time.perf_counter() - start) / n * 1e6
        if "".join(deltas) != tokenizer.decode(ids):   # what was timed must be the right text
            sys.exit(f"the streamed text of {n} tokens differs from their decode")
        print(f"{n:5d} tokens: {us:7.1f} us per chunk", flush=True)


if __name__ == "__main__":
    main()
