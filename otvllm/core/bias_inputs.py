"""The inputs of the sampler's logit biases for one step, from the sequences: each request's
logit_bias, and min_tokens' ban on the tokens that would end an output still short of it."""

import numpy as np
import torch

from otvllm.core.sequence import Sequence
from otvllm.layers.sampler import LogitBias

CACHED_PARAMS = 4096   # the SamplingParams whose arrays are kept (each request has one; a batch often shares one)


class BiasInputs:
    """Builds a step's `LogitBias`. Each request's biases are made into arrays once: a request
    that bans 1,000 tokens, at 256 rows, cost ~100 ms a step when its dict was read again each
    step on this project's CPU machine (benchmarks/prepare_cost.py --cases biases)."""

    def __init__(self, eos_token_ids: set[int], device: torch.device):
        self.eos_token_ids, self.device = sorted(eos_token_ids), device
        # id(params) -> (params, its logit_bias, min_tokens' ban); holding the params keeps its id its own
        self._arrays: dict[int, tuple] = {}

    def __call__(self, seqs: list[Sequence]) -> LogitBias | None:
        """For the step's sampled sequences `seqs` (in row order); None when no row has a bias."""
        # First the rows with any, in one pass: it runs for every row of every step, biases or not.
        candidates = [(row, seq) for row, seq in enumerate(seqs) if (p := seq.params).logit_bias or p.min_tokens]
        if not candidates:
            return None
        rows, tokens, values = [], [], []
        for row, seq in candidates:
            p = seq.params
            _, bias, ban = self._arrays.get(id(p)) or self._cache(p)
            if bias is not None:
                rows.append(row)
                tokens.append(bias[0])
                values.append(bias[1])
            # num_tokens counts a token still in flight: this row samples the output's next one.
            if ban is not None and seq.num_tokens - seq.num_prompt_tokens < p.min_tokens:
                rows.append(row)
                tokens.append(ban[0])
                values.append(ban[1])
        if not rows:
            return None
        lengths = [len(t) for t in tokens]
        pairs = np.empty((2, sum(lengths)), np.int64)
        pairs[0] = np.repeat(rows, lengths)
        np.concatenate(tokens, out=pairs[1])
        return LogitBias(torch.from_numpy(pairs).to(self.device),
                         torch.from_numpy(np.concatenate(values)).to(self.device), len(set(rows)))

    def _cache(self, p) -> tuple:
        if len(self._arrays) >= CACHED_PARAMS:
            self._arrays.clear()
        entry = self._arrays[id(p)] = (p, *self._make(p))
        return entry

    def _make(self, p) -> tuple:
        """(`p`'s logit_bias, min_tokens' ban), each as (token ids, values) arrays, or None."""
        bias = ban = None
        if p.logit_bias:
            bias = (np.fromiter(p.logit_bias.keys(), np.int64, len(p.logit_bias)),
                    np.fromiter(p.logit_bias.values(), np.float32, len(p.logit_bias)))
        ending = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
        if p.min_tokens and ending:
            ban = (np.array(ending, np.int64), np.full(len(ending), -np.inf, np.float32))
        return bias, ban
