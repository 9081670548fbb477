"""The HTTP API (FastAPI): OpenAI's /v1/completions and /v1/chat/completions, /v1/models,
/health, and vLLM's /tokenize and /detokenize. Requests are checked here, before they reach the
engine process; a bad one gets a 400 with the library's message and nothing else is disturbed."""

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from otvllm.serving.detokenize import TextStream
from otvllm.serving.engine_client import EngineClient, EngineFailed, QueueFull, ServerRequest, next_updates
from otvllm.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                     TokenizeRequest, message_text, new_id, now, usage)
from otvllm.tokenizer import tokenize
from otvllm.tracing import schema as S
from otvllm.tracing.recording.records import remote_parent_of


class Choice:
    """One completion of a prompt as it grows (a prompt has n of them)."""

    def __init__(self, request: ServerRequest, text: TextStream, prompt_index: int):
        self.request, self.text, self.prompt_index = request, text, prompt_index
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        # when asked for (prompt_logprobs, or echo with logprobs): with the first tokens
        self.prompt_logprobs: list | None = None
        self.prompt_ranks: list | None = None
        self.finish_reason: str | None = None


def build_app(engine: EngineClient, tokenizer, model_name: str, metrics=None) -> FastAPI:
    """`engine`: the started engine process; `tokenizer`: the model's (None when it has none);
    `metrics`: a ServerMetrics (served at /metrics, fed as requests end), or None."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            if metrics is not None:
                await asyncio.to_thread(metrics.shutdown)

    app = FastAPI(title="otvllm", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                     kind=kind).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return JSONResponse(APIError(400, message).body(), status_code=400)
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return JSONResponse(APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid')}",
                                     param=where or None).body(), status_code=400)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            raise APIError(503, f"the engine is not running: {engine.error}", kind="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            raise APIError(404, "metrics are off", kind="not_found")
        body, content_type = metrics.prometheus_text()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": now(),
                                            "owned_by": "otvllm", "max_model_len": engine.limits.max_model_len}]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{model_name}`).",
                           param="model", code="model_not_found")

    def make_choices(prompts: list, choice_params: list, stream: bool, stops: list[str], response_id: str,
                     operation: str = S.OPERATION_TEXT_COMPLETION,
                     traced_prompt=None) -> tuple[list[Choice], asyncio.Queue]:
        """`choice_params`: the SamplingParams of each choice of a prompt (n of them); choice j of
        prompt i has index i * n + j, as OpenAI's API numbers them. `traced_prompt`: the prompt as
        the trace shows it (opt-in), when not `prompts` (chat messages)."""
        sequences = len(prompts) * len(choice_params)
        if sequences > engine.max_queue:   # it could never be queued: not a "retry later"
            raise APIError(400, f"this request asks for {sequences} sequences ({len(prompts)} prompts x n="
                                f"{len(choice_params)}), more than the server queues (--max-queue {engine.max_queue})",
                           param="n" if len(choice_params) > 1 else "prompt")
        updates: asyncio.Queue = asyncio.Queue()
        parent = remote_parent_of()   # the HTTP server span, when the server is traced
        choices = []
        for i, prompt in enumerate(prompts):
            try:
                token_ids = tokenize(tokenizer, prompt)
                engine.limits.check(token_ids, choice_params[0])   # the choices differ in their seeds only
            except ValueError as e:
                where = f"prompt {i}: " if len(prompts) > 1 else ""
                raise APIError(400, f"{where}{e}", param="prompt") from None
            for j, params in enumerate(choice_params):
                request = ServerRequest(token_ids, params, prompt if traced_prompt is None else traced_prompt, parent,
                                        stream or bool(stops), updates, i * len(choice_params) + j, operation,
                                        response_id, len(choice_params))
                choices.append(Choice(request, TextStream(tokenizer, stops, params.min_tokens), i))
        try:
            engine.submit([c.request for c in choices])
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry later", kind="server_overloaded") from None
        except EngineFailed as e:
            raise APIError(503, str(e), kind="server_error") from None
        return choices, updates

    async def progress(choices: list[Choice], updates: asyncio.Queue):
        """Yields (choice, delta text, new token ids, their logprobs) until every choice ended."""
        remaining = len(choices)
        while remaining:
            for index, update in await next_updates(updates):
                choice = choices[index]
                if choice.finish_reason is not None:
                    continue
                if update.finish_reason == "error":
                    raise APIError(500, f"the engine failed: {engine.error}", kind="server_error")
                before = choice.text.num_tokens
                delta = choice.text.add(update.token_ids, final=update.finish_reason is not None)
                kept = choice.text.num_tokens - before   # tokens after a stop string are dropped
                ids, logprobs = update.token_ids[:kept], update.logprobs[:kept]
                choice.token_ids += ids
                choice.logprobs += logprobs
                choice.prompt_logprobs = choice.prompt_logprobs or update.prompt_logprobs
                choice.prompt_ranks = choice.prompt_ranks or update.prompt_ranks
                reason = update.finish_reason
                if choice.text.stopped:
                    if reason is None:
                        engine.abort(choice.request, "stop")
                    reason = "stop"
                if reason is not None:
                    choice.finish_reason = reason
                    remaining -= 1
                    if metrics is not None:
                        metrics.request_ended(choice.request, len(choice.token_ids), time.time_ns(), reason)
                yield choice, delta, ids, logprobs

    def abort_unfinished(choices: list[Choice]) -> None:
        for choice in choices:
            if choice.finish_reason is None:
                engine.abort(choice.request, "abort")

    async def run_to_end(request: Request, choices: list[Choice], updates: asyncio.Queue) -> None:
        async def consume():
            async for _ in progress(choices, updates):
                pass
        task = asyncio.ensure_future(consume())
        # The body has been read: the next ASGI message is the client's disconnect (no polling).
        disconnect = asyncio.ensure_future(request.receive())
        try:
            await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise asyncio.CancelledError()   # the client went away
        finally:
            for pending in (task, disconnect):
                if not pending.done():
                    pending.cancel()
            abort_unfinished(choices)

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def prompt_tokens(choices: list[Choice]) -> int:
        """Each prompt's once, however many choices it has (as OpenAI's usage counts them)."""
        return sum({c.prompt_index: c.request.num_prompt_tokens for c in choices}.values())

    def completion_tokens(choices: list[Choice]) -> int:
        return sum(len(c.token_ids) for c in choices)

    def chunker(kind: str, rid: str):
        """The response (or stream chunk) maker of one request: its id, time, model."""
        created = now()

        def chunk(choices_payload: list, usage_payload=None) -> dict:
            out = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": choices_payload}
            if usage_payload is not None:
                out["usage"] = usage_payload
            return out
        return chunk

    def streamed(choices: list[Choice], updates: asyncio.Queue, chunk, entry, stream_options,
                 opening: list | None = None) -> StreamingResponse:
        """Server-sent events: a chunk per choice and update (`entry` makes its choice payload),
        the usage last when asked for, then [DONE]. A client that goes away aborts its requests."""
        include_usage = stream_options is not None and stream_options.include_usage

        async def events():
            try:
                if opening:
                    yield sse(chunk(opening))
                async for choice, delta, ids, logprobs in progress(choices, updates):
                    if delta or ids or choice.finish_reason is not None:
                        yield sse(chunk([entry(choice, delta, ids, logprobs)]))
                if include_usage:
                    yield sse(chunk([], usage(prompt_tokens(choices), completion_tokens(choices))))
                yield "data: [DONE]\n\n"
            finally:
                abort_unfinished(choices)

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- /v1/completions ------------------------------------------------------------------------

    def token_text(t: int) -> str:
        """A token's text, or its id as text for a model without a tokenizer."""
        return tokenizer.decode([t]) if tokenizer is not None else str(t)

    def completion_logprobs(ids: list[int], logprobs: list, n: int, offset: int) -> dict:
        """The legacy API's logprobs block; an entry of None (a prompt's first token) has none."""
        tokens = [token_text(t) for t in ids]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens,
                "token_logprobs": [entry.get(t) if entry is not None else None for t, entry in zip(ids, logprobs)],
                "top_logprobs": [{token_text(k): v for k, v in list(entry.items())[:n]} if entry is not None else None
                                 for entry in logprobs],
                "text_offset": offsets}

    def vllm_prompt_logprobs(choice: Choice, n: int) -> list:
        """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: {logprob,
        rank, decoded_token}} for its n likeliest (ranks 1..n) and the token itself (its rank)."""
        def entry(token: int, logprob: float, rank: int) -> dict:
            decoded = tokenizer.decode([token]) if tokenizer is not None else None
            return {"logprob": logprob, "rank": rank, "decoded_token": decoded}

        out = []
        for token, logprobs, rank in zip(choice.request.spec.token_ids, choice.prompt_logprobs or [],
                                         choice.prompt_ranks or []):
            if logprobs is None:
                out.append(None)
                continue
            top = {str(t): entry(t, v, i + 1) for i, (t, v) in enumerate(list(logprobs.items())[:n])}
            out.append(top | {str(token): entry(token, logprobs[token], rank)})
        return out

    def echoed(choice: Choice, prompt, text: str, ids: list[int], logprobs: list) -> tuple[str, list[int], list]:
        """With `echo`: (text, token ids, log-probabilities) of the completion, or of a part of it,
        after the prompt's own (its log-probabilities when asked)."""
        prompt_ids = choice.request.spec.token_ids
        prompt_text = prompt if isinstance(prompt, str) else (tokenizer.decode(prompt_ids) if tokenizer else "")
        return (prompt_text + text, prompt_ids + ids,
                (choice.prompt_logprobs or [None] * len(prompt_ids)) + logprobs)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        params = body.choice_params(body.max_tokens, body.logprobs, body.logprobs if body.echo else None)
        stops = body.stop_strings()
        rid = new_id("cmpl")
        choices, updates = make_choices(prompts, params, body.stream, stops, rid)
        chunk = chunker("text_completion", rid)
        n = body.logprobs or 0
        if body.stream:
            offsets = [0] * len(choices)
            opened = set()   # the choices that had a chunk

            def entry(choice: Choice, delta: str, ids: list[int], logprobs: list) -> dict:
                i = choice.request.index
                first = i not in opened
                opened.add(i)
                if body.echo and first:   # the prompt, before the first tokens
                    delta, ids, logprobs = echoed(choice, prompts[choice.prompt_index], delta, ids, logprobs)
                out = {"index": i, "text": delta, "logprobs": None, "finish_reason": choice.finish_reason}
                if body.logprobs is not None:
                    out["logprobs"] = completion_logprobs(ids, logprobs, n, offsets[i])
                if body.prompt_logprobs is not None and first:
                    out["prompt_logprobs"] = vllm_prompt_logprobs(choice, body.prompt_logprobs)
                offsets[i] += len(delta)
                return out

            return streamed(choices, updates, chunk, entry, body.stream_options)

        await run_to_end(request, choices, updates)
        payload = []
        for choice in choices:
            text, ids, logprobs = choice.text.text, choice.token_ids, choice.logprobs
            if body.echo:
                text, ids, logprobs = echoed(choice, prompts[choice.prompt_index], text, ids, logprobs)
            entry = {"index": choice.request.index, "text": text, "logprobs": None,
                     "finish_reason": choice.finish_reason}
            if body.logprobs is not None:
                entry["logprobs"] = completion_logprobs(ids, logprobs, n, 0)
            if body.prompt_logprobs is not None:
                entry["prompt_logprobs"] = vllm_prompt_logprobs(choice, body.prompt_logprobs)
            payload.append(entry)
        return chunk(payload, usage(prompt_tokens(choices), completion_tokens(choices)))

    # ---- /v1/chat/completions -------------------------------------------------------------------

    def chat_logprobs(ids: list[int], logprobs: list, n: int) -> dict:
        def token(t: int) -> dict:
            text = tokenizer.decode([t])
            return {"token": text, "bytes": list(text.encode())}
        content = []
        for t, entry in zip(ids, logprobs):
            item = token(t) | {"logprob": entry.get(t)}
            item["top_logprobs"] = [token(k) | {"logprob": v} for k, v in list(entry.items())[:n]]
            content.append(item)
        return {"content": content}

    def chat_prompt(chat_messages: list, add_generation_prompt: bool = True) -> tuple[list[dict], list[int]]:
        """The messages as the chat template takes them, and the prompt's token ids they render to."""
        if not chat_messages:
            raise APIError(400, "messages is empty: a chat completion needs at least one message", param="messages")
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "the model's tokenizer has no chat template, so chat messages cannot be turned "
                                "into a prompt: use /v1/completions with a prompt", param="messages")
        messages = [{"role": m.role, "content": message_text(m)} for m in chat_messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:   # the template's own error (e.g. an unsupported role)
            raise APIError(400, f"the chat template could not render these messages: {e}", param="messages") from None
        return messages, tokenizer.encode(text, add_special_tokens=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        messages, ids = chat_prompt(body.messages)
        n = body.top_logprobs or 0
        params = body.choice_params(body.max_completion_tokens or body.max_tokens, n if body.logprobs else None)
        rid = new_id("chatcmpl")
        choices, updates = make_choices([ids], params, body.stream, body.stop_strings(), rid, S.OPERATION_CHAT,
                                        messages)
        if body.stream:
            def entry(choice: Choice, delta: str, ids: list[int], logprobs: list) -> dict:
                return {"index": choice.request.index, "delta": {"content": delta} if delta else {},
                        "logprobs": chat_logprobs(ids, logprobs, n) if body.logprobs else None,
                        "finish_reason": choice.finish_reason}

            opening = [{"index": c.request.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None} for c in choices]
            return streamed(choices, updates, chunker("chat.completion.chunk", rid), entry,
                            body.stream_options, opening)

        await run_to_end(request, choices, updates)
        response = chunker("chat.completion", rid)(
            [{"index": c.request.index, "message": {"role": "assistant", "content": c.text.text},
              "logprobs": chat_logprobs(c.token_ids, c.logprobs, n) if body.logprobs else None,
              "finish_reason": c.finish_reason} for c in choices],
            usage(prompt_tokens(choices), completion_tokens(choices)))
        if body.prompt_logprobs is not None:   # one prompt: at the response's level, as vLLM has it
            response["prompt_logprobs"] = vllm_prompt_logprobs(choices[0], body.prompt_logprobs)
        return response

    # ---- /tokenize and /detokenize (vLLM's): what the engine would see of a prompt, and back ------

    @app.post("/tokenize")
    async def tokenize_prompt(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either a prompt or messages", param="prompt")
        if body.messages is not None:
            ids = chat_prompt(body.messages, body.add_generation_prompt)[1]
        elif tokenizer is None:
            raise APIError(400, "the model directory has no tokenizer", param="prompt")
        else:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": engine.limits.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        try:
            engine.limits.check_token_ids(body.tokens, "a")   # "a token id ... is outside the vocabulary"
        except ValueError as e:
            raise APIError(400, str(e), param="tokens") from None
        if tokenizer is None:
            raise APIError(400, "the model directory has no tokenizer", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    return app
