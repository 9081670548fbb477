"""The benchmark scripts of issue 13 run at their smallest size on CPU and report what they say
they report (the figures' fields and their consistency, never their speed), so that they do
not rot between GPU sessions."""

import gc
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


on_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def run_script(name: str, *args, tmp_path, device: str | None = "cpu") -> subprocess.CompletedProcess:
    """benchmarks/`name` with `args` (and --device, unless None) in a fresh environment."""
    if device == "cuda":
        # Engines of earlier tests that only a reference cycle still holds would keep most of the
        # GPU's memory from the script's process.
        gc.collect()
        torch.cuda.empty_cache()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "OTVLLM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           # the repository first; then where the caller's packages live (the GPU machine's --target dir)
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    device_args = ["--device", device] if device else []
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *device_args, *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def usage_error(result) -> str:
    """An argparse error: exit 2, the problem on the last line of stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def latency_run(qwen3_dir, tmp_path_factory):
    """(the run, its JSON file) of latency.py on CPU: run once, for this test and the figure's."""
    tmp_path = tmp_path_factory.mktemp("latency")
    out = tmp_path / "latency.json"
    result = run_script("latency.py", "--model-dir", qwen3_dir, "--contexts", "16,24", "--batches", "1,2",
                        "--output-len", "5", "--repeats", "2", "--json", str(out), tmp_path=tmp_path)
    return result, out


@pytest.fixture(scope="module")
def scaling_run(qwen3_dir, tmp_path_factory):
    """(the run, its JSON file) of scaling.py on CPU, as latency_run."""
    tmp_path = tmp_path_factory.mktemp("scaling")
    out = tmp_path / "scaling.json"
    result = run_script("scaling.py", "--model-dir", qwen3_dir, "--max-model-lens", "256,1024",
                        "--num-requests", "2,3", "--prompt-lens", "8,16", "--output-lens", "4,8", "--repeats", "1",
                        "--json", str(out), tmp_path=tmp_path)
    return result, out


def test_latency_reports_ttft_and_tpot_for_every_context_and_batch(latency_run):
    result, out = latency_run
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["context"], r["batch"]) for r in rows] == [(16, 1), (16, 2), (24, 1), (24, 2)]
    for r in rows:
        assert (r["system"], r["attention_backend"]) == ("otvllm", "torch")
        assert r["output_tokens"] == r["batch"] * 5 * 2
        # one interval between each request's consecutive tokens, in every run
        assert r["decode_intervals"] == 2 * r["batch"] * (5 - 1)
        assert 0 < r["ttft_ms"] <= r["ttft_max_ms"]
        assert r["tpot_p50_ms"] > 0 and r["tpot_mean_ms"] > 0
        assert all(math.isfinite(r[k]) for k in ("ttft_ms", "tpot_p50_ms", "tpot_mean_ms"))
        assert r["decode_forward_gpu_p50_ms"] is None   # on CUDA only
    table = [line.split() for line in result.stdout.splitlines() if line.startswith("otvllm torch")]
    assert [(int(t[2]), int(t[3])) for t in table] == [(16, 1), (16, 2), (24, 1), (24, 2)]
    assert all(t[-1] == "-" for t in table)


def test_latency_refuses_bad_input_before_any_work(qwen3_dir, tmp_path):
    line = usage_error(run_script("latency.py", "--nano-vllm", str(tmp_path), tmp_path=tmp_path))
    assert "--nano-vllm" in line and "nanovllm/" in line
    limit = config(qwen3_dir)["max_position_embeddings"]
    line = usage_error(run_script("latency.py", "--model-dir", qwen3_dir, "--contexts", str(limit),
                                  "--output-len", "8", tmp_path=tmp_path))
    assert f"{limit} positions" in line
    line = usage_error(run_script("latency.py", "--model-dir", qwen3_dir, "--attention-backends", "triton",
                                  tmp_path=tmp_path))
    assert "triton needs a CUDA device" in line
    assert not list(tmp_path.glob("*.json"))


