from enum import Enum, auto
from itertools import count

from otvllm.sampling_params import SamplingParams

PENDING_TOKEN = -1   # a sampled token still on its way from the device


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, its KV blocks and its progress through the engine."""

    _ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, block_size: int):
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_tokens = len(self.token_ids)   # kept, not computed: the hot loops read it per step
        self.last_token = self.token_ids[-1]
        self.num_prompt_tokens = self.num_tokens
        self.num_cached_tokens = 0   # tokens whose KV came from the prefix cache at the last admission
        self.num_computed_tokens = 0   # tokens whose KV is in the cache or written by a launched step
        self.is_prefill = True       # its tokens since admission are not all computed yet (none sampled)
        # Row of the in-flight step's samples that holds the last token, -1 when it is known.
        self.pending_row = -1
        self.unhashed_block = -1     # a full block whose hash waits for its pending last token
        self.block_table: list[int] = []
        self.block_size = block_size
        self.params = params
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] = []
        # With params.prompt_logprobs: per prompt position, its token's entry and rank (None until
        # computed; always None for the first, which nothing predicts).
        wanted = params.prompt_logprobs is not None
        self.prompt_logprobs: list[dict[int, float] | None] | None = [None] * self.num_prompt_tokens if wanted else None
        self.prompt_ranks: list[int | None] | None = [None] * self.num_prompt_tokens if wanted else None
        self.num_preemptions = 0
        self.arrival_ns = 0
        self.first_scheduled_ns = 0
        self.first_token_ns = 0
        self.finished_ns = 0
        self.max_cached_tokens = 0   # the most tokens served from the prefix cache in one admission

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether its prompt's logits are still to be computed (then none of it comes from the prefix cache)."""
        entries = self.prompt_logprobs
        return entries is not None and len(entries) > 1 and entries[-1] is None

    @property
    def num_blocks(self) -> int:
        return (self.num_tokens + self.block_size - 1) // self.block_size

    def block(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.num_tokens += 1
        self.last_token = token_id

    def append_pending(self, row: int) -> int:
        """Reserve the place of the token that row `row` of the step just launched will sample;
        returns its index, for `resolve`."""
        self.append_token(PENDING_TOKEN)
        self.pending_row = row
        return self.num_tokens - 1

    def resolve(self, index: int, token_id: int) -> None:
        self.token_ids[index] = token_id
        if index == self.num_tokens - 1:   # no later step has reserved a place after it
            self.last_token = token_id
            self.pending_row = -1

    def drop_pending(self) -> None:
        """Forget the places of tokens that will never arrive (the request was aborted)."""
        n = self.num_tokens
        while self.token_ids[n - 1] == PENDING_TOKEN:
            n -= 1
        self.truncate(n)

    def truncate(self, num_tokens: int) -> None:
        """Drop the places reserved after a sequence finished."""
        del self.token_ids[num_tokens:]
        self.num_tokens = num_tokens
        self.last_token = self.token_ids[-1]
        self.pending_row = -1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def metrics(self) -> dict:
        ms = 1e-6
        return {
            "queue_time_ms": (self.first_scheduled_ns - self.arrival_ns) * ms,
            "time_to_first_token_ms": (self.first_token_ns - self.arrival_ns) * ms,
            "e2e_ms": (self.finished_ns - self.arrival_ns) * ms,
        }
