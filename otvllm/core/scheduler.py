"""Continuous batching with chunked prefill, under a token budget per step (decode first):
every running sequence past its prefill decodes one token (preempting the newest when blocks
run out), then prompt chunks fill what is left of max_num_batched_tokens: those of prompts
admitted earlier, then those of waiting prompts admitted now when blocks allow. A long prompt
is so computed over several steps while the running sequences keep decoding; only a chunk
that reaches the end of its prompt samples a token.

The engine launches a step before the tokens of the previous one are on the host, so a
sequence may end in a reserved place (PENDING_TOKEN) that `postprocess` fills in later;
its length is counted with that place, which is all that scheduling needs."""

from collections import deque
from dataclasses import dataclass, field

from otvllm.core.block_manager import Allocation, BlockManager
from otvllm.core.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work and why the scheduler chose it. Its decode rows come first, then its
    prompt chunks."""

    seqs: list[Sequence]
    query_lens: list[int] = field(default_factory=list)   # per row: the tokens it computes (1 for a decode)
    sampled_seqs: list[Sequence] = field(default_factory=list)   # rows that sample: decodes, prompts' last chunks
    num_decode_tokens: int = 0        # one per decode row
    num_prefill_tokens: int = 0       # in prompt chunks (cached prefix tokens excluded)
    allocations: list[Allocation] = field(default_factory=list)   # the prompts admitted in this step
    preempted: list[Sequence] = field(default_factory=list)
    preempted_for: list[int] = field(default_factory=list)   # per preempted sequence: the one that needed blocks
    preemption_free_blocks: int = 0   # free blocks when the first preemption was decided
    preempt_freed_block_ids: list[int] = field(default_factory=list)
    new_decode_block_ids: list[int] = field(default_factory=list)
    token_indexes: list[int] = field(default_factory=list)   # where each sampled row's token goes
    num_cached_tokens: int = 0        # prompt tokens served from the prefix cache
    # The state the scheduler decided in, after this batch was taken:
    num_waiting: int = 0
    num_running: int = 0
    num_free_blocks: int = 0
    num_used_blocks: int = 0
    total_preemptions: int = 0
    # Why the first waiting sequence was not admitted: "max_num_seqs", "max_num_batched_tokens" or
    # "kv_blocks" (then the blocks it needs); None when nothing waits.
    waiting_reason: str | None = None
    waiting_blocks_needed: int = 0

    @property
    def num_batched_tokens(self) -> int:
        """Tokens the forward computes."""
        return self.num_decode_tokens + self.num_prefill_tokens

    @property
    def new_decode_blocks(self) -> int:
        return len(self.new_decode_block_ids)

    @property
    def phase(self) -> str:
        """`mixed`: decodes and prompt chunks in one step; `drain`: nothing to launch, only the
        tokens of the step in flight to postprocess."""
        if self.num_prefill_tokens:
            return "mixed" if self.num_decode_tokens else "prefill"
        return "decode" if self.seqs else "drain"

    def add_decode(self, seq: Sequence) -> None:
        self.seqs.append(seq)
        self.query_lens.append(1)
        self.sampled_seqs.append(seq)
        self.num_decode_tokens += 1

    def add_chunk(self, seq: Sequence, num_tokens: int) -> None:
        """The next `num_tokens` of `seq`'s prompt; it samples if they reach its end."""
        self.seqs.append(seq)
        self.query_lens.append(num_tokens)
        if seq.num_computed_tokens + num_tokens == seq.num_tokens:
            self.sampled_seqs.append(seq)
        self.num_prefill_tokens += num_tokens


