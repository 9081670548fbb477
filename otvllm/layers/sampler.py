"""Token sampling on the logits' device: logit biases (with min_tokens' ban on ending tokens),
presence, frequency and repetition penalties, greedy, temperature, min-p, top-k, top-p,
per-request seeds, and the top-N log-probabilities of each chosen token (of the model's own
distribution, before biases, penalties and temperature, as vLLM reports them)."""

from dataclasses import dataclass, field

import torch


@dataclass
class LogitBias:
    """Additions to single logits, on the device (core/bias_inputs.py builds it from the
    sequences): requests' logit_bias, and -inf on the tokens that would end a request still short
    of its min_tokens. Applied first, as vLLM does, so the penalties and greedy see them."""

    pairs: torch.Tensor    # [2, N] int64: (batch row, token id)
    values: torch.Tensor   # [N] float32
    num_rows: int          # the rows with any, for the trace

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits, in float32, with the additions (a new tensor)."""
        out = logits.to(torch.float32, copy=True)
        return out.index_put_((self.pairs[0], self.pairs[1]), self.values, accumulate=True)


@dataclass
class Penalties:
    """The penalties of the rows that have any, and the tokens they apply to, on the device
    (core/penalty_inputs.py builds it from the sequences). Tokens are (penalised row, token id)
    pairs, a column each."""

    rows: torch.Tensor               # [P] int64: the batch rows with penalties
    presence: torch.Tensor           # [P, 1] float32
    frequency: torch.Tensor          # [P, 1] float32
    repetition: torch.Tensor | None  # [P, 1] float32, None when no row has one
    outputs: torch.Tensor            # [2, N] int64: the output tokens known on the host
    in_flight: torch.Tensor | None   # [2, K] int64: last output tokens still on the device
    prompts: torch.Tensor | None     # [2, M] int64: the prompts' tokens, for the repetition penalty

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits, in float32, with each penalised row's penalties applied (a new tensor)."""
        counts = torch.zeros(len(self.rows), logits.shape[1], dtype=torch.float32, device=logits.device)
        for pairs in (self.outputs, self.in_flight):
            if pairs is not None:
                counts.index_put_((pairs[0], pairs[1]), torch.ones(pairs.shape[1], device=logits.device),
                                  accumulate=True)
        present = counts > 0
        scores = logits[self.rows].float()
        if self.repetition is not None:   # first, as vLLM: on the logits as the model gave them
            seen = present.index_put((self.prompts[0], self.prompts[1]), torch.tensor(True, device=logits.device))
            scores = torch.where(seen, torch.where(scores > 0, scores / self.repetition, scores * self.repetition),
                                 scores)
        scores = scores - self.frequency * counts - self.presence * present
        out = logits.to(torch.float32, copy=True)
        out[self.rows] = scores
        return out


@dataclass
class SamplingBatch:
    """The sampling settings of one step's rows, as tensors on the logits' device."""

    temperatures: torch.Tensor       # [B] float32, 0 for greedy rows
    top_ks: torch.Tensor | None      # [B] int64 (vocab size when disabled), None when no row uses top-k
    top_ps: torch.Tensor | None      # [B] float32, None when no row uses top-p
    min_ps: torch.Tensor | None      # [B] float32, None when no row uses min-p
    all_greedy: bool
    any_greedy: bool
    seeded_rows: list[tuple[int, int]]  # (row, seed for this row at this position)
    num_logprobs: int                # the largest `logprobs` asked for in the batch, 0 for none
    logprob_rows: list[tuple[int, int]]  # (row, N) for the rows that asked
    num_greedy: int                  # for the trace: the batch's sampling settings at a glance
    temperature_min: float
    temperature_max: float
    bias: LogitBias | None = None        # these two set by the runner, which knows the sequences
    penalties: Penalties | None = None

    @property
    def num_rows(self) -> int:
        return self.temperatures.shape[0]

    @classmethod
    def from_params(cls, params: list, positions: list[int], vocab_size: int,
                    device: torch.device) -> "SamplingBatch":
        """`params`: each row's SamplingParams; `positions`: the position of the token each row
        samples (its sequence's length), which seeds a seeded row."""
        temps = [p.temperature for p in params]
        use_top_k = any(p.top_k != -1 for p in params)
        use_top_p = any(p.top_p < 1.0 for p in params)
        use_min_p = any(p.min_p > 0 for p in params)
        logprob_rows = [(i, p.logprobs) for i, p in enumerate(params) if p.logprobs is not None]
        return cls(
            temperatures=torch.tensor(temps, dtype=torch.float32).to(device, non_blocking=True),
            top_ks=torch.tensor([min(p.top_k, vocab_size) if p.top_k != -1 else vocab_size for p in params]).to(device)
            if use_top_k else None,
            top_ps=torch.tensor([p.top_p for p in params], dtype=torch.float32).to(device) if use_top_p else None,
            min_ps=torch.tensor([p.min_p for p in params], dtype=torch.float32).to(device) if use_min_p else None,
            all_greedy=all(t == 0 for t in temps),
            any_greedy=any(t == 0 for t in temps),
            seeded_rows=[(i, _position_seed(p.seed, positions[i]))
                         for i, p in enumerate(params) if p.seed is not None and p.temperature > 0],
            num_logprobs=max((n for _, n in logprob_rows), default=0),
            logprob_rows=logprob_rows,
            num_greedy=temps.count(0),
            temperature_min=float(min(temps)),
            temperature_max=float(max(temps)),
        )


def _position_seed(seed: int, position: int) -> int:
    # A pure function of (seed, position): a preempted and recomputed request draws the same samples.
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) % (1 << 63)