def test_profile_step_prints_the_operator_table_and_the_step_by_family(qwen3_dir, tmp_path):
    out = tmp_path / "profile.json"
    batch, context, steps, warmup = 2, 16, 3, 2
    result = run_script("profile_step.py", "--model-dir", qwen3_dir, "--batch", str(batch), "--context",
                        str(context), "--steps", str(steps), "--warmup-steps", str(warmup), "--json", str(out),
                        tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Self CPU time total" in result.stdout and "aten::mm" in result.stdout   # torch.profiler's table
    report = json.loads(out.read_text())
    cfg = config(qwen3_dir)
    layers, hidden, inter = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads, head_dim, vocab = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                                        cfg["vocab_size"])
    # The model's matrix products as (in, out): q/k/v and gate/up merged, as otvllm computes them.
    gemms = [(hidden, (heads + 2 * kv_heads) * head_dim), (heads * head_dim, hidden), (hidden, 2 * inter),
             (inter, hidden)] * layers
    itemsize = 4   # float32 on CPU
    for phase, tokens in (("prefill", batch * context), ("decode", batch)):
        s = report[phase]
        assert s["steps"] == (1 if phase == "prefill" else steps)
        assert list(s["families"]) == ["GEMM", "attention", "norm", "rope", "KV store", "rope+store", "sampling",
                                        "other"]
        assert math.isclose(sum(f["share"] for f in s["families"].values()), 1.0)
        assert math.isclose(sum(f["time_us_per_step"] for f in s["families"].values()), s["time_us_per_step"])
        weights = sum(i * o for i, o in gemms) + hidden * vocab
        activations = tokens * sum(i + o for i, o in gemms) + batch * (hidden + vocab)
        assert s["families"]["GEMM"]["bytes_per_step"] == (weights + activations) * itemsize
        assert s["families"]["GEMM"]["gb_s"] > 0 and s["families"]["attention"]["gb_s"] > 0
        # Each layer's four projections and the output head: per step, whatever the number of steps.
        mm = next(k for k in s["kernels"] if k["name"] == "aten::mm")
        assert mm["calls_per_step"] == 4 * layers + 1 and mm["family"] == "GEMM"
    # The decode window's contexts: the prompt, the prefill's token, then one more per decode step.
    assert report["decode"]["mean_context"] == context + 1 + warmup + (steps - 1) / 2
    kv = report["decode"]["families"]["attention"]["bytes_per_step"]
    per_token = 2 * kv_heads * head_dim * itemsize
    q_and_out = 2 * heads * head_dim * itemsize
    assert kv == layers * batch * (report["decode"]["mean_context"] * per_token + q_and_out)


def test_scaling_reports_kv_cache_against_max_model_len_and_throughput_against_requests(qwen3_dir, scaling_run):
    result, out = scaling_run
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    cfg = config(qwen3_dir)
    for r, max_model_len in zip(report["kv_cache"], (256, 1024), strict=True):
        block = r["block_size"]
        assert r["max_model_len"] == max_model_len and r["kv_blocks"] > 0
        assert r["kv_bytes"] == r["kv_blocks"] * 2 * cfg["num_hidden_layers"] * block * cfg["num_key_value_heads"] \
            * cfg["head_dim"] * 4
        assert r["kv_tokens"] == r["kv_blocks"] * block
        assert r["full_length_seqs"] == r["kv_blocks"] // -(-max_model_len // block)
    rows = report["throughput"]
    assert [r["requests"] for r in rows] == [2, 3]
    for r in rows:
        assert len(r["runs_s"]) == 1 and r["tok_s"] > 0 and r["preemptions"] == 0
        assert 8 * r["requests"] <= r["prompt_tokens"] <= 16 * r["requests"]
        assert 4 * r["requests"] <= r["output_tokens"] <= 8 * r["requests"]
        assert r["steps"] >= 4   # a request's tokens come one per step
    assert "KV cache and memory against max_model_len" in result.stdout
    assert "throughput against the number of requests" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "flash_attn"])
