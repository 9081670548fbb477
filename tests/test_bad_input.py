"""Bad input is refused up front with a ValueError naming the problem, and loses no other work."""

import json
import os
import shutil

import pytest

from otvllm import LLM, SamplingParams
from tests.helpers import make_llm
from tests.reference import hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    return make_llm(qwen3_dir, max_model_len=128)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture_lists_supported(tmp_path, qwen3_dir):
    shutil.copytree(qwen3_dir, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel.*Qwen3ForCausalLM.*LlamaForCausalLM"):
        LLM(str(tmp_path / "m"))


def test_missing_weights_are_named(tmp_path, qwen3_dir):
    shutil.copytree(qwen3_dir, tmp_path / "m")
    for name in os.listdir(tmp_path / "m"):
        if name.endswith(".safetensors"):
            os.remove(tmp_path / "m" / name)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(tmp_path / "m"), device="cpu")


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(llm, prompt):
    with pytest.raises(ValueError, match="request 1: empty prompt"):
        llm.generate([[1, 2], prompt], GREEDY, use_tqdm=False)


def test_prompt_plus_max_tokens_over_max_model_len(llm):
    params = SamplingParams(temperature=0.0, max_tokens=30)
    with pytest.raises(ValueError, match="request 0: prompt of 100 tokens plus max_tokens=30 is 130 tokens, "
                                         "more than max_model_len=128"):
        llm.generate([[1] * 100], params, use_tqdm=False)


