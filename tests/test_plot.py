"""`otvllm trace plot`: a run's steps drawn from its trace file; checked against the file."""

import json
import os
import subprocess
import sys

import pytest

from otvllm.cli import main
from otvllm.tracing import schema as S
from otvllm.tracing.tools.plot import GPU_TIME, OTHER, STRETCH_MEAN

PER_STEP = [*S.STEP_PHASE_SPANS, OTHER, "sequences", "prompt tokens", "decode tokens", "KV blocks used",
            "KV blocks free", "preempted"]


@pytest.fixture(scope="module")
def trace_file(qwen3_dir, tmp_path_factory):
    """A run with preemptions (a KV cache of 6 blocks for 4 prompts) and steps not detailed."""
    path = tmp_path_factory.mktemp("plot") / "run.json"
    env = pytest.MonkeyPatch()
    env.setenv("OTVLLM_TRACE_FIRST_STEPS", "4")
    env.setenv("OTVLLM_TRACE_LAST_STEPS", "2")
    try:
        assert main(["generate", "--model", qwen3_dir, "--num-prompts", "4", "--max-tokens", "24", "--ignore-eos",
                     "--device", "cpu", "--block-size", "16", "--max-model-len", "160", "--num-kvcache-blocks", "10",
                     "--trace-file", str(path), "--no-progress"]) == 0
    finally:
        env.undo()
    return path


def file_steps(path):
    """The engine.step spans of the file, by index, with their children's tags."""
    spans = [s for t in json.loads(path.read_text())["data"] for s in t["spans"]]
    tags = {s["spanID"]: {t["key"]: t["value"] for t in s["tags"]} for s in spans}
    steps = {}
    for s in spans:
        if S.is_step(s["operationName"]):
            steps[tags[s["spanID"]][S.STEP_INDEX]] = {"span": s, "tags": tags[s["spanID"]], "children": {}}
    for s in spans:
        for ref in s.get("references") or []:
            for step in steps.values():
                if ref["spanID"] == step["span"]["spanID"]:
                    step["children"][s["operationName"]] = tags[s["spanID"]]
    return dict(sorted(steps.items())), [s for s in spans if S.is_steps(s["operationName"])]


def series(figure: dict) -> dict:
    """name -> (x, y) of the points that have a value."""
    out = {}
    for trace in figure["data"]:
        points = [(x, y) for x, y in zip(trace["x"], trace["y"]) if y is not None]
        out[trace["name"]] = ([x for x, _ in points], [y for _, y in points])
    return out


