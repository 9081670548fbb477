"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples."""

from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch

from otvllm.core.bias_inputs import BiasInputs
from otvllm.core.cuda_graphs import DecodeGraphs, PrefillGraphs
from otvllm.core.gemv_choice import choose_gemv
from otvllm.core.penalty_inputs import PenaltyInputs
from otvllm.core.resolved_config import ResolvedConfig
from otvllm.core.scheduler import ScheduledBatch
from otvllm.core.sequence import Sequence
from otvllm.layers.attention import ForwardContext
from otvllm.layers.basic import Kernels, use_kernels
from otvllm.layers.parallel import TensorParallel
from otvllm.layers.sampler import Sampler, SampleResult, SamplingBatch, token_logprobs
from otvllm.models.loader import build_model
from otvllm.models.spec import ModelSpec
from otvllm.ops.backend import AttentionBackend, triton_available
from otvllm.ops.query_tiles import query_tiles
from otvllm.sampling_params import SamplingParams

CPU_KV_CACHE_BUDGET = 512 << 20  # bytes: the default CPU cache never grows past this
# prompt_logprobs: logits rows computed at once. At Qwen3's vocabulary 256 rows take 78 MB in
# bf16 and 0.3 GB as the float32 log-softmax and its input; a whole chunk of 16,384 prompt tokens
# would take 5 GB of logits alone, beside the memory start-up planned.
PROMPT_LOGITS_ROWS = 256
_WARMUP_PARAMS = SamplingParams(temperature=0.0, max_tokens=1)


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: ForwardContext
    logits_indices: torch.Tensor | None  # prefill path: the last token of each row that samples
    sampling: SamplingBatch | None       # None: no row samples
    phase: str = "decode"                # the step's: prefill, decode or mixed
    # prompt_logprobs: the tokens whose logits predict a prompt token (every rank computes their
    # logits), the tokens they predict, each owner (sequence, position of its first such token,
    # how many) in row order, and what `forward` makes of them (token_logprobs', on rank 0)
    prompt_rows: torch.Tensor | None = None
    prompt_targets: torch.Tensor | None = None
    prompt_owners: list[tuple[Sequence, int, int]] = field(default_factory=list)
    prompt_top_n: int = 0
    prompt_logprobs: tuple | None = None


_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32}


