"""One engine loop on its own thread, fed by a request queue.

HTTP handlers (on the asyncio event loop) `submit` requests and may `abort` them; the loop
thread adds them to the engine between steps, so they join the running batch as they
arrive (continuous batching across HTTP requests), runs steps while there is work, and
hands each step's news (new tokens, finished requests) back to the event loop in one call.
Only this thread touches the engine."""

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from otvllm.core.sequence import PENDING_TOKEN, Sequence
from otvllm.tracing import schema as S

IDLE_WAIT_S = 0.5


class QueueFull(Exception):
    """More requests wait than the server's --max-queue allows."""


@dataclass
class Update:
    """What a step brought one request: its new tokens, and its end."""

    token_ids: list[int]
    finish_reason: str | None = None   # "stop" | "length" | "abort" once finished
    logprobs: list[dict[int, float]] = field(default_factory=list)


class ServerRequest:
    """One sequence of one HTTP request, and where its updates go."""

    def __init__(self, seq: Sequence, prompt, parent, stream: bool, updates: asyncio.Queue, index: int = 0,
                 operation: str = S.OPERATION_TEXT_COMPLETION, response_id: str | None = None):
        self.seq = seq
        self.index = index              # which prompt of its HTTP request (the choice's index)
        self.prompt = prompt            # as the trace shows it (opt-in): text, token ids or chat messages
        self.operation = operation      # text_completion | chat
        self.response_id = response_id  # the HTTP response's id
        self.parent = parent            # the HTTP server span it continues (a RemoteParent), or None
        self.stream = stream
        self.updates = updates          # (index, Update), on the event loop
        self.sent = 0                   # completion tokens handed over so far
        self.sent_ns = 0                # when tokens were last handed over


class EngineLoop:
    def __init__(self, llm, max_queue: int, loop: asyncio.AbstractEventLoop, stream_interval_s: float = 0.0):
        self.engine = llm.engine
        self.max_queue = max_queue
        # A streaming request gets its first token at once, later ones at most this often:
        # fewer, larger chunks cost the event loop (and so the engine, through the GIL) less.
        self.stream_interval_ns = int(stream_interval_s * 1e9)
        self.loop = loop
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0               # submitted, not yet handed to the engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._active: dict[int, ServerRequest] = {}
        self._thread = threading.Thread(target=self._run, name="otvllm-engine-loop", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what runs (requests already in the engine), then end the loop."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        """Requests submitted and not yet scheduled."""
        return self._pending + len(self.engine.scheduler.waiting)

    def submit(self, requests: list[ServerRequest]) -> None:
        """Queue the sequences of one HTTP request; QueueFull past --max-queue waiting ones."""
        if self.error is not None:
            raise RuntimeError(f"the engine loop stopped: {self.error!r}")
        with self._lock:
            if self.num_waiting + len(requests) > self.max_queue:
                raise QueueFull(f"{self.num_waiting} requests are waiting, the server's limit is {self.max_queue}")
            self._pending += len(requests)
        for request in requests:
            self._incoming.put(request)
        self._wake.set()

    def abort(self, request: ServerRequest, reason: str = "abort") -> None:
        """End a request early (its client went away, or a stop string ended it)."""
        self._aborts.put((request, reason))
        self._wake.set()

    # ---- the loop thread ------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            with engine.tracer.serve():
                while True:
                    self._admit()
                    if engine.is_finished():
                        if self._stop.is_set() and self._incoming.empty():
                            return
                        self._wake.wait(IDLE_WAIT_S)
                        self._wake.clear()
                        continue
                    finished = engine.step()
                    self._publish(finished)
        except BaseException as e:   # the engine failed: fail every request still open
            self.error = e
            updates = [(r, Update([], "error")) for r in self._active.values()]
            self._active.clear()
            self.loop.call_soon_threadsafe(_deliver, updates)
            raise

    def _admit(self) -> None:
        engine = self.engine
        while not self._incoming.empty():
            request = self._incoming.get()
            with self._lock:
                self._pending -= 1
            self._active[request.seq.seq_id] = request
            engine.tracer.request_arrived(request.seq, request.prompt, request.parent, request.operation,
                                          request.response_id)
            engine.add(request.seq)
        news = []
        while not self._aborts.empty():
            request, reason = self._aborts.get()
            if self._active.pop(request.seq.seq_id, None) is None:
                continue
            engine.abort_request(request.seq)
            request.seq.finish_reason = reason
            request.seq.finished_ns = time.time_ns()
            engine.tracer.request_ended(request.seq, reason)
            news.append((request, Update([], reason)))
        if news:
            self.loop.call_soon_threadsafe(_deliver, news)

    def _publish(self, finished) -> None:
        news = []
        for f in finished:
            request = self._active.pop(f.seq.seq_id, None)
            if request is not None:
                news.append((request, self._update(request, f.reason)))
        due = time.monotonic_ns() - self.stream_interval_ns
        for request in self._active.values():
            if request.stream and (request.sent == 0 or request.sent_ns <= due):
                update = self._update(request, None)
                if update.token_ids:
                    request.sent_ns = time.monotonic_ns()
                    news.append((request, update))
        if news:
            self.loop.call_soon_threadsafe(_deliver, news)

    @staticmethod
    def _update(request: ServerRequest, reason: str | None) -> Update:
        seq = request.seq
        end = seq.num_tokens
        if reason is None:   # tokens still on their way from the device are not news yet
            while end > seq.num_prompt_tokens and seq.token_ids[end - 1] == PENDING_TOKEN:
                end -= 1
        start = seq.num_prompt_tokens + request.sent
        ids = seq.token_ids[start:end]
        logprobs = seq.logprobs[request.sent:request.sent + len(ids)] if seq.params.logprobs is not None else []
        request.sent += len(ids)
        return Update(ids, reason, logprobs)


def _deliver(news: list) -> None:
    """On the event loop: hand each update to its request's queue."""
    for request, update in news:
        request.updates.put_nowait((request.index, update))
