"""The inputs of the sampler's penalties for one step: which rows have any, and the tokens of
their prompts and outputs, from the sequences."""

import weakref

import numpy as np
import torch

from otvllm.core.sequence import Sequence
from otvllm.layers.sampler import Penalties


class PenaltyInputs:
    """Builds a step's `Penalties`. Each penalised sequence's known tokens are kept as a numpy
    array that grows as its tokens arrive, so a step converts only the new ones: reading every
    sequence's token list again each step cost ~19 ms a step at 256 sequences of ~1k tokens on
    this project's CPU machine, ~3 ms now (benchmarks/prepare_cost.py --cases penalties)."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self._known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # seq -> (buffer, tokens in it)

    def __call__(self, seqs: list[Sequence], previous_tokens: torch.Tensor | None) -> Penalties | None:
        """For the step's sampled sequences `seqs` (in row order); None when none has a penalty.
        A sequence's last token may still be on the device (sampled by the step in flight): it
        is read there, from `previous_tokens`, rather than waited for."""
        # Inline rather than a property of SamplingParams: this runs for every row of every step,
        # and the call cost more than the test (85 against 35 us at 256 rows on this CPU machine).
        rows = [i for i, s in enumerate(seqs)
                if (p := s.params).presence_penalty or p.frequency_penalty or p.repetition_penalty != 1]
        if not rows:
            return None
        chosen = [seqs[i] for i in rows]
        known = [self._tokens(s) for s in chosen]
        pending = [(p, s.pending_row) for p, s in enumerate(chosen) if s.pending_row >= 0]
        in_flight = None
        if pending:
            at, sources = torch.tensor(pending, dtype=torch.int64).to(self.device).T
            in_flight = torch.stack([at, previous_tokens[sources]])
        repeats = any(s.params.repetition_penalty != 1 for s in chosen)
        return Penalties(
            rows=torch.tensor(rows, dtype=torch.int64).to(self.device),
            presence=self._column([s.params.presence_penalty for s in chosen]),
            frequency=self._column([s.params.frequency_penalty for s in chosen]),
            repetition=self._column([s.params.repetition_penalty for s in chosen]) if repeats else None,
            outputs=self._pairs([k[s.num_prompt_tokens:] for s, k in zip(chosen, known)]),
            in_flight=in_flight,
            prompts=self._pairs([k[:s.num_prompt_tokens] for s, k in zip(chosen, known)]) if repeats else None)

    def _tokens(self, seq: Sequence) -> np.ndarray:
        """The sequence's tokens that are on the host: all but a last one still in flight."""
        n = seq.num_tokens - (seq.pending_row >= 0)
        buffer, have = self._known.get(seq, (None, 0))
        if buffer is None or have > n:   # new, or truncated
            buffer, have = np.empty(max(64, 2 * n), np.int32), 0
        elif len(buffer) < n:
            buffer = np.concatenate([buffer[:have], np.empty(2 * n - have, np.int32)])
        if have < n:
            buffer[have:n] = seq.token_ids[have:n]
        self._known[seq] = (buffer, n)
        return buffer[:n]

    def _pairs(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """(row, token id) of every token of `arrays`, row i's from arrays[i]: [2, N] int64. Only
        the token ids cross to the device (as int32); the rows are made there."""
        lengths = torch.from_numpy(np.fromiter(map(len, arrays), np.int64, len(arrays)))
        tokens = torch.from_numpy(np.concatenate(arrays)).to(self.device)
        rows = torch.repeat_interleave(torch.arange(len(arrays), device=self.device), lengths.to(self.device),
                                       output_size=len(tokens))
        return torch.stack([rows, tokens.long()])

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32)[:, None].to(self.device)
