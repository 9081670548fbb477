"""The command line: generate with a trace file, the trace summary, and one-line errors."""

import json
import os
import signal
import subprocess
import sys

import pytest

from otvllm.cli import main
from otvllm.tracing import schema as S


def run_cli(*args, env_extra=None, tmp_path=None):
    env = {"PATH": "/usr/bin:/bin", "OTVLLM_CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "otvllm.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


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
    model = os.path.basename(qwen3_dir)
    assert sum(map(S.is_step, names)) == 5 and names.count(S.request_name(S.OPERATION_TEXT_COMPLETION, model)) == 2
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


def test_invalid_trace_level_variable_is_reported(tmp_path):
    result = run_cli("generate", "--prompt", "hi", tmp_path=tmp_path, env_extra={"OTVLLM_TRACE_LEVEL": "loud"})
    assert result.returncode == 2
    assert "invalid trace level 'loud'" in result.stderr and "Traceback" not in result.stderr


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
