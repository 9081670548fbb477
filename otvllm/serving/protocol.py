"""The OpenAI API's request bodies (what otvllm honours of them) and response pieces."""

import dataclasses
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field

from otvllm.sampling_params import SamplingParams


class APIError(Exception):
    """An OpenAI-style error answer: status code, message, type, the parameter at fault."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Fields of the OpenAI API, and vLLM's extensions, that change what is generated and that
# otvllm does not implement, with the values that leave the output as it is. A request that
# sets one to anything else gets a 400 naming it, never an answer that silently ignores it.
# Fields that change nothing generated (user, metadata, store, ...) are accepted and ignored.
UNSUPPORTED = {
    "best_of": (None, 1), "suffix": (None, ""),
    "use_beam_search": (None, False), "response_format": (None, {"type": "text"}), "tools": (None, []),
    "functions": (None, []), "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]), "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,), "structured_outputs": (None,),
}


MAX_N = 128   # choices per prompt, as OpenAI's API allows

# _Sampling's fields that take SamplingParams' default when a request leaves them out
_DEFAULTED = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
              "stop_token_ids", "repetition_penalty", "min_p", "min_tokens")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")   # checked against UNSUPPORTED in sampling_params

    model: str
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # _DEFAULTED: absent or null, SamplingParams' own default applies (OpenAI's, where it has one)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None   # token ids as JSON has them: strings
    stop_token_ids: list[int] | None = None   # this and the next three: vLLM's extensions
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    prompt_logprobs: int | None = None   # the prompt tokens' logprobs, in vLLM's format
    # otvllm's (and vLLM's) extensions
    top_k: int = -1
    ignore_eos: bool = False

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def choice_params(self, max_tokens: int | None, logprobs: int | None,
                      echo_logprobs: int | None = None) -> list[SamplingParams]:
        """The SamplingParams of each of the n choices of a prompt (`echo_logprobs`: the prompt
        logprobs that echo shows). With a seed, choice j samples with seed + j, as vLLM's parallel
        sampling: the same seed n times would give n equal choices."""
        for name, value in (self.model_extra or {}).items():
            neutral = UNSUPPORTED.get(name, ()) + ((self.n,) if name == "best_of" else ())   # best of n: all n
            if name in UNSUPPORTED and value not in neutral:
                raise APIError(400, f"{name}={value!r} is not supported by otvllm (it would change the output, "
                                    f"and otvllm does not implement it); leave it out", param=name)
        if not 1 <= self.n <= MAX_N:
            raise APIError(400, f"n must be in [1, {MAX_N}] (choices per prompt), got {self.n}", param="n")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        given = {name: getattr(self, name) for name in _DEFAULTED if getattr(self, name) is not None}
        prompt_logprobs = max((n for n in (self.prompt_logprobs, echo_logprobs) if n is not None), default=None)
        try:
            params = SamplingParams(top_k=self.top_k, max_tokens=16 if max_tokens is None else max_tokens,
                                    ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                    **given)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        if params.seed is None:
            return [params] * self.n
        return [dataclasses.replace(params, seed=params.seed + j) for j in range(self.n)]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model: str
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def message_text(message: ChatMessage) -> str:
    """A message's content as text (the text parts of a list of content parts)."""
    if isinstance(message.content, list):
        return "".join(part.get("text", "") for part in message.content if part.get("type") == "text")
    return message.content or ""
