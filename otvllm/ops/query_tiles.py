"""The work list of the Triton prefill kernel: one entry per tile of query tokens.

A program of the kernel takes one entry, a (sequence, first query token) pair packed into an
int64 as ``sequence << 32 | token``; -1 entries do nothing. The list is built on the host, where
the batch's lengths are known, so the launch needs no device sync, and its length depends only on
the token count, not on the longest prompt: a CUDA graph captured for a number of tokens, with
the list padded by -1, serves every batch of that many tokens or fewer."""

import numpy as np

IDLE = -1


def max_tiles(num_tokens: int, num_seqs: int, tokens_per_tile: int) -> int:
    """The longest list for `num_tokens` new tokens in at most `num_seqs` sequences."""
    return -(-num_tokens // tokens_per_tile) + min(num_seqs, num_tokens)


def query_tiles(query_lens: np.ndarray, past_lens: np.ndarray, tokens_per_tile: int) -> np.ndarray:
    """int64 entries for the sequences' `query_lens` new tokens after `past_lens` cached ones,
    the tiles that scan the most keys first (a long tile started last would finish last)."""
    query_lens = np.asarray(query_lens, dtype=np.int64)
    tiles_per_seq = -(-query_lens // tokens_per_tile)
    seq = np.repeat(np.arange(len(query_lens), dtype=np.int64), tiles_per_seq)
    first = np.cumsum(tiles_per_seq) - tiles_per_seq
    token = (np.arange(len(seq), dtype=np.int64) - first[seq]) * tokens_per_tile
    keys = np.asarray(past_lens, dtype=np.int64)[seq] + token
    order = np.argsort(-keys, kind="stable")
    return (seq[order] << 32) | token[order]
