"""The engine of `otvllm serve`, in a process of its own (started by engine_client.py), so that
the HTTP front end (event loop, JSON, server-sent events) and the engine loop each have a GIL.

The loop adds arriving requests to the engine between steps, so they join the running batch
(continuous batching across HTTP requests), runs steps while there is work, and after each
step sends one message with the step's news (new tokens, finished requests), the engine's
gauges and the trace records made since the last message. Only this process touches the
engine. Ctrl-C and SIGTERM are the front end's to handle: it drains, then says "stop".

Messages from the front end: ("add", [RequestSpec]), ("abort", [(rid, reason)]), ("stop",).
To it: ("records", records) while the engine starts, then ("ready", RequestLimits, records) or
("failed", error type, message, records); then ("news", [Update], stats, records) and, once,
("ended", error type or None, message, records). While the engine starts, the front end's
ABORT_START signal interrupts it (KeyboardInterrupt): its start-up spans end and go with "failed".
"""

import signal
import time
from dataclasses import dataclass, field

from otvllm.core.sequence import PENDING_TOKEN
from otvllm.sampling_params import SamplingParams

ABORT_START = signal.SIGUSR1   # from the front end, interrupted while this process starts
IDLE_WAIT_S = 0.5
STATS_INTERVAL_S = 0.1    # a message with nothing but the gauges goes at most this often
RECORDS_LIMIT = 100_000   # trace records held between messages; more are dropped and counted


@dataclass
class RequestSpec:
    """One sequence of one HTTP request, as the front end hands it over."""

    rid: int                         # the front end's id of this sequence
    token_ids: list[int]
    params: SamplingParams
    stream: bool                     # send tokens as they come (else only at the end)
    parent: tuple | None             # the HTTP server span it continues (a RemoteParent), or None
    prompt: object                   # as the trace shows it (opt-in): text, token ids or chat messages
    operation: str                   # text_completion | chat
    response_id: str                 # the HTTP response's id
    arrival_ns: int
    choice: tuple[int, int] = (0, 1)   # (its index among the response's choices, choices per prompt: n)


@dataclass
class Update:
    """What a step brought one request: its new tokens, and its end."""

    rid: int
    token_ids: list[int]
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error" once finished
    logprobs: list[dict[int, float]] = field(default_factory=list)
    first_token_ns: int = 0
    prompt_logprobs: list | None = None   # with the first tokens, when the request asked for them
    prompt_ranks: list | None = None


class PipeSink:
    """The engine process's trace sink: records wait here and leave with the next message; the
    front end hands them to its export process. While the engine starts (`live`), each leaves
    at once in a message of its own, so that a start-up that crashes or hangs still shows how
    far it got (start-up makes a few dozen)."""

    active = True

    def __init__(self, conn):
        self.conn = conn
        self.live = True
        self.records: list = []
        self.dropped = 0

    def send(self, kind: str, payload) -> bool:
        if len(self.records) >= RECORDS_LIMIT:
            self.dropped += 1
            return False
        self.records.append((kind, payload))
        if self.live:
            try:
                self.conn.send(("records", self.take()))
            except OSError:   # the front end is gone; start-up will find out
                self.live = False
        return True

    def pump(self) -> None:
        pass

    def drain(self) -> None:
        pass

    @property
    def pending(self) -> bool:
        return bool(self.records)

    def take(self) -> list:
        records, self.records = self.records, []
        return records


class _NoRecords:
    pending = False
    live = False

    def take(self) -> list:
        return []


class _Active:
    __slots__ = ("seq", "stream", "sent", "sent_ns")

    def __init__(self, seq, stream: bool):
        self.seq, self.stream = seq, stream
        self.sent = 0          # completion tokens handed over so far
        self.sent_ns = 0       # when tokens were last handed over


