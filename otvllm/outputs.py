from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """The result of one prompt of `LLM.generate`."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str              # "stop" (EOS or a stop token) or "length" (max_tokens or max_model_len)
    logprobs: list[dict[int, float]] | None = None  # per generated token: top-N ids and the chosen one
    prompt_logprobs: list[dict[int, float] | None] | None = None   # the same per prompt token (None first)
    prompt_token_ranks: list[int | None] | None = None   # with them: each prompt token's rank (1: the likeliest)
    num_cached_tokens: int = 0      # prompt tokens served from the prefix cache
    num_preemptions: int = 0
    metrics: dict = field(default_factory=dict)  # queue_time_ms, time_to_first_token_ms, e2e_ms
