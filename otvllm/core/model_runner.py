"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples."""

from dataclasses import dataclass

import torch

from otvllm.core.cuda_graphs import DecodeGraphs
from otvllm.core.resolved_config import ResolvedConfig
from otvllm.core.scheduler import ScheduledBatch
from otvllm.core.sequence import Sequence
from otvllm.layers.attention import ForwardContext
from otvllm.layers.basic import Kernels, use_kernels
from otvllm.layers.sampler import Sampler, SampleResult, SamplingBatch
from otvllm.models.loader import build_model
from otvllm.models.spec import ModelSpec
from otvllm.ops.backend import AttentionBackend
from otvllm.sampling_params import SamplingParams

CPU_KV_CACHE_BUDGET = 512 << 20  # bytes: the default CPU cache never grows past this
_WARMUP_PARAMS = SamplingParams(temperature=0.0, max_tokens=1)


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: ForwardContext
    logits_indices: torch.Tensor | None  # prefill path: the last token of each row that samples
    sampling: SamplingBatch | None       # None: no row samples
    phase: str = "decode"                # the step's: prefill, decode or mixed


class ModelRunner:
    def __init__(self, config: ResolvedConfig, spec: ModelSpec):
        self.config = config
        self.spec = spec
        self.device = config.torch_device
        self.block_size = config.kvcache_block_size
        self.dtype = config.torch_dtype
        self.backend = AttentionBackend(config.attention_backend)
        self.sampler = Sampler(compiled=config.torch_compile)
        self.model = None
        self.graphs: DecodeGraphs | None = None
        self.kv_cache: torch.Tensor | None = None
        self.num_kvcache_blocks = 0

    # ---- start-up -------------------------------------------------------------------------

    def load_model(self) -> None:
        self.model = build_model(self.spec, self.config.model, self.dtype, self.device,
                                 max_positions=self.config.max_model_len)
        for layer in self.model.attention_layers():
            layer.backend = self.backend
        if self.config.torch_compile:
            use_kernels(self.model, Kernels.compiled())
            self.sampler.warm_up(self.spec.vocab_size, self.dtype, self.device)

    def capture_cuda_graphs(self) -> None:
        cfg = self.config
        self.graphs = DecodeGraphs(self.model, min(cfg.max_num_seqs, cfg.cudagraph_max_batch_size),
                                   -(-cfg.max_model_len // self.block_size), cfg.max_model_len,
                                   self.spec.hidden_size, self.dtype, self.device)
        self.graphs.capture()

    @property
    def parameter_bytes(self) -> int:
        seen = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        return sum(seen.values())

    @property
    def block_bytes(self) -> int:
        s = self.spec
        return 2 * s.num_layers * self.block_size * s.num_kv_heads * s.head_dim * self.dtype.itemsize

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        s = self.spec
        return (2, s.num_layers, num_blocks, self.block_size, s.num_kv_heads, s.head_dim)

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
        the largest prefill; never more than the device has free."""
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
        """One prefill of max_num_batched_tokens tokens without a cache, to measure peak activations."""
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
        torch.cuda.synchronize(self.device)

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
        inputs.sampling = SamplingBatch.from_params([s.params for s in sampled], [len(s) for s in sampled],
                                                    self.spec.vocab_size, self.device) if sampled else None
        return inputs

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [-1] * (width - len(s.block_table)) for s in seqs]
        return self._to_device(rows, torch.int32)

    def _to_device(self, values, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

    def _prepare_prefill(self, batch: ScheduledBatch, previous_tokens: torch.Tensor | None) -> ModelInputs:
        bs = self.block_size
        input_ids, positions, slots, context_lens = [], [], [], []
        cu_q, cu_k, last = [0], [0], []
        pending, pending_rows = [], []   # decode rows whose input token is still on the device
        for seq, num_tokens in zip(batch.seqs, batch.query_lens):
            start = seq.num_computed_tokens
            end = start + num_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            cu_q.append(cu_q[-1] + num_tokens)
            cu_k.append(cu_k[-1] + end)
            context_lens.append(end)
            if end == seq.num_tokens:   # it samples
                last.append(cu_q[-1] - 1)
                if seq.pending_row >= 0:
                    pending.append(cu_q[-1] - 1)
                    pending_rows.append(seq.pending_row)
            for i in range(start // bs, (end + bs - 1) // bs):
                lo, hi = max(start, i * bs), min(end, (i + 1) * bs)
                base = seq.block_table[i] * bs - i * bs
                slots.extend(range(base + lo, base + hi))
        ctx = ForwardContext(
            is_prefill=True,
            slot_mapping=self._to_device(slots, torch.int64),
            block_tables=self._block_tables(batch.seqs),
            cu_seqlens_q=self._to_device(cu_q, torch.int32),
            cu_seqlens_k=self._to_device(cu_k, torch.int32),
            context_lens=self._to_device(context_lens, torch.int32),
            max_seqlen_q=max(batch.query_lens),
        )
        input_ids = self._to_device(input_ids, torch.int64)
        if pending:
            input_ids[self._to_device(pending, torch.int64)] = previous_tokens[self._to_device(pending_rows,
                                                                                              torch.int64)]
        return ModelInputs(input_ids, self._to_device(positions, torch.int64),
                           ctx, self._to_device(last, torch.int64), sampling=None)

    def _prepare_decode(self, seqs: list[Sequence], previous_tokens: torch.Tensor | None) -> ModelInputs:
        bs = self.block_size
        n = len(seqs)
        width = max(len(s.block_table) for s in seqs)
        # One host buffer, one copy to the device:
        # [tokens | positions | slots | context lens | pending rows | block tables].
        flat = [s.last_token for s in seqs]
        context_lens = [s.num_tokens for s in seqs]
        flat += [c - 1 for c in context_lens]
        flat += [s.block_table[-1] * bs + (s.num_tokens - 1) % bs for s in seqs]
        flat += context_lens
        rows = [s.pending_row for s in seqs]
        flat += rows
        for s in seqs:
            flat += s.block_table
            flat += [-1] * (width - len(s.block_table))
        buf = self._to_device(flat, torch.int64)
        input_ids = buf[:n]
        if max(rows) >= 0:   # last tokens still on the device: gather them from the step in flight
            rows_d = buf[4 * n:5 * n]
            input_ids = torch.where(rows_d >= 0, previous_tokens[rows_d.clamp(min=0)], input_ids)
        ctx = ForwardContext(
            is_prefill=False,
            slot_mapping=buf[2 * n:3 * n],
            block_tables=buf[5 * n:].view(n, width).to(torch.int32),
            context_lens=buf[3 * n:4 * n].to(torch.int32),
            max_context_len=max(context_lens),
        )
        return ModelInputs(input_ids, buf[n:2 * n], ctx, None, sampling=None)

    @torch.inference_mode()
    def forward(self, inputs: ModelInputs) -> tuple[torch.Tensor, bool]:
        """Logits of the token each sequence samples next ([num_seqs, vocab_size]), and whether
        a CUDA graph was replayed."""
        ctx = inputs.ctx
        graphs = self.graphs
        use_graph = (graphs is not None and not ctx.is_prefill
                     and graphs.fits(len(inputs.input_ids), ctx.block_tables.shape[1]))
        if use_graph:
            hidden = graphs.run(inputs.input_ids, inputs.positions, ctx)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        if inputs.logits_indices is not None:
            hidden = hidden[inputs.logits_indices]
        return self.model.compute_logits(hidden), use_graph

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, inputs: ModelInputs) -> SampleResult:
        return self.sampler(logits, inputs.sampling).copy_to_host()

    def run(self, batch: ScheduledBatch) -> SampleResult:
        inputs = self.prepare(batch)
        return self.sample(self.forward(inputs)[0], inputs)

