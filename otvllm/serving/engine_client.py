"""The HTTP front end's side of the engine process (engine_process.py): start it, hand it
requests and aborts, and deliver its news to the requests' queues on the event loop.

A reader thread receives the engine's messages; their trace records go to this process's
sink (the export process), their updates to the event loop in one call per message."""

import asyncio
import itertools
import multiprocessing
import os
import threading
import time

from otvllm.core.request_limits import RequestLimits
from otvllm.serving import engine_process
from otvllm.serving.engine_process import RequestSpec, Update

START_TIMEOUT_S = 3600.0   # loading a large model and capturing CUDA graphs takes a while
ABORT_WAIT_S = 5.0         # for an interrupted start-up's last records, before the engine is killed


class QueueFull(Exception):
    """More requests wait than the server's --max-queue allows."""


class EngineFailed(Exception):
    """The engine could not start, or stopped serving."""


class ServerRequest:
    """One sequence of one HTTP request, and where its updates go."""

    _rids = itertools.count()

    def __init__(self, token_ids: list[int], params, prompt, parent, stream: bool, updates: asyncio.Queue,
                 index: int, operation: str, response_id: str, n: int = 1):
        self.rid = next(ServerRequest._rids)
        self.index = index              # which choice of its HTTP request (its index in the answer)
        self.num_prompt_tokens = len(token_ids)
        self.arrival_ns = time.time_ns()
        self.first_token_ns = 0
        self.updates = updates          # (index, Update), on the event loop
        self.spec = RequestSpec(self.rid, token_ids, params, stream, parent, prompt, operation, response_id,
                                self.arrival_ns, (index, n))


async def next_updates(updates: asyncio.Queue) -> list[tuple[int, Update]]:
    """Wait for a request's next update, then take every one queued behind it, merged into one
    per choice: when the front end falls behind the engine's steps, a choice's tokens of several
    steps go out as one chunk, not one chunk each, and it catches up."""
    merged: dict[int, Update] = {}
    item = await updates.get()
    while True:
        index, update = item
        before = merged.get(index)
        if before is None:
            merged[index] = update
        elif before.finish_reason is None:   # nothing follows a choice's end
            merged[index] = Update(update.rid, before.token_ids + update.token_ids, update.finish_reason,
                                   before.logprobs + update.logprobs, before.first_token_ns or update.first_token_ns,
                                   before.prompt_logprobs or update.prompt_logprobs,
                                   before.prompt_ranks or update.prompt_ranks)
        if updates.empty():
            return list(merged.items())
        item = updates.get_nowait()