def test_gpu_profile_step_finds_every_kernel_family(qwen3_dir, tmp_path, backend):
    """On CUDA the families are read from real kernel names (cuBLAS, Triton, FA4, torch.compile's)."""
    out = tmp_path / "profile.json"
    result = run_script("profile_step.py", "--model-dir", qwen3_dir, "--batch", "4", "--context", "300",
                        "--steps", "5", "--attention-backend", backend, "--json", str(out), tmp_path=tmp_path,
                        device="cuda")
    if backend == "flash_attn" and result.returncode == 2 and "cannot be used" in result.stderr:
        pytest.skip(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    layers = config(qwen3_dir)["num_hidden_layers"]
    assert report["copy_gb_s"] > 0 and report["attention_backend"] == backend
    for phase in ("prefill", "decode"):
        families = report[phase]["families"]
        for name in ("GEMM", "attention", "norm", "sampling"):
            assert families[name]["kernels_per_step"] > 0, (phase, name, report[phase]["kernels"])
        # q/k norm, rotary and the KV store: one fused kernel per layer on these backends
        assert families["rope+store"]["kernels_per_step"] == layers
        assert families["rope"]["kernels_per_step"] == families["KV store"]["kernels_per_step"] == 0
        assert families["GEMM"]["kernels_per_step"] >= 4 * layers + 1
        assert families["GEMM"]["of_copy"] > 0 and families["attention"]["of_copy"] > 0
    assert report["decode"]["unprofiled_gpu_us_per_step"] > 0 and "unprofiled_gpu_us_per_step" not in report["prefill"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_latency_and_scaling_run_on_cuda(qwen3_dir, tmp_path):
    out = tmp_path / "latency.json"
    result = run_script("latency.py", "--model-dir", qwen3_dir, "--contexts", "64", "--batches", "1,2",
                        "--output-len", "8", "--repeats", "1", "--json", str(out), tmp_path=tmp_path, device="cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {(r["attention_backend"], r["batch"]) for r in rows} >= {("triton", 1), ("triton", 2)}
    assert all(r["decode_intervals"] == r["batch"] * 7 and r["tpot_p50_ms"] > 0 for r in rows)
    assert all(r["decode_forward_gpu_p50_ms"] > 0 for r in rows if r["system"] == "otvllm")
    assert "flash_attn" in {r["attention_backend"] for r in rows} or "skipped" in result.stdout
    out = tmp_path / "scaling.json"
    result = run_script("scaling.py", "--model-dir", qwen3_dir, "--max-model-lens", "1024", "--num-requests", "4",
                        "--prompt-lens", "8,64", "--output-lens", "4,16", "--repeats", "1", "--json", str(out),
                        tmp_path=tmp_path, device="cuda")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    kv = report["kv_cache"][0]
    assert 0 < kv["kv_bytes"] < kv["cuda_allocated_bytes"] <= kv["cuda_peak_bytes"] <= kv["cuda_total_bytes"]
    assert report["throughput"][0]["tok_s"] > 0


def test_prepare_cost_times_each_case_at_each_block_size(tmp_path):
    out = tmp_path / "prepare.json"
    result = run_script("prepare_cost.py", "--block-sizes", "16,256", "--steps", "1", "--repeats", "1",
                        "--json", str(out), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    # The documented cases: 32 prompts x 512; 256 decodes; 128 decodes + 8 chunks of 512.
    expected = {"prefill": (32, 32 * 512), "decode": (256, 256), "mixed": (136, 128 + 8 * 512)}
    assert [(r["block_size"], r["case"]) for r in rows] == [(b, c) for b in (16, 256) for c in expected]
    for r in rows:
        assert (r["seqs"], r["tokens"]) == expected[r["case"]]
        assert r["us_per_step"] > 0 and math.isfinite(r["us_per_step"])
    table = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [(t[0], int(t[1])) for t in table] == [(r["case"], r["block_size"]) for r in rows]


def test_prepare_cost_times_the_penalties_and_biases_inputs_on_request(tmp_path):
    out = tmp_path / "prepare.json"
    result = run_script("prepare_cost.py", "--cases", "decode,penalties,biases", "--block-sizes", "256", "--steps",
                        "1", "--repeats", "1", "--json", str(out), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["case"], r["seqs"], r["tokens"]) for r in rows] == [("decode", 256, 256), ("penalties", 256, 256),
                                                                  ("biases", 256, 256)]
    assert all(r["us_per_step"] > 0 for r in rows)


def test_prepare_cost_refuses_bad_input_before_any_work(tmp_path):
    line = usage_error(run_script("prepare_cost.py", "--cases", "decode,prefil", "--json", "x.json",
                                  tmp_path=tmp_path))
    assert "prefil" in line and "prefill, decode, mixed, penalties, biases" in line
    line = usage_error(run_script("prepare_cost.py", "--block-sizes", "16,0", tmp_path=tmp_path))
    assert "--block-sizes" in line and "16,0" in line
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("stop", [False, True])
def test_detokenize_cost_times_each_length_of_a_checked_stream(tmp_path, stop):
    result = run_script("detokenize_cost.py", "--lengths", "16,40", *(["--stop"] if stop else []),
                        tmp_path=tmp_path, device=None)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [(r[0], r[1], r[3:]) for r in rows] == [(n, "tokens:", ["us", "per", "chunk"]) for n in ("16", "40")]
    assert all(float(r[2]) > 0 for r in rows)


def test_detokenize_cost_refuses_bad_lengths_before_any_work(tmp_path):
    for bad in ("16,x", "16,0"):
        line = usage_error(run_script("detokenize_cost.py", "--lengths", bad, tmp_path=tmp_path, device=None))
        assert "--lengths" in line and bad in line


def test_the_scaling_figure_draws_what_the_two_benchmarks_measured(latency_run, scaling_run, tmp_path):
    from benchmarks.plot_scaling import figure

    (_, latency_file), (_, scaling_file) = latency_run, scaling_run
    latency, scaling = json.loads(latency_file.read_text()), json.loads(scaling_file.read_text())
    fig = figure(scaling, latency)
    tput, ttft, kv, tpot = fig.axes

    def series(ax) -> dict:
        return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}

    rows = scaling["throughput"]
    assert series(tput) == {"tracing off": ([r["requests"] for r in rows], [r["tok_s"] for r in rows])}
    for ax, key in ((ttft, "ttft_ms"), (tpot, "tpot_p50_ms")):
        assert series(ax) == {f"batch {b}": ([16, 24], [r[key] for r in latency["results"] if r["batch"] == b])
                              for b in (1, 2)}
    caches = scaling["kv_cache"]
    assert series(kv) == {"sequences of full length": ([256, 1024], [r["full_length_seqs"] for r in caches])}

    out = tmp_path / "scaling.png"
    result = run_script("plot_scaling.py", str(scaling_file), str(latency_file), "-o", str(out), tmp_path=tmp_path,
                        device=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_scaling_figure_names_a_bad_file_before_drawing(latency_run, tmp_path):
    _, latency_file = latency_run
    swapped = run_script("plot_scaling.py", str(latency_file), str(latency_file), "-o", str(tmp_path / "f.png"),
                         tmp_path=tmp_path, device=None)
    line = usage_error(swapped)
    assert str(latency_file) in line and "not the JSON of benchmarks/scaling.py" in line
    nowhere = run_script("plot_scaling.py", str(latency_file), str(latency_file), "-o", str(tmp_path / "no" / "f.png"),
                         tmp_path=tmp_path, device=None)
    assert f"directory {tmp_path / 'no'} does not exist" in usage_error(nowhere)
    unknown = run_script("plot_scaling.py", str(latency_file), str(latency_file), "-o", str(tmp_path / "f.xyz"),
                         tmp_path=tmp_path, device=None)
    assert "name the image with one of the suffixes" in usage_error(unknown) and "png" in usage_error(unknown)
    assert not (tmp_path / "f.png").exists()