def main(conn, model: str, options: dict, run_rid: int | None, traced: bool, stream_interval_s: float) -> None:
    """The engine process: build the engine, say it is ready (or why not), serve until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the whole process group:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the front end drains, then says stop
    from otvllm import LLM
    from otvllm.tracing.recording.records import restart_rids
    from otvllm.tracing.recording.sinks import set_sink
    from otvllm.tracing.recording.tracer import joined_run

    records = _NoRecords()
    if traced:
        restart_rids()
        records = PipeSink(conn)
        set_sink(records)
    with joined_run(run_rid):
        try:   # (before this, ABORT_START's default ends the process: it has nothing to tell yet)
            signal.signal(ABORT_START, _interrupt_start)
            llm = LLM(model, **options)
            signal.signal(ABORT_START, signal.SIG_IGN)
        except BaseException as e:   # KeyboardInterrupt too: the front end's ABORT_START
            conn.send(("failed", type(e).__name__, str(e), records.take()))
            return
        finally:
            records.live = False
    conn.send(("ready", llm.engine.limits, records.take()))
    _Loop(llm.engine, conn, records, stream_interval_s).run()


def _interrupt_start(signum, frame) -> None:
    raise KeyboardInterrupt("start-up interrupted by the front end")


class _Loop:
    def __init__(self, engine, conn, records, stream_interval_s: float):
        self.engine, self.conn, self.records = engine, conn, records
        # A streaming request gets its first token at once, later ones at most this often:
        # fewer, larger chunks cost the front end less.
        self.stream_interval_ns = int(stream_interval_s * 1e9)
        self.active: dict[int, _Active] = {}   # by the front end's rid
        self.news: list[Update] = []
        self.admitted = 0
        self.stopping = False
        self.sent_at = 0.0

    def run(self) -> None:
        engine = self.engine
        failure = None
        try:
            with engine.tracer.serve():
                while self._receive(wait=engine.is_finished()):
                    if engine.is_finished():
                        if self.stopping:
                            break
                        continue
                    self._publish(engine.step())
        except BaseException as e:   # the engine failed: every open request fails with it
            failure = e
        self.news += [Update(rid, [], "error") for rid in self.active]
        self.sent_at = 0.0
        try:
            self._send()
            self.conn.send(("ended", type(failure).__name__ if failure else None, str(failure or ""),
                            self.records.take()))
        except OSError:   # the front end is gone: nobody to tell
            pass

    def _receive(self, wait: bool) -> bool:
        """Take what the front end sent; with `wait`, wait a while for it. False once the loop
        should end now (the front end is gone)."""
        timeout = IDLE_WAIT_S if wait and not self.stopping else 0
        try:
            while self.conn.poll(timeout):
                timeout = 0
                message = self.conn.recv()
                if message[0] == "add":
                    self._add(message[1])
                elif message[0] == "abort":
                    self._abort(message[1])
                elif message[0] == "stop":
                    self.stopping = True
        except (EOFError, OSError):
            return False
        self._send()
        return True

    def _add(self, specs: list[RequestSpec]) -> None:
        engine = self.engine
        for spec in specs:
            seq = engine.make_sequence(spec.token_ids, spec.params)   # checked by the front end already
            seq.arrival_ns = spec.arrival_ns
            self.active[spec.rid] = _Active(seq, spec.stream)
            engine.tracer.request_arrived(seq, spec.prompt, spec.parent, spec.operation, spec.response_id, spec.choice)
            engine.add(seq)
        self.admitted += len(specs)

    def _abort(self, aborts: list[tuple[int, str]]) -> None:
        engine = self.engine
        for rid, reason in aborts:
            active = self.active.pop(rid, None)
            if active is None:
                continue
            seq = active.seq
            engine.abort_request(seq)
            seq.finish_reason = reason
            seq.finished_ns = time.time_ns()
            engine.tracer.request_ended(seq, reason)
            self.news.append(Update(rid, [], reason))

    def _publish(self, finished) -> None:
        done = {f.seq.seq_id: f.reason for f in finished}
        due = time.monotonic_ns() - self.stream_interval_ns
        for rid, active in list(self.active.items()):
            reason = done.get(active.seq.seq_id)
            if reason is not None:
                del self.active[rid]
                self.news.append(self._update(rid, active, reason))
            elif active.stream and (active.sent == 0 or active.sent_ns <= due):
                update = self._update(rid, active, None)
                if update.token_ids:
                    active.sent_ns = time.monotonic_ns()
                    self.news.append(update)
        self._send()

    @staticmethod
    def _update(rid: int, active: _Active, reason: str | None) -> Update:
        seq = active.seq
        end = seq.num_tokens
        if reason is None:   # tokens still on their way from the device are not news yet
            while end > seq.num_prompt_tokens and seq.token_ids[end - 1] == PENDING_TOKEN:
                end -= 1
        start = seq.num_prompt_tokens + active.sent
        ids = seq.token_ids[start:end]
        logprobs = seq.logprobs[active.sent:active.sent + len(ids)] if seq.params.logprobs is not None else []
        first_token_ns = seq.first_token_ns if active.sent == 0 else 0
        first = active.sent == 0 and ids   # the prompt's logprobs are complete once it sampled
        active.sent += len(ids)
        return Update(rid, ids, reason, logprobs, first_token_ns, seq.prompt_logprobs if first else None,
                      seq.prompt_ranks if first else None)

    def _send(self) -> None:
        """The news, the gauges and the trace records so far, in one message (the gauges alone
        at most every STATS_INTERVAL_S)."""
        now = time.monotonic()
        if not self.news and not self.records.pending and now - self.sent_at < STATS_INTERVAL_S:
            return
        news, self.news, self.sent_at = self.news, [], now
        self.conn.send(("news", news, self._stats(), self.records.take()))

    def _stats(self) -> dict:
        engine = self.engine
        scheduler, manager = engine.scheduler, engine.block_manager
        return {"admitted": self.admitted, "running": len(scheduler.running), "waiting": len(scheduler.waiting),
                "kv_usage": 1 - manager.num_free_blocks / manager.num_blocks,
                "prefix_hit_rate": manager.num_prompt_tokens_cached / manager.num_prompt_tokens_queried
                if manager.num_prompt_tokens_queried else 0.0,
                "preemptions": scheduler.num_preemptions, "steps": engine.step_index}
