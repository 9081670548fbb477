"""Paged KV-cache bookkeeping with prefix caching.

A full block is identified by an xxhash of its token ids chained with the hash of the
block before it, so equal hashes mean equal prefixes. Freed blocks keep their hash
until they are reused, so a later request with the same prefix can still hit them.
"""

import time
from dataclasses import dataclass

import numpy as np
import xxhash

from otvllm.core.sequence import PENDING_TOKEN, Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = -1
    token_ids: tuple[int, ...] = ()


@dataclass
class Allocation:
    """What one `allocate` did, for the scheduler's accounting and the trace."""

    seq_id: int
    new_blocks: int
    cached_blocks: int
    cached_tokens: int
    start_ns: int
    end_ns: int
    block_ids: list[int]   # the sequence's block table after it


def block_hash(token_ids: list[int], prefix_hash: int) -> int:
    h = xxhash.xxh64()
    if prefix_hash != -1:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))  # ordered set, oldest first
        # Prefix-cache counters over first admissions only, as vLLM counts them: a preempted
        # sequence's re-admission (its prompt and generated tokens, recomputed) is not counted.
        self.num_cache_queries = 0   # full blocks looked up (a sequence's lookups stop at its first miss)
        self.num_cache_hits = 0
        self.num_prompt_tokens_queried = 0   # prompt tokens of the sequences admitted
        self.num_prompt_tokens_cached = 0    # of those, tokens whose KV came from the prefix cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free_block(self) -> Block:
        block_id = next(iter(self.free_block_ids))
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, (), 1
        return block

    def _lookup(self, h: int, token_ids: list[int]) -> int | None:
        block_id = self.hash_to_block.get(h)
        if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids):
            return None
        return block_id

    def _register(self, block: Block, h: int, token_ids: list[int]) -> None:
        block.hash, block.token_ids = h, tuple(token_ids)
        self.hash_to_block[h] = block.block_id

    def reset_prefix_cache(self) -> None:
        """Forget the hashes of free blocks: later prompts cannot hit what earlier calls computed."""
        for block_id in self.free_block_ids:
            block = self.blocks[block_id]
            if block.hash != -1 and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = -1, ()

    def num_blocks_needed(self, seq: Sequence) -> int:
        """Blocks `allocate` would take from the free list (an upper bound: cache hits need fewer)."""
        return seq.num_blocks

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free_blocks >= self.num_blocks_needed(seq)

    def allocate(self, seq: Sequence) -> Allocation:
        """Give `seq` its blocks, reusing cached full blocks of its prefix.

        At most len(seq) - 1 tokens come from the cache: the last token is always
        computed, since its logits pick the next token; none, while the logits of its prompt
        are wanted (prompt_logprobs). The new blocks become findable by later prompts only once
        a step computes them (`register_computed`).
        """
        assert not seq.block_table
        start_ns = time.time_ns()
        h = -1
        cache_miss = False
        cacheable = 0 if seq.needs_prompt_logits else (len(seq) - 1) // self.block_size
        new_blocks = cached_blocks = queries = 0
        for i in range(seq.num_blocks):
            block_id = None
            if i < cacheable and not cache_miss:
                token_ids = seq.block(i)
                h = block_hash(token_ids, h)
                queries += 1
                block_id = self._lookup(h, token_ids)
                cache_miss = block_id is None
            if block_id is None:
                block = self._take_free_block()
                new_blocks += 1
            else:
                cached_blocks += 1
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self.free_block_ids[block_id]
                block.ref_count += 1
            seq.block_table.append(block.block_id)
        seq.num_cached_tokens = seq.num_computed_tokens = cached_blocks * self.block_size
        seq.max_cached_tokens = max(seq.max_cached_tokens, seq.num_cached_tokens)
        if seq.num_preemptions == 0:
            self.num_cache_queries += queries
            self.num_cache_hits += cached_blocks
            self.num_prompt_tokens_queried += len(seq)
            self.num_prompt_tokens_cached += seq.num_cached_tokens
        return Allocation(seq.seq_id, new_blocks, cached_blocks, seq.num_cached_tokens, start_ns, time.time_ns(),
                          list(seq.block_table))

    def deallocate(self, seq: Sequence) -> list[int]:
        """Drop `seq`'s blocks; returns the ids of those that became free (no other sequence shares them)."""
        freed = []
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                freed.append(block_id)
        seq.block_table.clear()
        seq.num_cached_tokens = seq.num_computed_tokens = 0
        seq.unhashed_block = -1
        return freed

    def register_computed(self, seq: Sequence, num_tokens: int) -> None:
        """Make the full blocks among the first `num_tokens` tokens of `seq` findable by later
        prompts: the step being scheduled writes their KV (a prompt chunk of tokens from
        seq.num_computed_tokens), before any later step can read them."""
        bs = self.block_size
        for i in range(seq.num_computed_tokens // bs, num_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash == -1:
                prev = self.blocks[seq.block_table[i - 1]].hash if i > 0 else -1
                token_ids = seq.block(i)
                self._register(block, block_hash(token_ids, prev), token_ids)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the token appended last step has a slot (a new block starts at offset 0)."""
        return seq.num_tokens <= len(seq.block_table) * self.block_size or self.num_free_blocks > 0

    def may_append(self, seq: Sequence) -> int:
        """Make room for the last token of `seq`; returns the number of new blocks (0 or 1)."""
        if seq.num_tokens > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_free_block().block_id)
            return 1
        if seq.num_tokens % self.block_size == 0:
            # The last block just filled up: hash it so later prompts can reuse it, once its
            # last token is known (it may still be on its way from the previous step).
            seq.unhashed_block = len(seq.block_table) - 1
            self.hash_resolved_block(seq)
        return 0

    def hash_resolved_block(self, seq: Sequence) -> None:
        """Register the full block left unhashed by `may_append`, if its tokens are all known now.
        Its last token's KV is written by the step that called `may_append`, which was launched
        before any later step can read the block from the cache."""
        i = seq.unhashed_block
        if i < 0 or seq.token_ids[(i + 1) * self.block_size - 1] == PENDING_TOKEN:
            return
        seq.unhashed_block = -1
        prev = self.blocks[seq.block_table[i - 1]].hash if i > 0 else -1
        token_ids = seq.block(i)
        self._register(self.blocks[seq.block_table[i]], block_hash(token_ids, prev), token_ids)
