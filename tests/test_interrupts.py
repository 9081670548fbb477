"""Interrupting `otvllm generate` for real (subprocesses and signals, no mocks): Ctrl-C and
SIGTERM to the process group, SIGKILL of the main process alone, and a run stopped mid-step.
Each trace file is checked as plain JSON, independently of the summary code (which is run
only where its output is what is tested)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from otvllm.tracing import schema as S

READY_TIMEOUT_S = 60.0   # process start, torch import, engine init
EXIT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of every CLI subprocess, with the synthetic model created once."""
    from otvllm.synthetic import synthetic_model_dir

    root = tmp_path_factory.mktemp("interrupts")
    cache = str(root / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTVLLM_CACHE_DIR", cache)
        synthetic_model_dir()
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OTVLLM_", "TRACEPARENT", "TRACESTATE"))}
    e.update(OTVLLM_CACHE_DIR=cache, HOME=str(root), PYTHONUNBUFFERED="1",
             # One thread: two OpenMP threads on 2 busy cores make a step 10-100x slower and noisy.
             OMP_NUM_THREADS="1")
    return e


class Cli:
    """`otvllm generate ...` in its own session (so signals to its group miss pytest), with
    stderr collected by a thread (tqdm writes `\\r`, not lines)."""

    def __init__(self, args, env, cwd):
        self.proc = subprocess.Popen([sys.executable, "-m", "otvllm.cli", "generate", *args], env=env, cwd=cwd,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self._err = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.export_pids: set[int] = set()

    def _read(self):
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            self._err += chunk

    @property
    def stderr(self) -> str:
        return self._err.decode(errors="replace")

    def wait_for(self, text: str, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            if self.proc.poll() is not None:
                pytest.fail(f"the CLI exited ({self.proc.returncode}) before printing {text!r}:\n{self.stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} on stderr after {timeout} s:\n{self.stderr}")
            time.sleep(0.02)

    def cpu_seconds(self) -> float:
        """CPU time the CLI process has used so far (all its threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def work_for(self, seconds: float, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the CLI has worked `seconds` of CPU time from now: progress that a busy
        machine slows down but cannot skip, as a wall-clock sleep would."""
        target, deadline = self.cpu_seconds() + seconds, time.monotonic() + timeout
        while self.cpu_seconds() < target:
            if self.proc.poll() is not None:
                pytest.fail(f"the CLI exited ({self.proc.returncode}) while it was expected to work:\n{self.stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"the CLI did not work {seconds} s of CPU in {timeout} s:\n{self.stderr}")
            time.sleep(0.05)

    def note_export_process(self) -> None:
        """Remember the export process (a child of the CLI) to clean it up whatever happens."""
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            try:
                with open(f"/proc/{self.proc.pid}/task/{tid}/children") as f:
                    self.export_pids.update(int(p) for p in f.read().split())
            except OSError:
                pass

    def finish(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def cleanup(self) -> None:
        for pid in [self.proc.pid, *self.export_pids]:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def cli(env, tmp_path):
    started = []

    def start(*args):
        c = Cli([str(a) for a in args], env, str(tmp_path))
        started.append(c)
        return c

    yield start
    for c in started:
        c.cleanup()


# ---- reading the trace file as plain JSON ---------------------------------------------------

def load_spans(path) -> list[dict]:
    doc = json.loads(open(path).read())
    assert isinstance(doc, dict) and isinstance(doc["data"], list) and doc["data"]
    spans = []
    for trace in doc["data"]:
        assert isinstance(trace["traceID"], str) and isinstance(trace["processes"], dict)
        for s in trace["spans"]:
            assert {"traceID", "spanID", "operationName", "startTime", "duration", "tags"} <= s.keys()
            assert s["processID"] in trace["processes"]
            s["attrs"] = {t["key"]: t["value"] for t in s["tags"]}
            spans.append(s)
    return spans


def named(spans, name) -> list[dict]:
    """Spans named `name`; for engine.step and engine.steps, whatever phase their names carry."""
    match = {S.STEP: S.is_step, S.STEPS: S.is_steps}.get(name, name.__eq__)
    return [s for s in spans if match(s["operationName"])]


def the(spans, name) -> dict:
    found = named(spans, name)
    assert len(found) == 1, f"{len(found)} {name} spans"
    return found[0]


def is_error(span) -> bool:
    return span["attrs"].get("otel.status_code") == "ERROR" and span["attrs"].get("error") is True


def finished(request) -> bool:
    return any(f["key"] == "event" and f["value"] == S.EVENT_FINISHED
               for log in request.get("logs") or [] for f in log["fields"])


def check_requests(spans, error_type, n):
    """Requests that finished before the interruption are fine; the others end in error."""
    requests = [s for s in spans if S.is_request(s["operationName"], s["attrs"])]
    assert len(requests) == n
    unfinished = [r for r in requests if not finished(r)]
    assert unfinished, "every request finished before the interruption: make the run longer"
    for r in requests:
        if r in unfinished:
            assert is_error(r) and r["attrs"][S.ERROR_TYPE] == error_type, r["attrs"]
        else:
            assert not is_error(r) and S.ERROR_TYPE not in r["attrs"], r["attrs"]


def check_timeline(spans, gen, steps, leave_out=None):
    """Every step 0..steps-1 is in exactly one detailed `engine.step` or one `engine.steps`
    range, and in index order these intervals follow each other with no hole longer than the
    longest step (but `leave_out`'s: a hole must not hide behind a step made slow on purpose)."""
    n = gen["attrs"][S.GEN_STEPS]
    assert gen["attrs"][S.STEPS_COUNT] == n
    covered = []   # (start_us, end_us, first_index, last_index)
    for i, s in steps.items():
        covered.append((s["startTime"], s["startTime"] + s["duration"], i, i))
    aggregates = named(spans, S.STEPS)
    for s in aggregates:
        first, last = s["attrs"][S.STEPS_FIRST_INDEX], s["attrs"][S.STEPS_LAST_INDEX]
        assert s["attrs"][S.STEPS_COUNT] == last - first + 1
        covered.append((s["startTime"], s["startTime"] + s["duration"], first, last))
    indices = [i for _, _, first, last in covered for i in range(first, last + 1)]
    assert sorted(indices) == list(range(n)), "steps missing or covered twice"
    assert len(indices) == n

    covered.sort(key=lambda c: c[2])
    longest_step_us = max([s["duration"] for i, s in steps.items() if i != leave_out]
                          + [s["attrs"][S.STEP_TIME_MAX_MS] * 1000 for s in aggregates])
    for (_, end, _, last), (start, _, first, _) in zip(covered, covered[1:]):
        assert first == last + 1
        assert start >= end - 1, f"steps {last} and {first} overlap"
        assert start - end <= longest_step_us, f"a hole of {start - end} us between steps {last} and {first}"
    assert gen["startTime"] <= covered[0][0] and covered[-1][1] <= gen["startTime"] + gen["duration"] + 1


def summary(path, env) -> str:
    result = subprocess.run([sys.executable, "-m", "otvllm.cli", "trace", "summary", str(path)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---- Ctrl-C and SIGTERM to the process group ----------------------------------------------------

LONG_RUN = ("--num-prompts", 32, "--max-tokens", 1000, "--max-model-len", 2048, "--block-size", 16)


@pytest.mark.parametrize("sig, code, error_type, name", [
    (signal.SIGINT, 130, "KeyboardInterrupt", "SIGINT"),
    (signal.SIGTERM, 143, "SIGTERM", "SIGTERM"),
])
def test_signal_to_the_process_group_writes_the_trace_so_far(sig, code, error_type, name, cli, env, tmp_path):
    trace = tmp_path / "run.json"
    run = cli(*LONG_RUN, "--trace-file", trace)
    run.wait_for("Generating")   # the progress bar appears as llm.generate starts
    run.work_for(1.5)            # into the decode steps (the run would take minutes)
    assert run.proc.poll() is None, run.stderr
    os.killpg(run.proc.pid, sig)
    assert run.finish() == code, run.stderr

    err = run.stderr
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert lines == [f"otvllm: interrupted by {name}; writing the trace of the run so far"], err
    assert f"trace written to {trace}" in err

    spans = load_spans(trace)
    gen = the(spans, S.GENERATE)
    assert is_error(gen) and gen["attrs"][S.ERROR_TYPE] == error_type
    root = the(spans, S.CLI_RUN)
    assert is_error(root) and root["attrs"][S.ERROR_TYPE] == error_type
    steps = {s["attrs"][S.STEP_INDEX]: s for s in named(spans, S.STEP)}
    assert len(steps) >= 3 and any(s["attrs"][S.PHASE] == "decode" for s in steps.values())
    check_timeline(spans, gen, steps)
    check_requests(spans, error_type, 32)
    # Every span is closed inside its trace and nothing was left for the export side to end.
    assert not any(s["attrs"].get(S.INTERRUPTED) for s in spans)

    assert f"Generation interrupted ({error_type})" in summary(trace, env)


# ---- SIGKILL of the main process alone ----------------------------------------------------------

def test_sigkill_of_the_main_process_still_writes_the_trace(cli, env, tmp_path):
    trace = tmp_path / "run.json"
    run = cli(*LONG_RUN, "--trace-file", trace)
    run.wait_for("Generating")
    run.work_for(1.5)
    run.note_export_process()
    assert run.export_pids, "found no export process"
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL

    deadline = time.monotonic() + 30
    while not trace.exists():   # written atomically by the export process, which lives on
        assert time.monotonic() < deadline, "no trace file 30 s after the SIGKILL"
        time.sleep(0.1)
    spans = load_spans(trace)
    gen = the(spans, S.GENERATE)
    assert is_error(gen) and gen["attrs"][S.ERROR_TYPE] == "ProcessExited"
    assert gen["attrs"][S.INTERRUPTED] is True
    assert len(named(spans, S.STEP)) >= 3
    check_requests(spans, "ProcessExited", 32)
    # The export process is done once the file is written.
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in run.export_pids):
        assert time.monotonic() < deadline, "the export process did not exit after writing the file"
        time.sleep(0.1)
    assert "Generation interrupted (ProcessExited)" in summary(trace, env)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


# ---- a step made slow from outside --------------------------------------------------------------

STOP_S = 1.5


def test_a_stopped_step_is_the_slowest_and_detailed_and_the_timeline_has_no_holes(cli, env, tmp_path):
    trace = tmp_path / "run.json"
    run = cli("--prompt", "hello", "--prompt", "world", "--ignore-eos", "--max-tokens", 600,
              "--max-model-len", 1024, "--block-size", 16, "--trace-file", trace)
    run.wait_for("Generating")
    run.work_for(0.5)   # past the prefill and the first (always detailed) steps
    assert run.proc.poll() is None, run.stderr
    stopped_us = time.time_ns() // 1000   # the trace's clock (wall time, microseconds)
    os.kill(run.proc.pid, signal.SIGSTOP)
    time.sleep(STOP_S)
    continued_us = time.time_ns() // 1000
    os.kill(run.proc.pid, signal.SIGCONT)
    assert run.finish(120) == 0, run.stderr

    spans = load_spans(trace)
    gen = the(spans, S.GENERATE)
    a = gen["attrs"]
    assert not is_error(gen)
    assert a[S.GEN_STEPS] == 600
    assert a[S.SLOWEST_STEP_DETAILED] is True
    slowest = a[S.SLOWEST_STEP_INDEX]
    steps = {s["attrs"][S.STEP_INDEX]: s for s in named(spans, S.STEP)}
    assert slowest in steps
    assert steps[slowest]["duration"] >= 1_000_000, steps[slowest]["duration"]   # microseconds
    assert steps[slowest]["attrs"][S.PHASE] == "decode"
    # It is the step that was stopped.
    assert steps[slowest]["startTime"] <= stopped_us
    assert steps[slowest]["startTime"] + steps[slowest]["duration"] >= continued_us
    assert abs(a[S.STEP_TIME_MAX_MS] - steps[slowest]["duration"] / 1000) < 1.0
    reason = steps[slowest]["attrs"][S.STEP_DETAIL_REASON]
    assert reason in ("slow", "slowest_so_far", "first", "last")

    check_timeline(spans, gen, steps, leave_out=slowest)

    text = summary(trace, env)
    assert "Generation complete: 600 steps" in text
    line = next(x for x in text.splitlines() if "slowest step:" in x)
    assert f"slowest step: #{slowest} (decode" in line and f"detailed ({reason})" in line, line
