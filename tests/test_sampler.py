"""The sampler draws from the distribution it should: softmax(logits / T), after min-p, top-k and top-p."""

import torch

from otvllm.layers.sampler import Sampler, SamplingBatch
from otvllm.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
ROWS = 40000


def draw(params: SamplingParams) -> torch.Tensor:
    torch.manual_seed(0)
    batch = SamplingBatch.from_params([params] * ROWS, [1] * ROWS, len(LOGITS), torch.device("cpu"))
    tokens = Sampler()(LOGITS.repeat(ROWS, 1), batch).token_ids
    return torch.bincount(tokens, minlength=len(LOGITS)).float() / ROWS


def test_frequencies_follow_softmax_of_tempered_logits():
    for temperature in (1.0, 0.5, 2.0):
        expected = torch.softmax(LOGITS / temperature, dim=0)
        observed = draw(SamplingParams(temperature=temperature))
        assert torch.allclose(observed, expected, atol=0.01), (temperature, observed, expected)


def test_top_k_and_top_p_renormalise_over_the_kept_tokens():
    observed = draw(SamplingParams(temperature=1.0, top_k=2))
    kept = torch.softmax(LOGITS[:2], dim=0)
    assert torch.allclose(observed[:2], kept, atol=0.01) and observed[2:].sum() == 0
    probs = torch.softmax(LOGITS, dim=0)                 # [0.563, 0.207, 0.126, 0.076, 0.028]
    observed = draw(SamplingParams(temperature=1.0, top_p=0.75))  # 0.563 + 0.207 reaches 0.75
    assert torch.allclose(observed[:2], probs[:2] / probs[:2].sum(), atol=0.01) and observed[2:].sum() == 0


def test_min_p_keeps_the_tokens_as_likely_as_a_share_of_the_likeliest_after_temperature():
    probs = torch.softmax(LOGITS, dim=0)                 # [0.563, 0.207, 0.126, 0.076, 0.028]
    observed = draw(SamplingParams(temperature=1.0, min_p=0.3))   # 0.3 x 0.563 = 0.169: two kept
    assert torch.allclose(observed[:2], probs[:2] / probs[:2].sum(), atol=0.01) and observed[2:].sum() == 0
    hot = torch.softmax(LOGITS / 2.0, dim=0)             # [0.373, 0.226, 0.176, 0.137, 0.083]
    observed = draw(SamplingParams(temperature=2.0, min_p=0.3))   # 0.112: four kept at this temperature
    assert torch.allclose(observed[:4], hot[:4] / hot[:4].sum(), atol=0.01) and observed[4] == 0
    observed = draw(SamplingParams(temperature=1.0, min_p=0.3, top_k=1))   # min-p, then top-k
    assert observed[0] == 1.0


def test_start_up_measures_the_sampler_with_every_option_at_the_most_rows(qwen3_dir, monkeypatch):
    """KV sizing subtracts the peak of what the warm-up runs; its sampling must be the heaviest a
    step can ask for (on CUDA the peak is measured: tests/test_gpu_engine.py), so every option
    that allocates is on, for max_num_seqs rows, and a slice of prompt rows gets its logprobs."""
    from otvllm.core import model_runner
    from tests.helpers import make_llm
    llm = make_llm(qwen3_dir, max_num_seqs=12)
    runner = llm.engine.runner
    seen = {}
    real_sampler, real_token_logprobs = runner.sampler, model_runner.token_logprobs
    monkeypatch.setattr(runner, "sampler", lambda logits, batch: seen.update(batch=batch, logits=logits)
                        or real_sampler(logits, batch))
    monkeypatch.setattr(model_runner, "token_logprobs", lambda logits, *a: seen.update(prompt_rows=len(logits))
                        or real_token_logprobs(logits, *a))
    runner._sample_at_most()
    batch = seen["batch"]
    assert seen["logits"].shape == (12, llm.engine.spec.vocab_size)
    assert batch.top_ks is not None and batch.top_ps is not None and batch.min_ps is not None
    assert len(batch.penalties.rows) == 12 and batch.penalties.repetition is not None
    assert batch.bias.num_rows == 12
    assert [n for _, n in batch.logprob_rows] == [llm.engine.resolved.max_logprobs] * 12
    assert seen["prompt_rows"] == model_runner.PROMPT_LOGITS_ROWS
    assert not runner.penalty_inputs._known   # its sequences are not kept
