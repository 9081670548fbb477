"""The Triton prefill's work list (ops/query_tiles.py) against a plain enumeration."""

import numpy as np
import pytest

from otvllm.ops.query_tiles import max_tiles, query_tiles


@pytest.mark.parametrize("query_lens,past_lens,per_tile", [
    ([5, 1, 9], [0, 3, 2], 4),
    ([64], [0], 64),
    ([65, 63, 1, 1, 200], [1000, 0, 7, 0, 31], 64),
    ([1] * 50, list(range(50)), 16),
])
def test_every_tile_once_the_most_keys_first(query_lens, past_lens, per_tile):
    tiles = query_tiles(np.array(query_lens), np.array(past_lens), per_tile)
    pairs = [(int(t) >> 32, int(t) & 0xFFFFFFFF) for t in tiles]
    want = {(s, tok) for s, n in enumerate(query_lens) for tok in range(0, n, per_tile)}
    assert sorted(pairs) == sorted(want) and len(pairs) == len(want)
    keys = [past_lens[s] + tok for s, tok in pairs]
    assert keys == sorted(keys, reverse=True)
    assert len(tiles) <= max_tiles(sum(query_lens), len(query_lens), per_tile)


def test_no_batch_of_a_token_count_takes_more_tiles_than_its_bound():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        per_tile = int(rng.choice([4, 16, 64]))
        n = int(rng.integers(1, 20))
        lens = rng.integers(1, 3 * per_tile, n)
        assert len(query_tiles(lens, np.zeros(n), per_tile)) <= max_tiles(int(lens.sum()), n, per_tile)
    assert max_tiles(3, 100, 8) == 1 + 3   # never more sequences than tokens