def test_token_ids_outside_vocabulary(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 100000]], GREEDY, use_tqdm=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p must be in \\(0, 1\\]"),
    (dict(top_k=0), "top_k must be -1"),
    (dict(top_k=-2), "top_k must be -1"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(logprobs=-1), "logprobs must be"),
    (dict(min_p=-0.1), "min_p must be in \\[0, 1\\]"),
    (dict(min_p=1.5), "min_p must be in \\[0, 1\\]"),
    (dict(min_p=float("inf")), "min_p must be a finite number"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_kv_cache_too_small_for_one_sequence(qwen3_dir):
    with pytest.raises(ValueError, match="room for 3 blocks of 16 tokens.*max_model_len=128 needs 8"):
        LLM(qwen3_dir, kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=3, device="cpu")


def test_unknown_engine_option(qwen3_dir):
    with pytest.raises(ValueError, match="unknown engine option\\(s\\) max_num_seq\\b"):
        LLM(qwen3_dir, max_num_seq=4)


def test_invalid_trace_level_lists_valid_ones(qwen3_dir, monkeypatch):
    with pytest.raises(ValueError, match="invalid trace level 'verbose': choose one of off, request, step, debug"):
        LLM(qwen3_dir, device="cpu", trace_level="verbose")


@pytest.mark.parametrize("name, value, expected", [
    ("OTVLLM_TRACE_LEVEL", "verbose", "expected one of off, request, step, debug"),
    ("OTVLLM_TRACE_MAX_SPANS", "abc", "expected an integer >= 100"),
    ("OTVLLM_TRACE_SLOW_FACTOR", "inf", "expected a number >= 1"),
    ("OTVLLM_TRACE_CONTENT", "maybe", "expected true or false"),
    ("OTVLLM_CACHE_DIR", __file__, "expected a directory"),
])
def test_a_bad_environment_variable_is_named_by_the_library_before_any_work(name, value, expected, monkeypatch,
                                                                            tmp_path):
    """LLM(...) reads its OTVLLM_* variables first: the error names the variable, not the
    missing model directory it would otherwise have reached."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^environment variable {name}={value!r}: {expected}"):
        LLM(str(tmp_path / "no-model-here"), device="cpu")


def test_configure_checks_the_otel_variables_before_starting_the_export_process(monkeypatch, tmp_path):
    from otvllm.tracing import configure
    from otvllm.tracing.export.process_sink import ProcessSink
    from otvllm.tracing.recording.sinks import current_sink

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "nan")
    with pytest.raises(ValueError, match="^environment variable OTEL_EXPORTER_OTLP_TIMEOUT='nan': expected a number "
                                         "of milliseconds"):
        configure(trace_file=str(tmp_path / "t.json"))
    assert not isinstance(current_sink(), ProcessSink) and os.listdir(tmp_path) == []


def test_wrong_number_of_sampling_params(llm):
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        llm.generate([[1], [2]], [GREEDY], use_tqdm=False)


def test_one_bad_request_runs_nothing_and_engine_stays_usable(llm, qwen3_dir):
    good = [[5, 6, 7], [8, 9]]
    engine = llm.engine
    steps_before = engine.step_index
    with pytest.raises(ValueError, match="request 2"):
        llm.generate(good + [[]], GREEDY, use_tqdm=False)
    assert engine.is_finished() and engine.step_index == steps_before
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    outs = llm.generate(good, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [hf_greedy(qwen3_dir, p, 8) for p in good]


def test_a_missing_projection_is_named_in_checkpoint_terms(tmp_path, qwen3_dir):
    from safetensors.torch import load_file, save_file
    shutil.copytree(qwen3_dir, tmp_path / "m")
    path = next((tmp_path / "m").glob("*.safetensors"))
    weights = load_file(path)
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weight\\(s\\) the model needs: model.layers.1.self_attn.k_proj.weight"):
        LLM(str(tmp_path / "m"), device="cpu")


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p="0.5"), "top_p must be a finite number"),
    (dict(stop_token_ids="abc"), "stop_token_ids must be a list of token ids"),
    (dict(stop_token_ids=[1, "2"]), "stop_token_ids must hold token ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must hold token ids"),
    (dict(seed=True), "seed must be an integer"),
])
def test_sampling_params_are_checked_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_logprobs_over_the_engine_limit_is_refused_before_any_work(llm):
    steps = llm.engine.step_index
    with pytest.raises(ValueError, match="request 1: logprobs=21 is more than the engine allows \\(max_logprobs=20"):
        llm.generate([[1, 2], [3, 4]], [GREEDY, SamplingParams(max_tokens=4, logprobs=21)], use_tqdm=False)
    assert llm.engine.step_index == steps   # nothing ran


def test_top_k_beyond_the_vocabulary_keeps_every_token(llm):
    """top_k larger than the vocabulary (even 2**63) means no top-k filter: same as top_k=-1."""
    prompts = [[5, 6, 7]]
    huge = llm.generate(prompts, SamplingParams(temperature=1.0, top_k=2**63, seed=3, max_tokens=8,
                                                ignore_eos=True), use_tqdm=False)
    off = llm.generate(prompts, SamplingParams(temperature=1.0, top_k=-1, seed=3, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert huge[0].token_ids == off[0].token_ids


def test_the_synthetic_model_is_reachable_by_name(tmp_path):
    """`LLM()` and `LLM("synthetic")` serve the built-in model; its threads on CPU are chosen
    (OMP_NUM_THREADS when set) and reported on engine.init. In a subprocess: torch's thread
    count is process-wide."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "memory = InMemorySpanExporter(); provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(memory)); trace.set_tracer_provider(provider)\n"
        "from otvllm import LLM, SamplingParams\n"
        "from otvllm.synthetic import SYNTHETIC_NAME\n"
        "a, b = LLM(device='cpu'), LLM('synthetic', device='cpu')\n"
        "assert a.config.model == b.config.model and a.config.model.endswith(SYNTHETIC_NAME), a.config.model\n"
        "out = a.generate('hi', SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)\n"
        "assert len(out[0].token_ids) == 3\n"
        "init = [s for s in memory.get_finished_spans() if s.name == 'engine.init'][0]\n"
        "print(a.engine.resolved.cpu_threads, torch.get_num_threads(), init.attributes['otvllm.config.cpu_threads'])\n")
    env = dict(os.environ, OTVLLM_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="3")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "3", "3"]


@pytest.mark.parametrize("threads", [0, "2", True])
def test_cpu_threads_must_be_a_positive_integer(qwen3_dir, threads):
    with pytest.raises(ValueError, match="cpu_threads must be a positive integer"):
        LLM(qwen3_dir, device="cpu", cpu_threads=threads)


