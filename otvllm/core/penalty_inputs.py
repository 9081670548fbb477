"""The inputs of the sampler's penalties for one step: which rows have any, and the tokens of
their prompts and outputs, from the sequences."""

import numpy as np
import torch

from otvllm.core.sequence import PENDING_TOKEN, Sequence
from otvllm.layers.sampler import Penalties


def penalty_inputs(seqs: list[Sequence], previous_tokens: torch.Tensor | None, vocab_size: int,
                   device: torch.device) -> Penalties | None:
    """For the step's sampled sequences `seqs` (in row order); None when none has a penalty.
    A sequence's last token may still be on the device (sampled by the step in flight): it is
    read there, from `previous_tokens`, rather than waited for."""
    rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not rows:
        return None
    chosen = [seqs[i] for i in rows]
    outputs = [s.token_ids[s.num_prompt_tokens:s.num_tokens - (s.pending_row >= 0)] for s in chosen]
    assert all(PENDING_TOKEN not in out for out in outputs), "only a sequence's last token can be in flight"

    def padded(lists: list[list[int]]) -> torch.Tensor:
        table = np.full((len(lists), max(1, max(map(len, lists)))), vocab_size, dtype=np.int64)
        for r, ids in enumerate(lists):
            table[r, :len(ids)] = ids
        return torch.from_numpy(table).to(device)

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32)[:, None].to(device)

    pending = [s.pending_row for s in chosen]
    in_flight = None
    if max(pending) >= 0:
        sources = torch.tensor(pending, dtype=torch.int64).to(device)
        in_flight = torch.where(sources >= 0, previous_tokens[sources.clamp(min=0)], vocab_size)
    repeats = any(s.params.repetition_penalty != 1 for s in chosen)
    return Penalties(rows=torch.tensor(rows, dtype=torch.int64).to(device),
                     presence=column([s.params.presence_penalty for s in chosen]),
                     frequency=column([s.params.frequency_penalty for s in chosen]),
                     repetition=column([s.params.repetition_penalty for s in chosen]) if repeats else None,
                     output_ids=padded(outputs),
                     prompt_ids=padded([s.token_ids[:s.num_prompt_tokens] for s in chosen]) if repeats else None,
                     in_flight=in_flight)
