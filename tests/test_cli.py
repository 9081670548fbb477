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


def test_every_engine_option_is_a_field_of_the_config(tmp_path, capsys):
    """generate and serve take one option per EngineConfig field, with its default and help."""
    from otvllm.cli import build_parser
    from otvllm.config import option_fields

    parser = build_parser()
    for command in (["generate"], ["serve"]):
        args = vars(parser.parse_args(command))
        assert {f.name: args[f.name] for f in option_fields()} == {f.name: f.default for f in option_fields()}
        with pytest.raises(SystemExit):
            parser.parse_args(command + ["--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        for f in option_fields():
            assert (f.metadata["flag"] or "--" + f.name.replace("_", "-")) in help_text
            assert " ".join(f.metadata["help"].split()) in help_text
            if f.metadata["choices"]:
                assert "{" + ",".join(f.metadata["choices"]) + "}" in help_text


def test_engine_options_reach_the_engine(qwen3_dir, tmp_path):
    trace = tmp_path / "run.json"
    assert main(["generate", "--model", qwen3_dir, "--prompt", "x", "--max-tokens", "2", "--device", "cpu",
                 "--block-size", "16", "--max-model-len", "128", "--max-num-seqs", "3", "--max-logprobs", "7",
                 "--cudagraph-max-batch-size", "5", "--no-torch-compile", "--trace-file", str(trace),
                 "--no-progress"]) == 0
    spans = [s for t in json.loads(trace.read_text())["data"] for s in t["spans"]]
    init = {tag["key"]: tag["value"] for tag in next(s for s in spans if s["operationName"] == S.ENGINE_INIT)["tags"]}
    decided = {key: init[S.CONFIG_PREFIX + key] for key in
               ("kvcache_block_size", "max_model_len", "max_num_seqs", "max_logprobs", "cudagraph_max_batch_size",
                "torch_compile")}
    assert decided == {"kvcache_block_size": 16, "max_model_len": 128, "max_num_seqs": 3, "max_logprobs": 7,
                       "cudagraph_max_batch_size": 5, "torch_compile": False}


@pytest.mark.parametrize("option, message", [
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be in (0, 1], got 1.5"),
    (["--gpu-memory-utilization", "nan"], "gpu_memory_utilization must be a number, got nan"),
    (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (["--tensor-parallel-size", "2"], "tensor_parallel_size=2 is not supported yet"),
])
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_engine_options_are_checked_before_anything_starts(qwen3_dir, tmp_path, command, option, message):
    """A value only the config can judge: one line, exit 2, and no trace file left behind."""
    import otvllm

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OTVLLM_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.path.dirname(os.path.dirname(otvllm.__file__))}
    args = [sys.executable, "-m", "otvllm", command, "--model", qwen3_dir, *option]
    if command == "generate":
        args += ["--prompt", "hi"]
    else:
        args += ["--trace-file", str(tmp_path / "serve.json"), "--port", "0"]
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("otvllm: error: ") and message in lines[0]
    assert os.listdir(tmp_path) == []
