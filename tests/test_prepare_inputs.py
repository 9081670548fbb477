"""A step's input preparation (`ModelRunner.prepare`) against a per-token reference written here:
random workloads driven through the real scheduler and block manager as the engine drives them
(prompts that share prefixes, so prefix-cache hits; chunked prompts; mixed steps; preemption;
last tokens still on the device), at several block sizes. Every tensor of every step must be
the reference's, dtype included."""

import random

import pytest
import torch

from otvllm.config import EngineConfig
from otvllm.core.block_manager import BlockManager
from otvllm.core.model_runner import ModelRunner
from otvllm.core.resolved_config import resolve_config
from otvllm.core.scheduler import Scheduler
from otvllm.core.sequence import PENDING_TOKEN, Sequence
from otvllm.models.spec import model_spec, read_config
from otvllm.sampling_params import SamplingParams
from otvllm.tracing.level import TraceLevel

MAX_MODEL_LEN = 256


def reference_inputs(batch, previous_tokens: torch.Tensor | None, block_size: int) -> dict:
    """What prepare must produce, one token at a time."""
    ids, positions, slots, context_lens, cu_q, cu_k, last = [], [], [], [], [0], [0], []
    for seq, num_tokens in zip(batch.seqs, batch.query_lens):
        start = seq.num_computed_tokens
        for pos in range(start, start + num_tokens):
            token = seq.token_ids[pos]
            if token == PENDING_TOKEN:   # sampled by the step in flight
                assert pos == seq.num_tokens - 1
                token = int(previous_tokens[seq.pending_row])
            ids.append(token)
            positions.append(pos)
            slots.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
        context_lens.append(start + num_tokens)
        cu_q.append(cu_q[-1] + num_tokens)
        cu_k.append(cu_k[-1] + start + num_tokens)
        if start + num_tokens == seq.num_tokens:
            last.append(cu_q[-1] - 1)
    width = max(len(s.block_table) for s in batch.seqs)
    tables = [s.block_table + [-1] * (width - len(s.block_table)) for s in batch.seqs]
    expected = {
        "input_ids": torch.tensor(ids, dtype=torch.int64),
        "positions": torch.tensor(positions, dtype=torch.int64),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
        "block_tables": torch.tensor(tables, dtype=torch.int32),
        "context_lens": torch.tensor(context_lens, dtype=torch.int32),
    }
    if batch.num_prefill_tokens:
        expected.update(cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
                        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
                        logits_indices=torch.tensor(last, dtype=torch.int64),
                        max_seqlen_q=max(batch.query_lens))
    else:
        expected.update(max_context_len=max(context_lens))
    return expected


def actual_inputs(inputs) -> dict:
    ctx = inputs.ctx
    actual = {"input_ids": inputs.input_ids, "positions": inputs.positions, "slot_mapping": ctx.slot_mapping,
              "block_tables": ctx.block_tables, "context_lens": ctx.context_lens}
    if ctx.is_prefill:
        actual.update(cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=ctx.cu_seqlens_k,
                      logits_indices=inputs.logits_indices, max_seqlen_q=ctx.max_seqlen_q)
    else:
        assert inputs.logits_indices is None
        actual.update(max_context_len=ctx.max_context_len)
    return actual


def assert_same(actual: dict, expected: dict, device: str, step: int) -> None:
    assert actual.keys() == expected.keys(), step
    for name, want in expected.items():
        got = actual[name]
        if isinstance(want, int):
            assert got == want, (step, name)
            continue
        assert got.dtype == want.dtype, (step, name, got.dtype)
        assert got.device.type == device, (step, name, got.device)
        assert torch.equal(got.cpu(), want), (step, name, got.tolist(), want.tolist())


def make_runner(model_dir: str, block_size: int, device: str) -> ModelRunner:
    """A model runner without weights: prepare needs none."""
    arch, hf_config = read_config(model_dir)
    spec = model_spec(arch, hf_config)
    config = EngineConfig(model=model_dir, device=device, kvcache_block_size=block_size, max_model_len=MAX_MODEL_LEN)
    return ModelRunner(resolve_config(config, spec, TraceLevel.OFF, device), spec)


def assert_aligned(inputs, step: int) -> None:
    """Every tensor the kernels read starts on a 16-byte boundary: Triton compiles a kernel
    variant per pointer alignment, so an alignment that varies by batch would compile mid-run."""
    ctx = inputs.ctx
    tensors = {"input_ids": inputs.input_ids, "positions": inputs.positions, "slot_mapping": ctx.slot_mapping,
               "block_tables": ctx.block_tables, "context_lens": ctx.context_lens,
               "cu_seqlens_q": ctx.cu_seqlens_q, "cu_seqlens_k": ctx.cu_seqlens_k}
    for name, t in tensors.items():
        assert t is None or t.data_ptr() % 16 == 0, f"step {step}: {name} at {t.data_ptr() % 16} bytes past 16"


def random_workload(rng: random.Random, block_size: int) -> list[Sequence]:
    """Prompts, many of them continuing a few shared prefixes (cache hits at admission)."""
    prefixes = [[rng.randrange(256) for _ in range(rng.randint(1, 3 * block_size))] for _ in range(3)]
    seqs = []
    for _ in range(14):
        head = rng.choice(prefixes) if rng.random() < 0.7 else []
        prompt = head + [rng.randrange(256) for _ in range(rng.randint(1, 70))]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 40), ignore_eos=True)
        seqs.append(Sequence(prompt, params, block_size))
    return seqs


ON_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])   # on CUDA: through pinned buffers, asynchronous copies
@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_prepare_equals_the_per_token_reference_on_random_workloads(qwen3_dir, block_size, device):
    runner = make_runner(qwen3_dir, block_size, device)
    phases, cache_hits, pending_in_prefill, preemptions = set(), 0, 0, 0
    for seed in range(3):
        rng = random.Random(seed * 100 + block_size)
        # Few blocks and a small token budget: chunked prompts, mixed steps and preemptions.
        num_blocks = -(-MAX_MODEL_LEN // block_size)
        manager = BlockManager(num_blocks, block_size)
        scheduler = Scheduler(max_num_seqs=6, max_num_batched_tokens=rng.choice([24, 48, 96]),
                              max_model_len=MAX_MODEL_LEN, block_manager=manager, eos_token_ids=set())
        for seq in random_workload(rng, block_size):
            scheduler.add(seq)
        in_flight = None   # (batch, the tokens it sampled), as the engine keeps it
        step = 0
        while not scheduler.is_finished() or in_flight is not None:
            batch = scheduler.schedule()
            launched = None
            if batch.seqs:
                previous = in_flight[1] if in_flight is not None else None
                expected = reference_inputs(batch, previous, block_size)
                inputs = runner.prepare(batch, previous)
                assert_same(actual_inputs(inputs), expected, device, step)
                assert_aligned(inputs, step)
                phases.add(batch.phase)
                cache_hits += batch.num_cached_tokens
                pending_in_prefill += batch.num_prefill_tokens > 0 and any(
                    s.pending_row >= 0 for s in batch.seqs)
                launched = (batch, torch.randint(0, 256, (len(batch.sampled_seqs),), device=device))
                scheduler.reserve_tokens(batch)
            if in_flight is not None:
                scheduler.postprocess(in_flight[0], in_flight[1].tolist())
            in_flight = launched
            step += 1
        preemptions += scheduler.num_preemptions
    # The workloads did exercise what the test is about.
    assert phases == {"prefill", "decode", "mixed"}
    assert cache_hits > 0 and pending_in_prefill > 0 and preemptions > 0