def aligned_numel(numel: int, itemsize: int) -> int:
    """The elements a tensor of `numel` takes where tensors are packed one after another, each
    starting on a 16-byte boundary: Triton specialises a kernel on its pointers' alignment, and an
    offset that varied with the batch would compile a new variant mid-run (about a second each)."""
    align = max(1, 16 // itemsize)
    return -(-numel // align) * align


def block_table_array(seqs: list[Sequence]) -> np.ndarray:
    """The sequences' block tables as one [num_seqs, longest table] int32 array, padded with -1."""
    lengths = np.fromiter((len(s.block_table) for s in seqs), np.int64, len(seqs))
    flat = np.fromiter(chain.from_iterable(s.block_table for s in seqs), np.int32, int(lengths.sum()))
    tables = np.full((len(seqs), int(lengths.max())), -1, dtype=np.int32)
    tables[np.arange(tables.shape[1]) < lengths[:, None]] = flat
    return tables


class ModelRunner:
    def __init__(self, config: ResolvedConfig, spec: ModelSpec, rank: int = 0,
                 eos_token_ids: set[int] = frozenset()):
        """`rank`: this runner's place among config.tensor_parallel_size ranks (core/parallel.py);
        `eos_token_ids`: the tokens that end an output, which min_tokens bans (rank 0 samples)."""
        self.config = config
        self.spec = spec
        self.tp = TensorParallel(rank, config.tensor_parallel_size)
        self.num_kv_heads = spec.num_kv_heads // self.tp.size   # this rank's share of the KV cache
        self.device = config.torch_device
        self.block_size = config.kvcache_block_size
        self.dtype = config.torch_dtype
        self.backend = AttentionBackend(config.attention_backend)
        self.sampler = Sampler(compiled=config.torch_compile)
        self.bias_inputs = BiasInputs(eos_token_ids, self.device)
        self.penalty_inputs = PenaltyInputs(spec.vocab_size, self.device)
        self.model = None
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        # the Triton prefill's tokens per work-list entry (ops/query_tiles.py); None elsewhere
        self.tokens_per_tile = self.backend.tokens_per_tile(spec.num_heads // self.tp.size, self.num_kv_heads,
                                                            spec.head_dim, self.dtype, self.device)
        self.kv_cache: torch.Tensor | None = None
        self.num_kvcache_blocks = 0
        self.gemv_choice: dict[str, list[int]] = {}   # projection -> token counts on the Triton GEMV
        self.programmatic_launch = False   # whether the decode step's Triton kernels launch with PDL

    # ---- start-up -------------------------------------------------------------------------

    def load_model(self) -> None:
        self.model = build_model(self.spec, self.config.model, self.dtype, self.device,
                                 max_positions=self.config.max_model_len, tp=self.tp)
        for layer in self.model.attention_layers():
            layer.backend = self.backend
        self.model.fuse_norm_rope_store(self.backend.norm_rope_store)
        if self.config.torch_compile:
            use_kernels(self.model, Kernels.compiled())
        if self.config.torch_compile and self.tp.rank == 0:   # only rank 0 samples
            self.sampler.warm_up(self.spec.vocab_size, self.dtype, self.device)

    def capture_cuda_graphs(self) -> None:
        cfg = self.config
        max_blocks_per_seq = -(-cfg.max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, min(cfg.max_num_seqs, cfg.cudagraph_max_batch_size),
                                   max_blocks_per_seq, cfg.max_model_len, self.spec.hidden_size, self.dtype, self.device)
        self.gemv_choice = choose_gemv(self.model.model.layers, self.graphs.sizes)   # before capture: graphs keep it
        if triton_available():
            from otvllm.ops import pdl
            self.programmatic_launch = pdl.enabled(self.device)
        pool = None
        if cfg.cudagraph_max_prefill_tokens:   # first: the largest activations, which the decodes' pool reuses
            self.prefill_graphs = PrefillGraphs(self.model, cfg.cudagraph_max_prefill_tokens, cfg.max_num_seqs,
                                                max_blocks_per_seq, self.tokens_per_tile, self.spec.hidden_size,
                                                self.dtype, self.device)
            pool = self.prefill_graphs.capture()
        self.graphs.capture(pool)

    @property
    def parameter_bytes(self) -> int:
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        return sum(seen.values())

    @property
    def block_bytes(self) -> int:
        s = self.spec
        return 2 * s.num_layers * self.block_size * self.num_kv_heads * s.head_dim * self.dtype.itemsize

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (2, s.num_layers, num_blocks, self.block_size, self.num_kv_heads, s.head_dim)

    def plan_num_kvcache_blocks(self) -> int:
        """The blocks to allocate, also kept in num_kvcache_blocks (an allocation that fails
        reports what it tried)."""
        self.num_kvcache_blocks = self._num_kvcache_blocks()
        return self.num_kvcache_blocks

    def _num_kvcache_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kvcache_blocks is not None:
            return cfg.num_kvcache_blocks
        if self.device.type == "cuda":
            return self._blocks_that_fit_gpu()
        per_seq = -(-cfg.max_model_len // self.block_size)
        return max(per_seq, min(cfg.max_num_seqs * per_seq, CPU_KV_CACHE_BUDGET // self.block_bytes))

    def _blocks_that_fit_gpu(self) -> int:
        """Blocks that fit in this engine's share of the device (gpu_memory_utilization of its
        total) next to the weights and the activations' peak, measured by a warm-up forward at
        the largest prefill and the sampler at its largest; never more than the device has free."""
        device = self.device
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        self.warmup()
        activations = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = total * self.config.gpu_memory_utilization - self.parameter_bytes
        available = min(budget, free) - activations
        return max(0, int(available // self.block_bytes))

    def warmup(self) -> None:
        """One prefill of max_num_batched_tokens tokens without a cache, then (where this rank
        samples) the sampling of the most rows with every option: to measure peak activations."""
        cfg = self.config
        num_seqs = min(cfg.max_num_seqs, max(1, cfg.max_num_batched_tokens // cfg.max_model_len))
        seq_len = min(cfg.max_model_len, cfg.max_num_batched_tokens // num_seqs)
        batch = ScheduledBatch([])
        for _ in range(num_seqs):
            seq = Sequence([0] * seq_len, _WARMUP_PARAMS, self.block_size)
            seq.block_table = [0] * seq.num_blocks   # all in the one dummy block, freed afterwards
            batch.add_chunk(seq, seq_len)
        self._allocate_dummy_cache()
        self.run(batch)
        self.kv_cache = None
        if self.tp.rank == 0:
            self._sample_at_most()
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _sample_at_most(self) -> None:
        """The sampler over max_num_seqs rows, each with every option that allocates (penalties,
        a logit bias, min_tokens, top-k, top-p, min-p, the most logprobs), and one slice of prompt
        rows' log-probabilities: a decode step of many such requests allocates this much (a
        [rows, vocab] float32 tensor per stage, about 1 GB at 256 rows of Qwen3's vocabulary),
        which the warm-up prefill alone does not."""
        cfg, vocab = self.config, self.spec.vocab_size
        most_logprobs = min(cfg.max_logprobs, vocab)
        params = SamplingParams(temperature=1.0, top_k=2, top_p=0.5, min_p=0.1, presence_penalty=0.5,
                                frequency_penalty=0.5, repetition_penalty=1.5, min_tokens=1, logit_bias={0: 1.0},
                                logprobs=most_logprobs, max_tokens=2)
        seqs = [Sequence([0, 1], params, self.block_size) for _ in range(cfg.max_num_seqs)]
        batch = SamplingBatch.from_params([params] * len(seqs), [2] * len(seqs), vocab, self.device)
        batch.bias, batch.penalties = self.bias_inputs(seqs), self.penalty_inputs(seqs, None)
        self.sampler(torch.zeros(len(seqs), vocab, dtype=self.dtype, device=self.device), batch)
        rows = torch.zeros(PROMPT_LOGITS_ROWS, dtype=torch.int64, device=self.device)
        token_logprobs(torch.zeros(PROMPT_LOGITS_ROWS, vocab, dtype=self.dtype, device=self.device), rows,
                       most_logprobs)

    def _allocate_dummy_cache(self) -> None:
        # One block per layer so that the attention reads have a tensor to index.
        self.bind_kv_cache(torch.zeros(self.kv_cache_shape(1), dtype=self.dtype, device=self.device))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_kvcache_blocks = num_blocks
        # Zeroed on the GPU: some kernels read the unused rows of a partly filled block, which must
        # be finite. The CPU reference reads only valid rows, so its pages are touched lazily.
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        self.bind_kv_cache(alloc(self.kv_cache_shape(num_blocks), dtype=self.dtype, device=self.device))

    def bind_kv_cache(self, cache: torch.Tensor) -> None:
        self.kv_cache = cache
        for i, layer in enumerate(self.model.attention_layers()):
            layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]

    # ---- one step -------------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch, previous_tokens: torch.Tensor | None = None) -> ModelInputs:
        """`previous_tokens`: the sampled tokens of the step still in flight, where the last
        token of a sequence with a `pending_row` is read from. A step with prompt chunks takes
        the prefill path, its decodes as one-token queries; decode-only steps the decode path."""
        if batch.num_prefill_tokens:
            inputs = self._prepare_prefill(batch, previous_tokens)
        else:
            inputs = self._prepare_decode(batch.seqs, previous_tokens)
        inputs.phase = batch.phase
        sampled = batch.sampled_seqs
        if sampled:
            inputs.sampling = SamplingBatch.from_params([s.params for s in sampled], [len(s) for s in sampled],
                                                        self.spec.vocab_size, self.device)
            inputs.sampling.bias = self.bias_inputs(sampled)
            inputs.sampling.penalties = self.penalty_inputs(sampled, previous_tokens)
        return inputs

    def _upload(self, arrays: list[tuple[np.ndarray, torch.dtype]]) -> list[torch.Tensor]:
        """Each (array, dtype), flattened, as a tensor of that dtype on the device: one host buffer
        (pinned, for an asynchronous copy) and one copy for all of them, each aligned
        (`aligned_numel`)."""
        sizes = [aligned_numel(a.size, dtype.itemsize) * dtype.itemsize for a, dtype in arrays]
        starts = np.cumsum([0] + sizes).tolist()
        host = torch.empty(starts[-1], dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        flat = host.numpy()
        for (a, dtype), start in zip(arrays, starts):
            flat[start:start + a.size * dtype.itemsize].view(_NUMPY_DTYPES[dtype])[:] = a.ravel()
        device = host.to(self.device, non_blocking=True)
        return [device[start:start + a.size * dtype.itemsize].view(dtype) for (a, dtype), start in zip(arrays, starts)]

    def _prepare_prefill(self, batch: ScheduledBatch, previous_tokens: torch.Tensor | None) -> ModelInputs:
        bs = self.block_size
        seqs = batch.seqs
        n = len(seqs)
        query_lens = np.array(batch.query_lens, dtype=np.int64)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, n)
        ends = starts + query_lens
        cu_q = np.concatenate(([0], np.cumsum(query_lens)))
        cu_k = np.concatenate(([0], np.cumsum(ends)))
        num_tokens = int(cu_q[-1])
        input_ids = np.fromiter(chain.from_iterable(s.token_ids[a:b] for s, a, b in
                                                    zip(seqs, starts.tolist(), ends.tolist())), np.int64, num_tokens)
        row = np.repeat(np.arange(n), query_lens)   # each token's row
        positions = np.arange(num_tokens) - (cu_q[:-1] - starts)[row]
        tables = block_table_array(seqs)
        slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs
        samples = ends == np.fromiter((s.num_tokens for s in seqs), np.int64, n)
        last = cu_q[1:][samples] - 1
        owners, prompt_rows, prompt_targets = _prompt_logit_rows(seqs, starts, ends, cu_q)
        # Sampling rows whose input token is still on the device, sampled by the step in flight.
        pending_rows = np.fromiter((s.pending_row for s in seqs), np.int64, n)[samples]
        pending = pending_rows >= 0
        tiles = (query_tiles(query_lens, starts, self.tokens_per_tile) if self.tokens_per_tile
                 else np.zeros(0, np.int64))
        # positions first: at offset 0 always, which torch.compile's guards on the rotary see
        (positions, input_ids, slots, last, pending_at, pending_rows, tiles, prompt_rows, prompt_targets,
         cu_q, cu_k, context_lens, tables) = self._upload(
            [(a, torch.int64) for a in (positions, input_ids, slots, last, last[pending], pending_rows[pending], tiles,
                                        prompt_rows, prompt_targets)] +
            [(a, torch.int32) for a in (cu_q, cu_k, ends, tables)])
        if pending.any():
            input_ids[pending_at] = previous_tokens[pending_rows]
        ctx = ForwardContext(
            is_prefill=True,
            slot_mapping=slots,
            block_tables=tables.view(n, -1),
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            context_lens=context_lens,
            max_seqlen_q=max(batch.query_lens),
            query_tiles=tiles if self.tokens_per_tile else None,
        )
        inputs = ModelInputs(input_ids, positions, ctx, last, sampling=None)
        if owners:
            inputs.prompt_rows, inputs.prompt_targets, inputs.prompt_owners = prompt_rows, prompt_targets, owners
            inputs.prompt_top_n = max(seq.params.prompt_logprobs for seq, _, _ in owners)
        return inputs

    def _prepare_decode(self, seqs: list[Sequence], previous_tokens: torch.Tensor | None) -> ModelInputs:
        bs = self.block_size
        n = len(seqs)
        context_lens = np.fromiter((s.num_tokens for s in seqs), np.int64, n)
        last_tokens = np.fromiter((s.last_token for s in seqs), np.int64, n)
        pending_rows = np.fromiter((s.pending_row for s in seqs), np.int64, n)
        positions = context_lens - 1
        tables = block_table_array(seqs)
        slots = tables[np.arange(n), positions // bs].astype(np.int64) * bs + positions % bs
        max_context_len, any_pending = int(context_lens.max()), pending_rows.max() >= 0
        positions, input_ids, slots, rows, context_lens, tables = self._upload(
            [(a, torch.int64) for a in (positions, last_tokens, slots, pending_rows)] +
            [(a, torch.int32) for a in (context_lens, tables)])
        if any_pending:   # last tokens still on the device: gather them from the step in flight
            input_ids = torch.where(rows >= 0, previous_tokens[rows.clamp(min=0)], input_ids)
        ctx = ForwardContext(
            is_prefill=False,
            slot_mapping=slots,
            block_tables=tables.view(n, -1),
            context_lens=context_lens,
            max_context_len=max_context_len,
        )
        return ModelInputs(input_ids, positions, ctx, None, sampling=None)

    @torch.inference_mode()
    def forward(self, inputs: ModelInputs) -> tuple[torch.Tensor, bool]:
        """Logits of the token each sequence samples next ([num_seqs, vocab_size]), and whether
        a CUDA graph was replayed; with prompt rows, also their inputs.prompt_logprobs."""
        ctx = inputs.ctx
        graphs = self.prefill_graphs if ctx.is_prefill else self.graphs
        use_graph = graphs is not None and graphs.fits(len(inputs.input_ids), ctx)
        if use_graph:
            hidden = graphs.run(inputs.input_ids, inputs.positions, ctx)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        if inputs.prompt_rows is not None:
            inputs.prompt_logprobs = self._prompt_logprobs(hidden, inputs)
        if inputs.logits_indices is not None:
            hidden = hidden[inputs.logits_indices]
        return self.model.compute_logits(hidden), use_graph

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: ModelInputs) -> tuple | None:
        """token_logprobs() of the prompt rows, PROMPT_LOGITS_ROWS at a time (on rank 0; every
        rank computes each slice's logits, the output head being split by vocabulary)."""
        parts = []
        rows = inputs.prompt_rows
        for a in range(0, len(rows), PROMPT_LOGITS_ROWS):
            logits = self.model.compute_logits(hidden[rows[a:a + PROMPT_LOGITS_ROWS]])
            if logits is not None:
                parts.append(token_logprobs(logits, inputs.prompt_targets[a:a + PROMPT_LOGITS_ROWS],
                                            inputs.prompt_top_n))
        if not parts:
            return None
        return tuple(torch.cat(p) if p[0] is not None else None for p in zip(*parts))

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, inputs: ModelInputs) -> SampleResult:
        """The sampled rows' tokens, with the prompt rows' log-probabilities `forward` computed."""
        if inputs.sampling is None:
            result = SampleResult(torch.empty(0, dtype=torch.int64, device=logits.device), None, None, None)
        else:
            result = self.sampler(logits, inputs.sampling)
        if inputs.prompt_owners:
            result.prompt, result.prompt_owners = inputs.prompt_logprobs, inputs.prompt_owners
        return result.copy_to_host()

    def run(self, batch: ScheduledBatch) -> SampleResult | None:
        """Prepare, forward and sample on this runner alone (None on a rank that does not sample)."""
        inputs = self.prepare(batch)
        logits = self.forward(inputs)[0]
        return self.sample(logits, inputs) if logits is not None else None


def _prompt_logit_rows(seqs: list[Sequence], starts: np.ndarray, ends: np.ndarray,
                       cu_q: np.ndarray) -> tuple[list, np.ndarray, np.ndarray]:
    """For the sequences that want their prompt's log-probabilities: the rows of this step's
    tokens whose logits predict a prompt token (position p predicts token p + 1; the prompt's
    last position predicts the first output, which the sampled row covers), as (owners, rows,
    target tokens)."""
    owners, rows, targets = [], [], []
    for i, seq in enumerate(seqs):
        if not seq.needs_prompt_logits:
            continue
        start, stop = int(starts[i]), min(int(ends[i]), seq.num_prompt_tokens - 1)
        if start < stop:
            owners.append((seq, start + 1, stop - start))
            rows.append(np.arange(cu_q[i], cu_q[i] + stop - start))
            targets.append(seq.token_ids[start + 1:stop + 1])
    if not owners:
        return [], np.zeros(0, np.int64), np.zeros(0, np.int64)
    return owners, np.concatenate(rows), np.fromiter(chain.from_iterable(targets), np.int64)

