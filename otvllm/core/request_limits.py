"""What one request may ask of an engine, checked before it is queued: by the engine, and by
`otvllm serve`'s HTTP front end, which has no engine in its process (serving/engine_process.py)."""

from dataclasses import dataclass

from otvllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    max_logprobs: int

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming what is wrong with this request, if anything."""
        if not prompt_token_ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        self.check_token_ids(prompt_token_ids, "prompt")
        self.check_token_ids(params.logit_bias or (), "logit_bias")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and n > min(self.max_logprobs, self.vocab_size):
                raise ValueError(f"{name}={n} is more than the engine allows (max_logprobs={self.max_logprobs}, "
                                 f"vocabulary {self.vocab_size})")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens plus max_tokens={params.max_tokens} is "
                             f"{total} tokens, more than max_model_len={self.max_model_len}")

    def check_token_ids(self, token_ids, what: str) -> None:
        """ValueError naming the first of `token_ids` not in the vocabulary, as "{what} token id ..."."""
        bad = [t for t in token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"{what} token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
