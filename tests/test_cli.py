"""The command line: generate with a trace file, the trace summary, and one-line errors."""

import json
import os
import re
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
    (["generate", "--prompt", "hi", "--max-num-batched-tokens", "8", "--max-num-seqs", "16"],
     "max_num_batched_tokens=8 is below max_num_seqs=16"),
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


@pytest.mark.parametrize("option, value, problem", [
    ("--logprobs", "-1", "argument --logprobs: expected an integer >= 0, got -1"),
    ("--stop-token-ids", "13,x", "argument --stop-token-ids: expected token ids (integers >= 0) separated by commas"),
    ("--output", "xml", "argument --output: invalid choice: 'xml'"),
    ("--num-prompts", "0", "argument --num-prompts: expected an integer >= 1, got 0"),
    ("--cudagraph-max-prefill-tokens", "-1", "argument --cudagraph-max-prefill-tokens: expected an integer >= 0"),
    ("--max-num-seqs", "0", "argument --max-num-seqs: expected an integer >= 1, got 0"),
])
def test_a_bad_option_is_one_line_naming_it(option, value, problem, tmp_path):
    line = one_error_line(run_cli("generate", "--prompt", "hi", option, value, tmp_path=tmp_path))
    assert line.startswith("otvllm generate: error: ") and problem in line, line


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
    assert main(args + ["--prompt", "second", "--num-prompts", "3"]) == 0
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
    # The CLI's greedy default differs from the library's, and says so.
    assert "the library's SamplingParams default is 1.0, as vLLM's (default: 0.0)" in " ".join(help_text.split())


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
    # needs the model's config: refused before any trace file or worker process exists
    (["--device", "cpu", "--tensor-parallel-size", "3"], "tensor_parallel_size=3 does not divide num_attention_heads=4"),
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


# ---- prompts from a file, JSON Lines output, logprobs, stop tokens ---------------------------------

def json_lines(text: str) -> list[dict]:
    """stdout of `--output json`: every line one JSON object, nothing else."""
    return [json.loads(line) for line in text.splitlines()]


def hf_tokenize(model_dir: str, prompt: str) -> list[int]:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir).encode(prompt)


SMALL_ENGINE = ["--device", "cpu", "--block-size", "16", "--max-model-len", "128", "--trace-level", "off"]


def test_jsonl_prompts_with_their_own_parameters_against_transformers(qwen3_dir, tmp_path, capsys):
    """Each line's parameters override the options (max_tokens, logprobs, stop_token_ids); the
    JSON output's token ids, log-probabilities and finish reasons are transformers' own."""
    from tests.reference import hf_greedy, hf_logprobs

    world = hf_tokenize(qwen3_dir, "world")
    free = hf_greedy(qwen3_dir, world, 6)
    stop_at = free[2]
    token_ids = [5, 17, 42, 9, 100]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "hello", "max_tokens": 4}),
        "",                                                           # blank lines are skipped
        json.dumps({"prompt": token_ids, "logprobs": None}),
        json.dumps({"prompt": "world", "stop_token_ids": [stop_at]}),
    ]) + "\n")
    assert main(["generate", "--model", qwen3_dir, "--prompts-file", str(path), "--output", "json",
                 "--max-tokens", "6", "--ignore-eos", "--logprobs", "2", *SMALL_ENGINE]) == 0
    out = capsys.readouterr()
    hello, ids, stopped = json_lines(out.out)
    assert "3 requests" in out.err   # the readable summary goes to stderr

    assert [hello["index"], ids["index"], stopped["index"]] == [0, 1, 2]
    hello_ids = hf_tokenize(qwen3_dir, "hello")
    assert hello["prompt"] == "hello" and hello["token_ids"] == hf_greedy(qwen3_dir, hello_ids, 4)
    assert hello["finish_reason"] == "length"
    from transformers import AutoTokenizer
    assert hello["text"] == AutoTokenizer.from_pretrained(qwen3_dir).decode(hello["token_ids"],
                                                                            skip_special_tokens=True)
    ref = hf_logprobs(qwen3_dir, hello_ids + hello["token_ids"])
    assert len(hello["logprobs"]) == 4
    for step, entry in enumerate(hello["logprobs"]):
        row = ref[len(hello_ids) - 1 + step]
        assert entry["token_id"] == hello["token_ids"][step]
        assert abs(entry["logprob"] - row[entry["token_id"]].item()) < 1e-4
        top = row.topk(2)
        assert [t["token_id"] for t in entry["top_logprobs"]] == top.indices.tolist()
        assert all(abs(t["logprob"] - v) < 1e-4 for t, v in zip(entry["top_logprobs"], top.values.tolist()))

    assert ids["prompt"] == token_ids and ids["token_ids"] == hf_greedy(qwen3_dir, token_ids, 6)
    assert "logprobs" not in ids   # the line asked for none

    assert stopped["finish_reason"] == "stop" and stopped["token_ids"] == free[:free.index(stop_at) + 1]