def test_max_model_len_defaults_to_the_models_limit_and_beyond_it_is_refused(qwen3_dir):
    config = json.load(open(os.path.join(qwen3_dir, "config.json")))
    limit = config["max_position_embeddings"]
    assert LLM(qwen3_dir, device="cpu", trace_level="off").engine.resolved.max_model_len == min(limit, 4096)
    with pytest.raises(ValueError, match=f"max_model_len={limit + 1} is more than the model allows "
                                         f"\\(max_position_embeddings={limit}"):
        LLM(qwen3_dir, device="cpu", max_model_len=limit + 1, max_num_batched_tokens=2 * limit)


@pytest.mark.parametrize("option, value, message", [
    ("max_num_seqs", "8", "max_num_seqs must be a positive integer"),
    ("max_logprobs", 0, "max_logprobs must be a positive integer"),
    ("enforce_eager", "yes", "enforce_eager must be True or False"),
    ("gpu_memory_utilization", "0.5", "gpu_memory_utilization must be a number"),
    ("device", 5, "device must be a string"),
    ("num_kvcache_blocks", 2.5, "num_kvcache_blocks must be a positive integer"),
    ("cudagraph_max_prefill_tokens", -1, "cudagraph_max_prefill_tokens must be an integer >= 0, got -1"),
])
def test_engine_options_of_the_wrong_type_are_named(qwen3_dir, option, value, message):
    with pytest.raises(ValueError, match=message):
        LLM(qwen3_dir, **{option: value})


def _broken_copy(tmp_path, qwen3_dir, edit):
    shutil.copytree(qwen3_dir, tmp_path / "m")
    edit(tmp_path / "m")
    return str(tmp_path / "m")


def _set_config(**fields):
    def edit(model):
        path = model / "config.json"
        config = json.loads(path.read_text())
        config.update(fields)
        path.write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda m: (m / "config.json").write_text("[1, 2]"), "config.json must hold a JSON object, it holds a list"),
    (lambda m: (m / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (_set_config(vocab_size=-1), "config.json: vocab_size must be a positive integer, got -1"),
    (_set_config(num_attention_heads=0), "config.json: num_attention_heads must be a positive integer, got 0"),
    (_set_config(hidden_size="wide"), "config.json: hidden_size must be a positive integer, got 'wide'"),
    (_set_config(num_attention_heads=4, num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
], ids=["list", "not-json", "vocab-negative", "heads-zero", "wrong-type", "heads-do-not-group"])
def test_a_bad_config_is_named_with_its_file_and_field(tmp_path, qwen3_dir, edit, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
        LLM(_broken_copy(tmp_path, qwen3_dir, edit), device="cpu")


def test_a_truncated_checkpoint_names_the_file(tmp_path, qwen3_dir):
    def truncate(model):
        for name in os.listdir(model):
            if name.endswith(".safetensors"):
                data = (model / name).read_bytes()
                (model / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="\\.safetensors: cannot read the weights"):
        LLM(_broken_copy(tmp_path, qwen3_dir, truncate), device="cpu")


def test_the_cli_reports_a_bad_config_in_one_line(tmp_path, qwen3_dir):
    import subprocess
    import sys

    model = _broken_copy(tmp_path, qwen3_dir, _set_config(vocab_size=-1))
    result = subprocess.run([sys.executable, "-m", "otvllm.cli", "generate", "--model", model, "--prompt", "hi",
                             "--device", "cpu", "--trace-level", "off"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("otvllm: error: ") and "vocab_size must be a positive integer" in lines[-1]


def test_the_readme_names_every_environment_variable():
    """The table in otvllm/environment.py is the one source; the README's list follows it (the
    OTLP exporter settings are named there as OTEL_EXPORTER_OTLP_{...} groups)."""
    from pathlib import Path

    from otvllm.environment import VARIABLES

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [name for name in VARIABLES if not name.startswith("OTEL_EXPORTER_OTLP_") and f"`{name}`" not in readme]
    assert missing == []
