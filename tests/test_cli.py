"""The command line: generate with a trace file, the trace summary, and one-line errors."""

import json
import os
import signal
import subprocess
import sys

import pytest

from otvllm.cli import main
from otvllm.tracing import schema as S


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env_extra=None, tmp_path=None, cwd=None, stdin=None):
    """The CLI in a subprocess, with this checkout's otvllm whatever the working directory."""
    env = {"PATH": "/usr/bin:/bin", "OTVLLM_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path),
           "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "otvllm.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd, input=stdin)


def one_error_line(result) -> str:
    """The usage error's one line: exit code 2, nothing else on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_generate_writes_a_trace_file_and_the_summary_reads_it(qwen3_dir, tmp_path, capsys):
    trace = tmp_path / "run.json"
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    code = main(["generate", "--model", qwen3_dir, "--prompt", "hello", "--prompt", "world", "--max-tokens", "5",
                 "--ignore-eos", "--device", "cpu", "--block-size", "16", "--max-model-len", "256",
                 "--trace-file", str(trace), "--no-progress"])
    assert code == 0
    # The caller's signal handling is as it was (Ctrl-C raises KeyboardInterrupt again).
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    out = capsys.readouterr()
    assert "--- prompt 0: 'hello'" in out.out and "2 requests" in out.out
    assert f"trace written to {trace}" in out.err
    traces = json.loads(trace.read_text())["data"]
    generate = [t for t in traces if any(s["operationName"] == S.GENERATE for s in t["spans"])][0]
    names = [s["operationName"] for s in generate["spans"]]
    assert names.count(S.STEP) == 5 and names.count(S.REQUEST) == 2
    assert main(["trace", "summary", str(trace)]) == 0
    summary = capsys.readouterr().out
    assert "Generation complete: 5 steps (1 prefill, 4 decode)" in summary
    assert "total_output_tokens=10" in summary


def test_no_endpoint_means_a_trace_file_in_the_working_directory(qwen3_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert main(["generate", "--model", qwen3_dir, "--prompt", "x", "--max-tokens", "2", "--device", "cpu",
                 "--block-size", "16", "--max-model-len", "128"]) == 0
    files = list(tmp_path.glob("otvllm-trace-*.json"))
    assert len(files) == 1 and str(files[0]) in capsys.readouterr().err


def test_trace_level_off_writes_no_trace(qwen3_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", qwen3_dir, "--prompt", "x", "--max-tokens", "2", "--device", "cpu",
                 "--block-size", "16", "--max-model-len", "128", "--trace-level", "off"]) == 0
    assert not list(tmp_path.glob("otvllm-trace-*.json"))


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/nonexistent/model", "--prompt", "hi"], "does not exist"),
    (["generate", "--prompt", ""], "empty prompt"),
    (["generate"], "nothing to generate"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["trace", "summary", "/nonexistent.json"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path):
    result = run_cli(*args, tmp_path=tmp_path, env_extra={"OTVLLM_TRACE_LEVEL": "off"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("otvllm: error: ") and message in lines[-1]
    assert "Traceback" not in result.stderr


BAD_ENVIRONMENT = [
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "nan", "expected a number of milliseconds > 0 and <= 3600000"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "inf", "expected a number of milliseconds > 0 and <= 3600000"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "1e300", "expected a number of milliseconds > 0 and <= 3600000"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "-5", "expected a number of milliseconds > 0 and <= 3600000"),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc", "expected a number of milliseconds > 0 and <= 3600000"),
    ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0", "expected a number of milliseconds > 0"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "expected one of grpc, http/protobuf"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4317", "expected an http:// or https:// URL"),
    ("OTEL_EXPORTER_OTLP_COMPRESSION", "zip", "expected one of gzip, deflate, none"),
    ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "/nonexistent/ca.pem", "expected the path of a readable file"),
    ("OTEL_SDK_DISABLED", "maybe", "expected true or false"),
    ("OTEL_METRIC_EXPORT_INTERVAL", "0", "expected an integer >= 1"),
    ("OTVLLM_TRACE_LEVEL", "loud", "expected one of off, request, step, debug"),
    ("OTVLLM_TRACE_CONTENT", "maybe", "expected true or false"),
    ("OTVLLM_TRACE_MAX_SPANS", "5", "expected an integer >= 100"),
    ("OTVLLM_TRACE_FIRST_STEPS", "-1", "expected an integer >= 0"),
    ("OTVLLM_TRACE_LAST_STEPS", "2.5", "expected an integer >= 0"),
    ("OTVLLM_TRACE_SLOW_FACTOR", "nan", "expected a number >= 1"),
    ("OTVLLM_TRACE_FILE_MAX_SPANS", "0", "expected an integer >= 1"),
]
GENERATE, SERVE = ["generate", "--prompt", "hi"], ["serve", "--port", "0"]


@pytest.mark.parametrize("command, name, value, expected", [(GENERATE, *case) for case in BAD_ENVIRONMENT] + [
    (SERVE, *case) for case in BAD_ENVIRONMENT if case[0] in (
        "OTEL_METRIC_EXPORT_INTERVAL", "OTEL_EXPORTER_OTLP_TIMEOUT", "OTVLLM_TRACE_MAX_SPANS")])
def test_a_bad_environment_variable_is_named_before_any_work(command, name, value, expected, tmp_path):
    """Every variable otvllm reads is checked first: no model is made or loaded (the synthetic
    model's cache stays empty), no export process starts, no trace file is left."""
    work = tmp_path / "work"
    work.mkdir()
    line = one_error_line(run_cli(*command, tmp_path=tmp_path, cwd=work, env_extra={name: value}))
    assert line.startswith(f"otvllm: error: environment variable {name}={value!r}: {expected}"), line
    assert os.listdir(work) == [] and not (tmp_path / "cache").exists()


def test_credentials_in_a_bad_environment_variable_are_not_shown(tmp_path):
    result = run_cli("generate", "--prompt", "hi", tmp_path=tmp_path,
                     env_extra={"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://user:s3cret@collector:4317"})
    line = one_error_line(result)
    assert "OTEL_EXPORTER_OTLP_ENDPOINT='ftp://***@collector:4317'" in line and "s3cret" not in line
    result = run_cli("generate", "--prompt", "hi", tmp_path=tmp_path,
                     env_extra={"OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cret,junk"})
    line = one_error_line(result)
    assert "OTEL_EXPORTER_OTLP_HEADERS" in line and "entry 2 is not key=value" in line and "s3cret" not in line


@pytest.mark.parametrize("content, problem", [
    ('{"data": 5}', "not a Jaeger JSON trace file"),
    ("[1, 2]", "not a Jaeger JSON trace file"),
    ('{"data": [{"traceID": "ab", "spans": [{"operationName": "x"}]}]}', "spanID"),
    ("not json", "not JSON"),
])
def test_trace_summary_of_a_malformed_file_is_one_line_naming_it(content, problem, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = run_cli("trace", "summary", str(path), tmp_path=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and problem in lines[0], lines


def test_trace_summary_reads_several_files_and_the_latest(qwen3_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--model", qwen3_dir, "--max-tokens", "2", "--device", "cpu", "--block-size", "16",
            "--max-model-len", "128", "--no-progress"]
    assert main(args + ["--prompt", "first"]) == 0
    assert main(args + ["--prompt", "second", "--num-prompts", "2"]) == 0
    files = sorted(tmp_path.glob("otvllm-trace-*.json"), key=os.path.getmtime)
    assert len(files) == 2
    capsys.readouterr()
    assert main(["trace", "summary", *map(str, files)]) == 0
    both = capsys.readouterr().out
    assert "requests=1" in both and "requests=3" in both
    assert main(["trace", "summary", "--latest"]) == 0
    latest = capsys.readouterr().out
    assert latest.startswith(files[-1].name) and "requests=3" in latest and "requests=1" not in latest


def test_version_module_entry_point_and_help_with_defaults(tmp_path):
    from otvllm import __version__

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    version = subprocess.run([sys.executable, "-m", "otvllm", "--version"], capture_output=True, text=True, env=env,
                             timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"otvllm {__version__}"
    help_text = subprocess.run([sys.executable, "-m", "otvllm", "generate", "--help"], capture_output=True, text=True,
                               env=env, timeout=60).stdout
    assert "--max-tokens MAX_TOKENS" in help_text and "(default: 64)" in help_text