def test_prompts_from_stdin_num_prompts_and_the_progress_bar(qwen3_dir, tmp_path):
    """--prompt first, then the file's lines; --num-prompts N is N requests in all (the prompts
    repeated in turn, or the first N); the progress bar shows input and output tokens per
    second; stdout holds nothing but the JSON lines."""
    from tests.reference import hf_greedy

    args = ["generate", "--model", qwen3_dir, "--prompt", "alpha", "--prompts-file", "-", "--output", "json",
            "--max-tokens", "2", "--ignore-eos", *SMALL_ENGINE]
    result = run_cli(*args, "--num-prompts", "5", tmp_path=tmp_path, stdin="beta\n\ngamma delta\n")
    assert result.returncode == 0, result.stderr
    outputs = json_lines(result.stdout)
    expected = ["alpha", "beta", "gamma delta", "alpha", "beta"]
    assert [o["prompt"] for o in outputs] == expected and [o["index"] for o in outputs] == list(range(5))
    for o in outputs:
        assert o["token_ids"] == hf_greedy(qwen3_dir, hf_tokenize(qwen3_dir, o["prompt"]), 2)
    assert re.search(r"est\. speed input: \d+\.\d\d toks/s, output: \d+\.\d\d toks/s", result.stderr), result.stderr
    assert "5 requests" in result.stderr

    fewer = run_cli(*args, "--num-prompts", "2", tmp_path=tmp_path, stdin="beta\ngamma\n")
    assert [o["prompt"] for o in json_lines(fewer.stdout)] == ["alpha", "beta"], fewer.stderr


def test_num_prompts_alone_is_that_many_random_prompts(qwen3_dir, capsys):
    from tests.reference import hf_greedy

    assert main(["generate", "--model", qwen3_dir, "--num-prompts", "3", "--output", "json", "--max-tokens", "2",
                 "--ignore-eos", *SMALL_ENGINE]) == 0
    outputs = json_lines(capsys.readouterr().out)
    assert len(outputs) == 3 and len({tuple(o["prompt"]) for o in outputs}) == 3
    for o in outputs:
        assert 16 <= len(o["prompt"]) <= 128 and o["token_ids"] == hf_greedy(qwen3_dir, o["prompt"], 2)
        assert o["text"] is not None and o["finish_reason"] == "length"


@pytest.mark.parametrize("content, problem", [
    ('{"prompt": "a"}\n{"prompt": "b", "temperature": -1}\n', "line 2: temperature must be >= 0"),
    ('{"prompt": "a"}\n\n{"prompt": "b",}\n', "line 3: not valid JSON"),
    ('{"prompt": "a"}\nplain text\n', "line 2: not valid JSON"),
    ('{"prompt": "a"}\n[1, 2]\n', 'line 2: expected a JSON object with a "prompt", got list'),
    ('{"prompt": "a"}\n{"text": "b"}\n', 'line 2: no "prompt"'),
    ('{"prompt": "a", "temprature": 0.5}\n', "line 1: unknown key 'temprature'; valid: prompt, temperature"),
    ('{"prompt": ""}\n', "line 1: empty prompt"),
    ('{"prompt": [1, "x"]}\n', 'line 1: "prompt" must be a string or a non-empty list of token ids'),
    ('{"prompt": "a", "max_tokens": 2.5}\n', "line 1: max_tokens must be an integer >= 1"),
    ('{"prompt": "a", "ignore_eos": "no"}\n', "line 1: ignore_eos must be True or False"),
    ('{"prompt": "a", "stop_token_ids": "abc"}\n', "line 1: stop_token_ids must be a list of token ids"),
    ('{"prompt": "a", "logprobs": true}\n', "line 1: logprobs must be None or an integer >= 0"),
    (b"hello\n\xff\xfe\n", "line 2: not UTF-8 text"),
    ("\n  \n", "holds no prompts"),
], ids=["bad-param", "bad-json", "text-in-jsonl", "not-object", "no-prompt", "unknown-key", "empty-prompt",
        "bad-token-ids", "float-max-tokens", "string-bool", "string-stop-ids", "bool-logprobs", "not-utf8",
        "blank"])
