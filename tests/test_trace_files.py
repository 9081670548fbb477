"""Trace files and trace identity of `otvllm generate`, run as a real subprocess (the console
script a user runs, no mocks): a hung collector beside a trace file, a ~60,000-span debug trace,
paths that are refused before any work, the file's mode under the umask, unique default names,
no imports from the user's working directory, and one trace per run (TRACEPARENT honoured)."""

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from otvllm.tracing import schema as S
from tests.otlp_receiver import HangingReceiver, OtlpReceiver

# The console script, as a user runs it: its sys.path[0] is the script's directory, not the
# working directory (`python -m` would put the working directory first itself).
OTVLLM = os.path.join(os.path.dirname(sys.executable), "otvllm")
RUN_TIMEOUT_S = 240

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
TRACESTATE = "vendor=abc,other=x1"

DEFAULT_NAME = re.compile(r"^otvllm-trace-(\d{8})-(\d{6})-(\d{3})-(\d+)\.json$")
WRITTEN = re.compile(r"^trace written to (\S+) \((\d+) spans")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One OTVLLM_CACHE_DIR for the module: the synthetic model is created once."""
    return str(tmp_path_factory.mktemp("otvllm-cache"))


def base_env(cache_dir, home, **extra) -> dict:
    env = {"PATH": "/usr/bin:/bin", "OTVLLM_CACHE_DIR": cache_dir, "HOME": str(home),
           # 2 CPU cores, the export process beside the engine: no thread oversubscription
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def otvllm(*args, cwd, env, umask=None, timeout=RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    command = [OTVLLM, *args]
    if umask is not None:   # the umask of the user's shell, set before exec
        command = ["/bin/sh", "-c", f'umask {umask:03o} && exec "$0" "$@"', *command]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def small_run_args(*extra) -> list[str]:
    return ["generate", "--prompt", "hello", "--prompt", "world", "--max-tokens", "3", "--ignore-eos",
            "--block-size", "16", "--max-model-len", "256", "--no-progress", *extra]


def written_line(stderr: str) -> tuple[str, int]:
    """(path, span count) of the one `trace written to` line."""
    found = [m for m in map(WRITTEN.match, stderr.splitlines()) if m]
    assert len(found) == 1, stderr
    return found[0].group(1), int(found[0].group(2))


def file_spans(path) -> tuple[list[dict], list[dict]]:
    """(traces, all spans) of a Jaeger JSON trace file."""
    with open(path) as f:
        traces = json.load(f)["data"]
    return traces, [s for t in traces for s in t["spans"]]


def tag(span: dict, key: str):
    return next((t["value"] for t in span["tags"] if t["key"] == key), None)


def jaeger_parent(span: dict) -> str | None:
    refs = [r for r in span["references"] if r["refType"] == "CHILD_OF"]
    return refs[0]["spanID"] if refs else None


def only(spans: list[dict], name: str, key: str = "operationName") -> dict:
    found = [s for s in spans if s[key] == name]
    assert len(found) == 1, f"{len(found)} spans named {name}"
    return found[0]


def ancestors(span_id: str, parent_of: dict) -> list[str]:
    chain = []
    while span_id in parent_of and parent_of[span_id]:
        span_id = parent_of[span_id]
        chain.append(span_id)
        assert len(chain) < 1000, "a cycle in the parent links"
    return chain


def assert_one_trace_per_run(spans: list[dict], expected_trace_id: str | None = None,
                             expected_parent: str | None = None) -> str:
    """Jaeger spans of one run: one trace id, otvllm.run at the root (its parent the given one),
    engine.init and llm.generate below it, and every other parent inside the file."""
    trace_ids = {s["traceID"] for s in spans}
    assert len(trace_ids) == 1, trace_ids
    trace_id = trace_ids.pop()
    if expected_trace_id is not None:
        assert trace_id == expected_trace_id
    parent_of = {s["spanID"]: jaeger_parent(s) for s in spans}
    assert len(parent_of) == len(spans), "span ids are not unique"
    run = only(spans, S.CLI_RUN)
    assert parent_of[run["spanID"]] == expected_parent
    for name in (S.ENGINE_INIT, S.GENERATE):
        assert run["spanID"] in ancestors(only(spans, name)["spanID"], parent_of), name
    for s in spans:
        if s is not run:
            assert parent_of[s["spanID"]] in parent_of, f"{s['operationName']}: parent not in the trace"
            assert run["spanID"] in ancestors(s["spanID"], parent_of), s["operationName"]
    return trace_id


def tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root)
                  for n in dirs + files)


# ---- 1. a hung collector beside a trace file -------------------------------------------------------

def test_a_hung_collector_does_not_hold_up_the_trace_file_or_the_exit(cache_dir, tmp_path):
    timeout_s = 1.0
    trace = tmp_path / "hung.json"
    env = base_env(cache_dir, tmp_path, OTEL_EXPORTER_OTLP_TIMEOUT=str(int(timeout_s * 1000)))
    # debug level: a few export batches, each of which the collector leaves unanswered
    args = ["generate", "--prompt", "hello", "--max-tokens", "80", "--ignore-eos", "--trace-level", "debug",
            "--no-progress", "--trace-file", str(trace)]
    with HangingReceiver() as receiver:
        args += ["--otlp-endpoint", receiver.endpoint]
        proc = subprocess.Popen([OTVLLM, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        generated_at = None
        for line in proc.stdout:   # the summary line is printed when generation is done
            if re.match(r"^\d+ requests, ", line):
                generated_at = time.monotonic()
        stderr = proc.stderr.read()
        code = proc.wait(timeout=RUN_TIMEOUT_S)
        exited_at = time.monotonic()
        assert receiver.requests >= 1   # the collector was reached, and never answered
    assert code == 0, stderr
    assert generated_at is not None
    shutdown_s = exited_at - generated_at
    # The file never waits on the network. The network export gets its timeout, plus at most 2 s
    # for the export process to answer and 1 s more before it is killed (process_sink.py), and
    # the interpreter's exit: not a timeout per unanswered batch.
    assert shutdown_s < timeout_s + 4.5, f"{shutdown_s:.1f} s from the end of generation to exit"

    path, count = written_line(stderr)
    assert path == str(trace)
    traces, spans = file_spans(trace)
    assert len(traces) == 1 and len(spans) == count > 500
    assert {S.CLI_RUN, S.ENGINE_INIT, S.GENERATE} <= {s["operationName"] for s in spans}
    assert not [s for s in spans if tag(s, S.INTERRUPTED)]
    assert_one_trace_per_run(spans)
    assert os.listdir(tmp_path) == ["hung.json"]   # no temporary file left beside it

    # One line about the network export, saying it was not confirmed (or failed).
    about_endpoint = [line for line in stderr.splitlines() if receiver.endpoint in line]
    assert len(about_endpoint) == 1, stderr
    line = about_endpoint[0]
    assert line.startswith("otvllm: tracing: ")
    assert "could not confirm the export" in line or re.search(r"\d+ not \(", line), line
    assert "Traceback" not in stderr


# ---- 2. a ~60,000-span debug trace ----------------------------------------------------------------

@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory):
    """A Qwen3 with one narrow layer: at debug level a step is 13 spans (step, 5 phases, and the
    forward's 7 parts: embedding, two norms, attention, MLP, final norm, output head) for a few ms
    of engine time on this CPU, fewer steps than the 4-layer synthetic model needs for as many spans."""
    from otvllm.synthetic import write_model
    return write_model(str(tmp_path_factory.mktemp("models") / "one-layer"), num_hidden_layers=1, hidden_size=32,
                       intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def test_a_60000_span_debug_trace_is_written_whole(cache_dir, tmp_path, one_layer_model):
    prompts, max_tokens = 5, 950    # one sequence at a time: 5 x 950 steps, 13 spans each
    trace = tmp_path / "debug.json"
    args = ["generate", "--model", one_layer_model, "--max-tokens", str(max_tokens), "--ignore-eos",
            "--max-num-seqs", "1", "--trace-level", "debug", "--no-progress", "--trace-file", str(trace)]
    for i in range(prompts):
        args += ["--prompt", f"p{i}"]
    result = otvllm(*args, cwd=tmp_path, env=base_env(cache_dir, tmp_path, OTVLLM_TRACE_MAX_SPANS="100000"))
    assert result.returncode == 0, result.stderr
    path, count = written_line(result.stderr)
    assert path == str(trace)
    assert "left out" not in result.stderr and "dropped" not in result.stderr

    traces, spans = file_spans(trace)
    assert len(traces) == 1
    assert len(spans) == count >= 60_000
    names = [s["operationName"] for s in spans]
    generate = only(spans, S.GENERATE)
    steps = tag(generate, S.GEN_STEPS)
    assert tag(generate, S.GEN_OUTPUT_TOKENS) == prompts * max_tokens
    assert tag(generate, S.TRACE_STEPS_DETAILED) == steps
    assert tag(generate, S.TRACE_STEPS_OVER_BUDGET) == 0 and tag(generate, S.TRACE_SPANS_DROPPED) == 0
    assert sum(map(S.is_step, names)) == steps and not any(map(S.is_steps, names))
    assert names.count(S.FORWARD) == names.count(S.ATTENTION) == names.count(S.MLP) == prompts * max_tokens
    assert names.count(S.NORM) == 3 * prompts * max_tokens   # one layer: its two norms and the final one
    for phase in (S.PREPARE_INPUTS, S.SAMPLE, S.POSTPROCESS):
        assert names.count(phase) == prompts * max_tokens
    assert names.count(S.request_name(S.OPERATION_TEXT_COMPLETION, "one-layer")) == prompts
    assert_one_trace_per_run(spans)   # every span's parent is in the file
    assert os.listdir(tmp_path) == ["debug.json"]


# ---- 3. paths refused before any work ------------------------------------------------------------

def _directory(work):
    (work / "a-directory").mkdir()
    return str(work / "a-directory"), "is a directory"


def _fifo(work):
    os.mkfifo(work / "a-fifo")
    return str(work / "a-fifo"), "is a FIFO"


def _device(work):
    return "/dev/null", "is a device"


def _missing_directory(work):
    return str(work / "missing" / "trace.json"), f"directory {work / 'missing'} does not exist"


def _empty(work):
    return "", "empty trace file path"


@pytest.mark.parametrize("target", [_directory, _fifo, _device, _missing_directory, _empty],
                         ids=["directory", "fifo", "device", "missing-directory", "empty"])
def test_an_unwritable_trace_path_is_refused_before_any_work(target, cache_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    path, problem = target(work)
    before, dev_before = tree(work), sorted(os.listdir("/dev"))
    result = otvllm(*small_run_args("--trace-file", path), cwd=work, env=base_env(cache_dir, tmp_path),
                    timeout=60)   # a FIFO opened for writing would block: it must not be opened
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("otvllm: error: ") and path in lines[0] and problem in lines[0], lines[0]
    assert result.stdout == ""   # no model loaded, nothing generated
    assert tree(work) == before   # no trace file, no temporary file, no directory made
    assert sorted(os.listdir("/dev")) == dev_before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


# ---- 4. the file's mode: the umask, or 0600 when the trace holds text --------------------------------

def test_the_trace_file_mode_follows_the_umask(cache_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = otvllm(*small_run_args("--trace-file", str(out / "t.json")), cwd=tmp_path,
                    env=base_env(cache_dir, tmp_path), umask=0o027)
    assert result.returncode == 0, result.stderr
    assert written_line(result.stderr)[0] == str(out / "t.json")
    assert stat.S_IMODE(os.stat(out / "t.json").st_mode) == 0o640
    assert os.listdir(out) == ["t.json"]


def test_a_trace_with_prompt_text_is_private_whatever_the_umask(cache_dir, tmp_path):
    trace = tmp_path / "content.json"
    trace.write_text("an older, world-readable trace")
    os.chmod(trace, 0o644)
    result = otvllm(*small_run_args("--trace-file", str(trace)), cwd=tmp_path,
                    env=base_env(cache_dir, tmp_path, OTVLLM_TRACE_CONTENT="1"), umask=0o022)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(trace).st_mode) == 0o600
    _, spans = file_spans(trace)   # replaced whole
    inputs = [json.loads(tag(s, S.GEN_AI_INPUT_MESSAGES)) for s in spans if tag(s, S.GEN_AI_INPUT_MESSAGES)]
    assert sorted(m[0]["parts"][0]["content"] for m in inputs) == ["hello", "world"]


# ---- 5. default names: two runs at once in one directory ------------------------------------------

def test_two_runs_started_together_write_two_files_of_one_trace_each(cache_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = base_env(cache_dir, tmp_path)
    procs = [subprocess.Popen([OTVLLM, *small_run_args()], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=RUN_TIMEOUT_S), p.returncode) for p in procs]
    files = sorted(os.listdir(work))
    assert len(files) == 2, files   # nothing else in the directory either
    trace_ids = set()
    for pid, _, stderr, code in results:
        assert code == 0, stderr
        path, count = written_line(stderr)
        assert os.path.dirname(path) == str(work)
        name = os.path.basename(path)
        match = DEFAULT_NAME.match(name)
        assert match and int(match.group(4)) == pid and name in files
        traces, spans = file_spans(path)
        assert len(traces) == 1 and len(spans) == count
        trace_ids.add(assert_one_trace_per_run(spans))
    assert len(trace_ids) == 2   # a trace per run


# ---- 6. no imports from the working directory ----------------------------------------------------

SHADOWS = ("queue", "pickle", "logging")


def test_modules_in_the_working_directory_are_not_imported(cache_dir, tmp_path):
    work, markers = tmp_path / "work", tmp_path / "markers"
    work.mkdir()
    markers.mkdir()
    for name in SHADOWS:
        (work / f"{name}.py").write_text(f"open({str(markers / name)!r}, 'w').write(__file__)\n")
    # The shadowing modules work: a Python started in that directory imports them.
    subprocess.run([sys.executable, "-c", "import queue"], cwd=work, env={"PATH": "/usr/bin:/bin"}, check=True)
    assert os.listdir(markers) == ["queue"]
    os.unlink(markers / "queue")

    result = otvllm(*small_run_args(), cwd=work, env=base_env(cache_dir, tmp_path))
    assert result.returncode == 0, result.stderr
    assert os.listdir(markers) == []
    path, count = written_line(result.stderr)
    assert os.path.dirname(path) == str(work)
    _, spans = file_spans(path)
    assert len(spans) == count and S.GENERATE in {s["operationName"] for s in spans}


# ---- 7. one trace per run, under the caller's TRACEPARENT ----------------------------------------

def test_traceparent_is_the_parent_of_the_run_in_the_file_and_over_otlp(cache_dir, tmp_path):
    trace = tmp_path / "child.json"
    env = base_env(cache_dir, tmp_path, TRACEPARENT=TRACEPARENT, TRACESTATE=TRACESTATE)
    with OtlpReceiver() as receiver:
        result = otvllm(*small_run_args("--trace-file", str(trace), "--otlp-endpoint", receiver.endpoint),
                        cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        otlp = receiver.spans()
    path, count = written_line(result.stderr)
    assert f"{count} spans exported to {receiver.endpoint}" in result.stderr
    assert "otvllm: tracing:" not in result.stderr

    # the file
    traces, spans = file_spans(path)
    assert len(traces) == 1 and len(spans) == count
    assert_one_trace_per_run(spans, expected_trace_id=TRACE_ID, expected_parent=PARENT_SPAN_ID)
    assert tag(only(spans, S.CLI_RUN), "w3c.tracestate") == TRACESTATE

    # over OTLP: the same spans, with the same parents
    assert len(otlp) == count
    assert {s["trace_id"] for s in otlp} == {TRACE_ID}
    parent_of = {s["span_id"]: s["parent_span_id"] for s in otlp}
    assert parent_of == {s["spanID"]: jaeger_parent(s) or "" for s in spans}
    run = only(otlp, S.CLI_RUN, key="name")
    assert run["parent_span_id"] == PARENT_SPAN_ID
    for name in (S.ENGINE_INIT, S.GENERATE):
        assert run["span_id"] in ancestors(only(otlp, name, key="name")["span_id"], parent_of)


def test_an_invalid_traceparent_is_refused_before_any_work(cache_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    bad = f"00-{TRACE_ID}-0000000000000000-01"   # the all-zero span id is invalid
    result = otvllm(*small_run_args(), cwd=work, env=base_env(cache_dir, tmp_path, TRACEPARENT=bad), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otvllm: error: TRACEPARENT=") and bad in lines[0], lines
    assert result.stdout == "" and os.listdir(work) == []   # no default trace file
