"""The engine process's side of the export process (process.py).

`send` only appends to a bounded queue (finished spans past the bound are dropped and
counted); a writer thread wakes every WRITE_INTERVAL_S, pickles what is queued in one C call
and writes it to the child's stdin, a call that releases the GIL. Open and close messages
are pickled when sent, since their records change afterwards (the export process unpickles
those payloads again)."""

import os
import pickle
import queue
import subprocess
import sys
import threading
from collections import deque

from otvllm.tracing.export.process import FLUSH, SHUTDOWN
from otvllm.tracing.recording.records import SPANS

WRITE_INTERVAL_S = 0.05
QUEUE_LIMIT = 20_000          # messages (a step's spans are one message)
FILE_WRITE_TIMEOUT_S = 600.0  # writing the file never shares the network's timeout

_CHILD_CODE = "from otvllm.tracing.export.process import main; main()"


def _child_command() -> list[str]:
    # -P: no script directory or current directory at the front of sys.path (3.11+).
    return [sys.executable, "-P" if sys.version_info >= (3, 11) else "-I", "-c", _CHILD_CODE]


def _child_env() -> dict:
    """The parent's import path, absolute, without its current directory (unless otvllm itself
    lives there), with the directory otvllm was imported from first."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__import__("otvllm").__file__)))
    cwd = os.getcwd()
    paths = [root] + [os.path.abspath(p) for p in sys.path if p and os.path.abspath(p) not in (cwd, root)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.pop("PYTHONSTARTUP", None)
    return env


class ProcessSink:
    active = True

    def __init__(self, settings: dict):
        self.endpoint_label = settings.get("endpoint_label")
        self.trace_file = settings.get("trace_file")
        self.timeout_s = settings["timeout_s"]
        self.sent = 0        # spans handed to the export process
        self.dropped = 0     # spans dropped at the bound of the queue
        self.lost = 0        # spans that never reached the export process (it died)
        self._proc = subprocess.Popen(_child_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=_child_env(), cwd=os.path.abspath(os.sep), start_new_session=True)
        self._queue: deque = deque()
        self._wake = threading.Event()
        self._replies: queue.Queue = queue.Queue()
        self._closed = False
        self._write(pickle.dumps(settings))
        self._writer = threading.Thread(target=self._write_loop, name="otvllm-trace-writer", daemon=True)
        self._writer.start()
        threading.Thread(target=self._read_loop, name="otvllm-trace-reader", daemon=True).start()

    # ---- the engine thread --------------------------------------------------------------------

    def send(self, kind: str, payload) -> bool:
        if self._closed:
            return False
        if kind == SPANS:
            if len(self._queue) >= QUEUE_LIMIT:
                self.dropped += len(payload)
                return False
            self.sent += len(payload)
            self._queue.append((kind, payload))
        else:
            self._queue.append((kind, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)))
        return True

    def pump(self) -> None:
        pass

    def drain(self) -> None:
        self._wake.set()

    # ---- the writer and reader threads ------------------------------------------------------------

    def _write(self, data: bytes) -> bool:
        try:
            self._proc.stdin.write(data)
            self._proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(WRITE_INTERVAL_S)
            self._wake.clear()
            messages = []
            while self._queue:
                kind, payload = self._queue.popleft()
                messages.append((kind, payload))
            if messages and not self._write(pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)):
                self.lost += sum(len(p) for k, p in messages if k == SPANS)
            if any(kind == SHUTDOWN for kind, _ in messages):
                return

    def _read_loop(self) -> None:
        while True:
            try:
                self._replies.put(pickle.load(self._proc.stdout))
            except (EOFError, pickle.UnpicklingError, OSError, ValueError):
                self._replies.put(("exited", None))
                return

    @property
    def network_wait_s(self) -> float:
        """How long the parent waits for the export process's answer about the network."""
        return self.timeout_s + 2.0

    def _reply(self, timeout: float):
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            return ("timeout", None)

    # ---- the application's thread ---------------------------------------------------------------

    def flush(self) -> dict | None:
        """Wait (at most the export timeout) until the network exporter has sent what it got."""
        if self._closed or self._proc.poll() is not None:
            return None
        self._queue.append((FLUSH, None))
        self._wake.set()
        kind, result = self._reply(self.network_wait_s)
        return result if kind == "network" else None

    def close(self) -> dict:
        """Stop the export process; returns what happened to the trace file and the network export."""
        report = {"file": None, "network": None, "file_timeout": False}
        if self._closed:
            return report
        self._closed = True
        self._queue.append((SHUTDOWN, None))
        self._wake.set()
        self._writer.join(FILE_WRITE_TIMEOUT_S)
        for expected, wait_s in (("file", FILE_WRITE_TIMEOUT_S), ("network", self.network_wait_s)):
            kind, result = self._reply(wait_s)
            if kind != expected:   # it did not answer in time, or it exited
                report["file_timeout"] = kind == "timeout" and expected == "file"
                break
            report[kind] = result
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        if self._proc.poll() is None:
            try:
                self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return report