@dataclass
class Finished:
    seq: Sequence
    reason: str
    freed_block_ids: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 block_manager: BlockManager, eos_token_ids: set[int]):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([])
        prefilling = self._schedule_decodes(batch)
        self._schedule_prefills(batch, prefilling)
        batch.num_waiting, batch.num_running = len(self.waiting), len(self.running)
        manager = self.block_manager
        batch.num_free_blocks = manager.num_free_blocks
        batch.num_used_blocks = manager.num_blocks - batch.num_free_blocks
        batch.total_preemptions = self.num_preemptions
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch) -> list[Sequence]:
        """One token for each running sequence past its prefill, in order; returns the running
        prompts still in prefill, for the prefill pass."""
        kept = []   # the running sequences, in their order
        prefilling = []
        while self.running:
            seq = self.running.popleft()
            kept.append(seq)
            if seq.is_prefill:
                prefilling.append(seq)
                continue
            if self._length_reached(seq, seq.num_tokens):   # every token reserved, the last in flight
                continue
            while not self.block_manager.can_append(seq):   # it needs one new block, none is free
                victim = self.running.pop() if self.running else kept.pop()
                if not batch.preempted:
                    batch.preemption_free_blocks = self.block_manager.num_free_blocks
                batch.preempt_freed_block_ids += self._preempt(victim)
                batch.preempted.append(victim)
                batch.preempted_for.append(seq.seq_id)
                if victim is seq:
                    break
            else:
                if self.block_manager.may_append(seq):
                    batch.new_decode_block_ids.append(seq.block_table[-1])
                batch.add_decode(seq)
        self.running.extend(kept)
        return prefilling   # none preempted: a victim is a sequence not visited yet, or the one in need

    def _schedule_prefills(self, batch: ScheduledBatch, prefilling: list[Sequence]) -> None:
        """Prompt chunks in the budget the decodes left: running prompts first, then waiting
        ones, admitted while sequences, budget and blocks allow (none in a step that preempted:
        memory is short, and a preempted sequence's last token may still be in flight)."""
        budget = self.max_num_batched_tokens - batch.num_batched_tokens
        for seq in prefilling:
            if not budget:
                break
            budget -= self._add_chunk(batch, seq, budget)
        while self.waiting and not batch.preempted:
            seq = self.waiting[0]
            if len(self.running) >= self.max_num_seqs:
                batch.waiting_reason = "max_num_seqs"
                break
            if not budget:
                batch.waiting_reason = "max_num_batched_tokens"
                break
            if not self.block_manager.can_allocate(seq):
                batch.waiting_reason = "kv_blocks"
                batch.waiting_blocks_needed = self.block_manager.num_blocks_needed(seq)
                break
            batch.allocations.append(self.block_manager.allocate(seq))
            batch.num_cached_tokens += seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            budget -= self._add_chunk(batch, seq, budget)
        if self.waiting and batch.preempted:   # the preempted wait for blocks, and whoever waited with them
            batch.waiting_reason = "kv_blocks"
            batch.waiting_blocks_needed = self.block_manager.num_blocks_needed(self.waiting[0])

    def _add_chunk(self, batch: ScheduledBatch, seq: Sequence, budget: int) -> int:
        num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
        self.block_manager.register_computed(seq, seq.num_computed_tokens + num_tokens)
        batch.add_chunk(seq, num_tokens)
        return num_tokens

    def nothing_to_launch(self) -> bool:
        """No prompt waits and every running sequence has all its tokens reserved."""
        return not self.waiting and all(self._length_reached(s, s.num_tokens) for s in self.running)

    @staticmethod
    def reserve_tokens(batch: ScheduledBatch) -> None:
        """Count the tokens a launched step computes, and give each sequence that samples the
        place of its token."""
        for seq, num_tokens in zip(batch.seqs, batch.query_lens):
            seq.num_computed_tokens += num_tokens
        batch.token_indexes = [seq.append_pending(row) for row, seq in enumerate(batch.sampled_seqs)]
        for seq in batch.sampled_seqs[batch.num_decode_tokens:]:
            seq.is_prefill = False

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop unfinished sequences (their generate call failed) and free their blocks."""
        for seq in seqs:
            if seq.is_finished:
                continue
            if seq in self.running:
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            self.block_manager.deallocate(seq)
            seq.drop_pending()
            seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> list[int]:
        """Back to the front of the queue; returns the ids of the blocks it freed."""
        seq.status = SequenceStatus.WAITING
        seq.is_prefill = True
        seq.num_preemptions += 1
        self.num_preemptions += 1
        freed = self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)
        return freed

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int]) -> list[Finished]:
        """Fill in each sampled token; finish and free the sequences that are done. Rows of
        sequences that finished (or were aborted) while this step was in flight are dropped."""
        finished = []
        for seq, token_id, index in zip(batch.sampled_seqs, token_ids, batch.token_indexes):
            if seq.is_finished:
                continue
            seq.resolve(index, token_id)
            self.block_manager.hash_resolved_block(seq)
            reason = self._finish_reason(seq, token_id, index + 1)
            if reason is not None:
                seq.truncate(index + 1)
                (self.running if seq.status == SequenceStatus.RUNNING else self.waiting).remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = reason
                finished.append(Finished(seq, reason, self.block_manager.deallocate(seq)))
        return finished

    def _length_reached(self, seq: Sequence, num_tokens: int) -> bool:
        return num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens or num_tokens >= self.max_model_len

    def _finish_reason(self, seq: Sequence, token_id: int, num_tokens: int) -> str | None:
        """Why `seq` ends with `token_id` as its token number `num_tokens`, or None."""
        params = seq.params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return "stop"
        if token_id in params.stop_token_ids:
            return "stop"
        if self._length_reached(seq, num_tokens):
            return "length"
        return None