class EngineClient:
    def __init__(self, model: str, options: dict, max_queue: int, stream_interval_s: float,
                 run_rid: int | None, sink):
        """Start the engine process and wait until its engine is ready; EngineFailed (or
        ValueError, for bad settings) with its message when it cannot start. `sink`: where the
        engine's trace records go (None: tracing is off)."""
        self.max_queue = max_queue
        self.sink = sink
        context = multiprocessing.get_context("spawn")   # CUDA cannot live through a fork
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=engine_process.main, name="otvllm-engine",
            args=(child, model, options, run_rid, sink is not None, stream_interval_s))
        self._process.start()
        child.close()
        try:
            message = self._await_start()
        except BaseException:   # Ctrl-C while the model loads, or no answer: no engine left behind
            self._abort_start()
            raise
        if message[0] == "failed":
            _, kind, text, records = message
            self._trace(records)
            self._process.join(30)
            raise (ValueError if kind == "ValueError" else EngineFailed)(
                text if kind == "ValueError" else f"the engine failed to start: {kind}: {text}")
        _, limits, records = message
        self.limits: RequestLimits = limits
        self._trace(records)
        self.error: str | None = None
        self.stats: dict = {}
        self._requests: dict[int, ServerRequest] = {}
        self._lock = threading.Lock()
        self._submitted = 0
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader = threading.Thread(target=self._read, name="otvllm-engine-reader", daemon=True)

    def _await_start(self) -> tuple:
        """The engine's "ready" or "failed"; the start-up's records that come before go to the
        trace as they come."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            message = self._receive(deadline - time.monotonic(), "start")
            if message[0] != "records":
                return message
            self._trace(message[1])

    def _abort_start(self) -> None:
        """Interrupt the engine's start-up, so that its open spans end (in ERROR) and reach the
        trace with where it was; then make sure it is gone."""
        try:
            if self._process.is_alive():
                os.kill(self._process.pid, engine_process.ABORT_START)
                deadline = time.monotonic() + ABORT_WAIT_S
                while self._conn.poll(max(0.0, deadline - time.monotonic())):
                    message = self._conn.recv()
                    self._trace(message[-1])   # every message's records come last
                    if message[0] != "records":   # "failed" (or a "ready" sent just before)
                        break
        except (EOFError, OSError):
            pass
        finally:
            self._process.kill()
            self._process.join(5)

    def _receive(self, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not self._conn.poll(0.1):
            if not self._process.is_alive():
                raise EngineFailed(f"the engine process exited with {self._process.exitcode} during {what}")
            if time.monotonic() > deadline:
                raise EngineFailed(f"the engine process did not {what} within {timeout:.0f} s")
        try:
            return self._conn.recv()
        except (EOFError, OSError):   # it died: its end of the pipe closed
            self._process.join(5)
            raise EngineFailed(f"the engine process exited with {self._process.exitcode} during {what}") from None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver the engine's news to requests on `loop` from now on."""
        self._loop = loop
        self._reader.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Tell the engine to finish what runs and end; wait for it (killed past `timeout`)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._conn.send(("stop",))
        except OSError:
            pass
        if self._reader.ident is None:   # the server never started: take the last records here
            self._reader.start()
        self._reader.join(timeout)
        self._process.join(5 if not self._reader.is_alive() else 0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    @property
    def num_waiting(self) -> int:
        """Requests sent to the engine and not yet scheduled (as of its last message)."""
        return self._submitted - self.stats.get("admitted", 0) + self.stats.get("waiting", 0)

    def submit(self, requests: list[ServerRequest]) -> None:
        """Queue the sequences of one HTTP request; QueueFull past --max-queue waiting ones."""
        if self.error is not None:
            raise EngineFailed(f"the engine stopped: {self.error}")
        with self._lock:
            if self.num_waiting + len(requests) > self.max_queue:
                raise QueueFull(f"{self.num_waiting} requests are waiting, the server's limit is {self.max_queue}")
            self._submitted += len(requests)
            for request in requests:
                self._requests[request.rid] = request
            self._conn.send(("add", [r.spec for r in requests]))

    def abort(self, request: ServerRequest, reason: str = "abort") -> None:
        """End a request early (its client went away, or a stop string ended it)."""
        with self._lock:
            if self.error is None:
                self._conn.send(("abort", [(request.rid, reason)]))

    # ---- the reader thread ----------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._fail("the engine process ended unexpectedly")
                return
            if message[0] == "news":
                _, news, self.stats, records = message
                self._trace(records)
                if news and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._deliver, news)
            elif message[0] == "ended":
                _, kind, text, records = message
                self._trace(records)
                if kind is not None:
                    self._fail(f"{kind}: {text}")
                return

    def _trace(self, records: list) -> None:
        if self.sink is not None:
            for kind, payload in records:
                self.sink.send(kind, payload)

    def _fail(self, why: str) -> None:
        with self._lock:
            self.error = why
            news = [Update(rid, [], "error") for rid in list(self._requests)]
        if self._loop is not None and news:
            self._loop.call_soon_threadsafe(self._deliver, news)

    def _deliver(self, news: list[Update]) -> None:
        """On the event loop: hand each update to its request's queue."""
        requests = self._requests
        for update in news:
            request = requests.get(update.rid)
            if request is None:
                continue
            if update.first_token_ns:
                request.first_token_ns = update.first_token_ns
            if update.finish_reason is not None:
                del requests[update.rid]
            request.updates.put_nowait((request.index, update))
