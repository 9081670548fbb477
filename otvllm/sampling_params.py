import math
from dataclasses import dataclass


@dataclass
class SamplingParams:
    """How to pick each new token of one request (vLLM's names and meanings)."""

    temperature: float = 1.0   # 0 is greedy
    top_p: float = 1.0         # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = -1            # keep the k most likely tokens; -1 keeps all
    max_tokens: int = 64
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    seed: int | None = None    # makes this request's samples reproducible, whatever the batch
    logprobs: int | None = None  # return the top-N log-probabilities of each generated token
    # ... and of each prompt token after the first (its own and the N likeliest in its place, as
    # the model saw the tokens before it); such a prompt is computed whole, not from the prefix cache
    prompt_logprobs: int | None = None
    # Penalties on tokens already there, applied to the logits before temperature, top-k and
    # top-p (vLLM's and OpenAI's meanings): presence subtracts once per token the output holds,
    # frequency once per occurrence in the output; repetition divides a positive logit (multiplies
    # a negative one) of each token in the prompt or the output.
    presence_penalty: float = 0.0    # in [-2, 2]
    frequency_penalty: float = 0.0   # in [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 is none
    min_p: float = 0.0   # keep the tokens at least min_p times as likely as the likeliest (after temperature)
    # Until the output holds min_tokens tokens, EOS (unless ignored) and stop_token_ids cannot be
    # sampled, and the server's stop strings do not end it.
    min_tokens: int = 0
    # token id -> a bias in [-100, 100] added to its logit before the penalties and sampling (also
    # greedy); ids may be given as decimal strings, as JSON objects (OpenAI's API) have them.
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 keeps all), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 is none), got {self.repetition_penalty}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is more than max_tokens={self.max_tokens}")
        self.logit_bias = _logit_bias(self.logit_bias)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        stop = self.stop_token_ids
        if stop is not None and (isinstance(stop, (str, bytes)) or not hasattr(stop, "__iter__")):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {stop!r}")
        self.stop_token_ids = list(stop or [])
        bad = [t for t in self.stop_token_ids if isinstance(t, bool) or not isinstance(t, int) or t < 0]
        if bad:
            raise ValueError(f"stop_token_ids must hold token ids (integers >= 0), got {bad[0]!r}")


def _logit_bias(bias) -> dict[int, float] | None:
    """`bias` as {token id: float}, None when empty; ValueError naming a bad entry."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must map token ids to biases, got {bias!r}")
    out = {}
    for key, value in bias.items():
        token = key
        if isinstance(key, str) and key.isascii() and key.isdigit():
            token = int(key)
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {token}")
        out[token] = float(value)
    return out or None
