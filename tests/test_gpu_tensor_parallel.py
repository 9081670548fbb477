"""Tensor parallelism on CUDA over NCCL (run on a machine with two GPUs: pytest -m gpu):
outputs against transformers and a single GPU, eager and with CUDA graphs, each rank's spans
with its GPU time and memory, the visible GPUs as the limit, and a killed worker."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from otvllm import SamplingParams
from otvllm.tracing import schema as S
from tests.helpers import by_name, make_llm, random_prompts, record_graph_use, traced_run
from tests.reference import hf_greedy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = random_prompts([1, 7, 16, 33, 50, 130], seed=21)


@pytest.mark.parametrize("variant", ["qwen3", "llama", "mistral"])
@pytest.mark.parametrize("eager", [True, False])
def test_two_gpus_float32_greedy_matches_one_gpu_and_transformers(model_dirs, variant, eager):
    model_dir = model_dirs(variant)
    expected = [hf_greedy(model_dir, p, GREEDY.max_tokens) for p in PROMPTS]
    one = make_llm(model_dir, device="cuda", dtype="float32", enforce_eager=eager, max_num_seqs=4)
    assert [o.token_ids for o in one.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected
    del one
    llm = make_llm(model_dir, device="cuda", dtype="float32", enforce_eager=eager, max_num_seqs=4,
                   tensor_parallel_size=2)
    try:
        replayed = record_graph_use(llm)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected
        assert any(replayed) is not eager   # each rank replays its own graphs
    finally:
        llm.close()


def test_bfloat16_two_gpus_first_tokens_match_one_gpu(qwen3_dir):
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    one = [o.token_ids for o in make_llm(qwen3_dir, device="cuda", dtype="bfloat16").generate(PROMPTS, params)]
    llm = make_llm(qwen3_dir, device="cuda", dtype="bfloat16", tensor_parallel_size=2)
    try:
        two = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.close()
    assert sum(a == b for a, b in zip(one, two)) >= len(PROMPTS) - 1   # bf16 sums in another order


def test_each_rank_reports_its_gpu_time_and_memory(qwen3_dir):
    spans, _, llm = traced_run(qwen3_dir, device="cuda", tensor_parallel_size=2, enforce_eager=True)
    llm.close()
    forwards = by_name(spans, S.FORWARD)
    assert forwards
    for forward in forwards:
        ranks = {s["attributes"][S.TP_RANK]: s["attributes"] for s in spans
                 if s["parent_span_id"] == forward["span_id"]}
        assert sorted(ranks) == [0, 1]
        assert ranks[1][S.TP_DEVICE] == "cuda:1"
        assert ranks[1][S.GPU_TIME_MS] > 0 and ranks[1][S.MEM_ALLOCATED] > 0
        assert ranks[1][S.TP_COLLECTIVES] > 0


def test_more_ranks_than_gpus_is_refused(qwen3_dir):
    n = torch.cuda.device_count() * 2
    if 4 % n:   # the tiny model's 4 heads must divide, or that is the error
        pytest.skip("needs a size that divides the heads")
    with pytest.raises(ValueError, match=f"tensor_parallel_size={n} needs GPUs 0..{n - 1}, but torch sees"):
        make_llm(qwen3_dir, device="cuda", tensor_parallel_size=n)


def test_a_killed_worker_fails_the_call_naming_its_rank(qwen3_dir):
    import otvllm
    script = textwrap.dedent("""
        import os, signal, sys
        from otvllm import SamplingParams
        from tests.helpers import make_llm
        llm = make_llm(sys.argv[1], device="cuda", tensor_parallel_size=2)
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
        worker = llm.engine.workers.pids[0]
        print(worker, flush=True)
        os.kill(worker, signal.SIGKILL)
        try:
            llm.generate([[5, 6, 7]], params, use_tqdm=False)
        except Exception as e:
            print(f"{type(e).__name__}: {e}", flush=True)
        os._exit(0)   # a CUDA context with an NCCL kernel waiting on a dead peer may not tear down
    """)
    env = dict(os.environ, OTVLLM_TP_TIMEOUT_S="10",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(otvllm.__file__)), os.getcwd()]))
    result = subprocess.run([sys.executable, "-c", script, qwen3_dir], capture_output=True, text=True, env=env,
                            timeout=300)
    worker, message = result.stdout.splitlines()[:2]
    assert message.startswith(f"RankFailed: tensor-parallel rank 1 (pid {worker}) died"), result.stdout
    with pytest.raises(ProcessLookupError):   # reaped: no worker outlives its engine
        os.kill(int(worker), 0)