def test_a_bad_prompts_file_line_is_named_before_any_work(content, problem, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    path = work / "prompts.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = one_error_line(run_cli("generate", "--prompts-file", str(path), tmp_path=tmp_path, cwd=work))
    assert line.startswith("otvllm: error: ") and str(path) in line and problem in line, line
    assert os.listdir(work) == ["prompts.jsonl"] and not (tmp_path / "cache").exists()


def test_a_prompts_file_that_cannot_be_read_is_named(tmp_path):
    line = one_error_line(run_cli("generate", "--prompts-file", str(tmp_path / "missing.txt"), tmp_path=tmp_path))
    assert f"--prompts-file {tmp_path / 'missing.txt'}: No such file or directory" in line, line
    line = one_error_line(run_cli("generate", "--prompts-file", str(tmp_path), tmp_path=tmp_path))
    assert f"--prompts-file {tmp_path}: Is a directory" in line, line


def test_a_prompt_over_the_models_limits_is_named_by_its_line(qwen3_dir, tmp_path):
    """Checks that need the model (vocabulary, max_model_len) come after it loads, but still
    before any generation, naming the file's line rather than a request number."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": [1, 2]}\n\n{"prompt": [3, 99999]}\n')
    line = one_error_line(run_cli("generate", "--model", qwen3_dir, "--prompts-file", str(path), *SMALL_ENGINE,
                                  tmp_path=tmp_path))
    assert line == (f"otvllm: error: {path} line 3: prompt token id 99999 is outside the vocabulary [0, 320)"), line


def test_text_output_shows_logprobs_and_stops_at_a_stop_token(qwen3_dir, tmp_path, capsys):
    """The readable output: each generated token's log-probability and its likeliest
    alternative; --stop-token-ids ends the output at that token (included, as an EOS is)."""
    from tests.reference import hf_greedy, hf_logprobs

    prompt = [7, 8, 9, 10]
    free = hf_greedy(qwen3_dir, prompt, 6)
    stop_at = free[3]
    expected = free[:free.index(stop_at) + 1]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": prompt}) + "\n")
    assert main(["generate", "--model", qwen3_dir, "--prompts-file", str(path), "--logprobs", "1",
                 "--stop-token-ids", f"{stop_at},{10 ** 6}", "--max-tokens", "6", *SMALL_ENGINE]) == 0
    out = capsys.readouterr().out
    assert f"--- prompt 0: 4 token ids -> {len(expected)} tokens [stop]" in out, out
    text = r"(?:'.*'|\".*\")"   # a token's text, as repr() quotes it
    rows = re.findall(rf"^  token (\d+): (\d+) {text} (-?\d+\.\d{{4}}) \| top: (\d+) {text} (-?\d+\.\d{{4}})$", out,
                      re.M)
    ref = hf_logprobs(qwen3_dir, prompt + expected)
    assert [int(r[1]) for r in rows] == expected and [int(r[0]) for r in rows] == list(range(len(expected)))
    for position, token, logprob, top, top_logprob in rows:
        row = ref[len(prompt) - 1 + int(position)]
        assert abs(float(logprob) - row[int(token)].item()) < 1e-4
        assert int(top) == row.argmax().item() and abs(float(top_logprob) - row.max().item()) < 1e-4


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path):
    """`otvllm trace summary FILE | head`: when the reader closes the pipe, no traceback."""
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"data": [{"traceID": "1", "processes": {"p1": {"serviceName": "s", "tags": []}},
                                           "spans": [{"traceID": "1", "spanID": "2", "operationName": "x",
                                                      "startTime": 1, "duration": 1, "tags": [], "references": [],
                                                      "processID": "p1"}]}]}))
    proc = subprocess.Popen([sys.executable, "-m", "otvllm", "trace", "summary", str(trace), str(trace)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()   # before it writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err