def test_plot_json_has_one_point_per_step_for_each_series(trace_file, tmp_path, capsys):
    out = tmp_path / "run-plot.json"
    assert main(["trace", "plot", str(trace_file), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    steps, stretches = file_steps(trace_file)
    assert stretches, "the run should have steps that are not detailed"
    drawn = series(json.loads(out.read_text()))
    for name in PER_STEP:
        assert drawn[name][0] == list(steps), name          # a point at each step's index
    assert drawn["sequences"][1] == [s["tags"][S.NUM_SEQS] for s in steps.values()]
    assert drawn["prompt tokens"][1] == [s["tags"][S.NUM_PREFILL_TOKENS] for s in steps.values()]
    assert drawn["decode tokens"][1] == [s["tags"][S.NUM_DECODE_TOKENS] for s in steps.values()]
    assert [p + d for p, d in zip(drawn["prompt tokens"][1], drawn["decode tokens"][1])] == [
        s["tags"][S.NUM_BATCHED_TOKENS] for s in steps.values()]
    schedule = [s["children"][S.SCHEDULE] for s in steps.values()]
    assert drawn["KV blocks used"][1] == [c[S.BLOCKS_USED] for c in schedule]
    assert drawn["KV blocks free"][1] == [c[S.BLOCKS_FREE] for c in schedule]
    assert drawn["preempted"][1] == [c[S.NUM_PREEMPTED] for c in schedule]
    assert sum(drawn["preempted"][1]) > 0
    for index, step in steps.items():   # the phases and the rest add up to the step's time
        total = sum(drawn[name][1][list(steps).index(index)] for name in (*S.STEP_PHASE_SPANS, OTHER))
        assert total == pytest.approx(step["span"]["duration"] / 1000, abs=0.01)
    # Steps not detailed: each stretch's mean time, from its first to its last step.
    level = drawn[STRETCH_MEAN]
    expected = []
    for s in stretches:
        t = {x["key"]: x["value"] for x in s["tags"]}
        expected += [(t[S.STEPS_FIRST_INDEX], t[S.STEP_TIME_MEAN_MS]), (t[S.STEPS_LAST_INDEX], t[S.STEP_TIME_MEAN_MS])]
    assert sorted(zip(*level)) == sorted(expected)
    # A CPU run: no GPU time, CUDA memory or GPU telemetry to draw.
    assert not {GPU_TIME, "CUDA allocated", "GPU utilisation"} & set(drawn)


def test_plot_html_is_self_contained_with_the_series(trace_file, tmp_path):
    out = tmp_path / "run.html"
    assert main(["trace", "plot", str(trace_file), "-o", str(out)]) == 0
    html = out.read_text()
    assert html.lower().startswith("<!doctype html>") and "Plotly.newPlot" in html
    assert '<script src="http' not in html and 'src="https' not in html   # plotly.js is inside: opens offline
    for name in PER_STEP:
        assert f'"name":"{name}"' in html, name


def test_plot_draws_gpu_time_memory_and_telemetry_where_the_trace_has_them(trace_file, tmp_path):
    """The CPU trace with CUDA figures added to its spans, as a GPU run records them."""
    doc = json.loads(trace_file.read_text())
    spans = [s for t in doc["data"] for s in t["spans"]]
    step_ids = {s["spanID"] for s in spans if S.is_step(s["operationName"])}
    expected = {}
    for s in spans:
        parent = next((r["spanID"] for r in s.get("references") or []), None)
        if S.is_step(s["operationName"]):
            s["tags"].append({"key": S.GPU_UTILIZATION, "type": "int64", "value": 70})
        elif s["operationName"] == S.FORWARD and parent in step_ids:
            gpu_ms = 0.25 + len(expected)
            expected[parent] = gpu_ms
            s["tags"] += [{"key": S.GPU_TIME_MS, "type": "float64", "value": gpu_ms},
                          {"key": S.MEM_ALLOCATED, "type": "int64", "value": 3 << 30},
                          {"key": S.MEM_RESERVED, "type": "int64", "value": 4 << 30},
                          {"key": S.MEM_PEAK, "type": "int64", "value": 5 << 29}]
    gpu_trace = tmp_path / "gpu.json"
    gpu_trace.write_text(json.dumps(doc))
    out = tmp_path / "gpu-plot.json"
    assert main(["trace", "plot", str(gpu_trace), "-o", str(out)]) == 0
    drawn = series(json.loads(out.read_text()))
    steps, _ = file_steps(trace_file)
    with_forward = [i for i, s in steps.items() if s["span"]["spanID"] in expected]
    assert drawn[GPU_TIME] == (with_forward, [expected[steps[i]["span"]["spanID"]] for i in with_forward])
    assert drawn["CUDA allocated"][1] == [3.0] * len(with_forward)
    assert drawn["CUDA reserved"][1] == [4.0] * len(with_forward)
    assert drawn["CUDA peak"][1] == [2.5] * len(with_forward)
    assert drawn["GPU utilisation"] == (list(steps), [70] * len(steps))


def run_cli(*args, cwd):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "otvllm", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("content, args, problem", [
    ("not json", [], "not JSON"),
    ('{"data": 5}', [], "not a Jaeger JSON trace file"),
    ('{"data": [{"traceID": "ab", "spans": [{"spanID": "1", "operationName": "request"}]}]}', [],
     "no engine steps to plot"),
    (None, ["-o", "plot.png"], "-o plot.png: the plot is written as .html or .json"),
    (None, ["-o", "nowhere/plot.html"], "directory"),
    (None, ["-o", "trace.json"], "is the trace file itself"),
    (None, ["--call", "3"], "--call 3"),
    ("missing", [], "does not exist"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(trace_file, tmp_path, content, args, problem):
    path = tmp_path / "trace.json"
    if content is None:
        path.write_text(trace_file.read_text())
    elif content != "missing":
        path.write_text(content)
    result = run_cli("trace", "plot", "trace.json", *args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otvllm: error: ") and problem in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content == "missing" else ["trace.json"])


def test_default_output_is_the_trace_file_with_html(trace_file, tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(trace_file.read_text())
    result = run_cli("trace", "plot", "trace.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "trace.html").stat().st_size > 0 and str(tmp_path / "trace.html") in result.stdout