@dataclass
class SampleResult:
    token_ids: torch.Tensor                  # [B] int64
    sampled_logprobs: torch.Tensor | None    # [B] float32
    top_logprobs: torch.Tensor | None        # [B, N] float32
    top_token_ids: torch.Tensor | None       # [B, N] int64
    # prompt_logprobs: token_logprobs() of the prompt rows, and their owners (the runner's)
    prompt: tuple | None = None
    prompt_owners: list = field(default_factory=list)
    _host: tuple | None = None
    _ready: torch.cuda.Event | None = None

    def copy_to_host(self) -> "SampleResult":
        """Queue the copies to pinned host memory right behind the sampling kernels. Reading
        them later waits for this step only: `.tolist()` on the device tensors would wait for
        every step launched since."""
        tensors = (self.token_ids, self.sampled_logprobs, self.top_logprobs, self.top_token_ids,
                   *(self.prompt or (None,) * 4))
        if self.token_ids.device.type != "cuda":
            self._host = tensors
            return self
        self._host = tuple(t.to("cpu", non_blocking=True) if t is not None else None for t in tensors)
        self._ready = torch.cuda.Event()
        self._ready.record()
        return self

    def on_host(self) -> bool:
        """Whether the sampled tokens have reached the host (always, on a device that runs synchronously)."""
        return self._ready is None or self._ready.query()

    def _on_host(self) -> tuple:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host

    def host_token_ids(self) -> list[int]:
        return self._on_host()[0].tolist()

    def host_logprobs(self) -> tuple[list, list | None, list | None]:
        """Sampled-token logprobs, top-N logprobs and top-N token ids, as lists."""
        return _lists(self._on_host()[1:4])

    def host_prompt_logprobs(self) -> tuple[list, list, list | None, list | None]:
        """The prompt rows' token logprobs, token ranks, top-N logprobs and top-N token ids, as lists."""
        return _lists(self._on_host()[4:])


def _lists(tensors) -> tuple:
    return tuple(t.tolist() if t is not None else None for t in tensors)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int, ranks: bool = True) -> tuple:
    """(log-probability of each row's token, its rank (1: the likeliest; None without `ranks`),
    the n likeliest log-probabilities, their ids), of the model's own distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])
    top = logprobs.topk(n, dim=-1) if n else None
    return (chosen.squeeze(1), (logprobs > chosen).sum(dim=-1) + 1 if ranks else None,
            top.values if top is not None else None, top.indices if top is not None else None)


def gumbel_max(logits: torch.Tensor, temperatures: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """A sample of softmax(logits / T) per row: argmax(logits / T + Gumbel noise). One pass over
    the logits, which torch.compile fuses into one kernel; `uniform` (in [0, 1)) for seeded rows."""
    if uniform is None:
        uniform = torch.rand_like(logits, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
    return (logits.float() / temperatures[:, None] + gumbel).argmax(dim=-1)


class Sampler:
    def __init__(self, compiled: bool = False):
        # Fused into one kernel by torch.compile, or the plain function.
        self.gumbel_max = torch.compile(gumbel_max, dynamic=True) if compiled else gumbel_max

    def warm_up(self, vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Compile the fused sampling kernel now for one row, two rows (any count from there on
        is one dynamic shape), on the model's logits and on float32 ones (what top-k, top-p and
        penalties hand it): torch.compile treats a size of 1 apart and specialises on the dtype,
        and each would otherwise compile in the middle of serving."""
        for logits_dtype in dict.fromkeys((dtype, torch.float32)):
            for rows in (1, 2):
                logits = torch.zeros(rows, vocab_size, dtype=logits_dtype, device=device)
                self.gumbel_max(logits, torch.ones(rows, device=device))

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
        scores = logits if batch.bias is None else batch.bias.apply(logits)
        if batch.penalties is not None:
            scores = batch.penalties.apply(scores)
        tokens = scores.argmax(dim=-1) if batch.all_greedy else self._sample(scores, batch)
        if not batch.logprob_rows:
            return SampleResult(tokens, None, None, None)
        chosen, _, values, ids = token_logprobs(logits, tokens, batch.num_logprobs, ranks=False)
        return SampleResult(tokens, chosen, values, ids)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        temps = torch.where(batch.temperatures > 0, batch.temperatures, 1.0)
        if batch.min_ps is not None or batch.top_ks is not None or batch.top_ps is not None:
            logits = logits.float() / temps[:, None]
            if batch.min_ps is not None:   # first, as vLLM: on the tempered distribution, before top-k/top-p
                logits = _filter_min_p(logits, batch.min_ps)
            if batch.top_ks is not None or batch.top_ps is not None:
                logits = _filter_top_k_top_p(logits, batch.top_ks, batch.top_ps)
            temps = torch.ones_like(temps)
        sampled = self.gumbel_max(logits, temps)
        for row, seed in batch.seeded_rows:
            gen = torch.Generator(device=logits.device).manual_seed(seed)
            uniform = torch.rand(1, logits.shape[1], device=logits.device, generator=gen)
            sampled[row] = gumbel_max(logits[row:row + 1], temps[row:row + 1], uniform)[0]
        return torch.where(batch.temperatures > 0, sampled, logits.argmax(dim=-1)) if batch.any_greedy else sampled


def _filter_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """-inf for the tokens less than min_p times as likely as the row's likeliest."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_ps[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))


def _filter_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor | None,
                        top_ps: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_ks is not None:
        drop |= rank >= top_ks[:, None]
    if top_ps is not None:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_ps[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
