"""The inputs of the sampler's logit biases for one step, from the sequences: each request's
logit_bias, and min_tokens' ban on the tokens that would end an output still short of it."""

import torch

from otvllm.core.sequence import Sequence
from otvllm.layers.sampler import LogitBias


class BiasInputs:
    def __init__(self, eos_token_ids: set[int], device: torch.device):
        self.eos_token_ids, self.device = sorted(eos_token_ids), device

    def __call__(self, seqs: list[Sequence]) -> LogitBias | None:
        """For the step's sampled sequences `seqs` (in row order); None when no row has a bias."""
        # First the rows with any, in one pass: it runs for every row of every step, biases or not.
        candidates = [(row, seq) for row, seq in enumerate(seqs) if (p := seq.params).logit_bias or p.min_tokens]
        if not candidates:
            return None
        rows, tokens, values = [], [], []
        num_rows = 0
        for row, seq in candidates:
            p = seq.params
            before = len(rows)
            if p.logit_bias:
                rows += [row] * len(p.logit_bias)
                tokens += p.logit_bias.keys()
                values += p.logit_bias.values()
            # len(seq) counts a token still in flight: this row samples the output's next one.
            if p.min_tokens and len(seq) - seq.num_prompt_tokens < p.min_tokens:
                ending = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                rows += [row] * len(ending)
                tokens += ending
                values += [float("-inf")] * len(ending)
            num_rows += len(rows) > before
        if not rows:
            return None
        pairs = torch.tensor([rows, tokens], dtype=torch.int64).to(self.device)
        return LogitBias(pairs, torch.tensor(values, dtype=torch.float32).to(self.device), num_rows)
