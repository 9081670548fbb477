"""The front end's reading of a request's updates (serving/engine_client.py): what the engine
process sent while the front end was busy goes out merged, one update per choice, in order."""

import asyncio

from otvllm.serving.engine_client import next_updates
from otvllm.serving.engine_process import Update


def take(items: list[tuple[int, Update]], later: list[tuple[int, Update]] = ()) -> list[tuple[int, Update]]:
    async def run():
        queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        reading = asyncio.ensure_future(next_updates(queue))
        await asyncio.sleep(0.01)
        for item in later:
            queue.put_nowait(item)
        got = await reading
        assert queue.empty()
        return got
    return asyncio.run(run())


def test_updates_queued_behind_the_first_are_merged_per_choice_in_order():
    got = take([(0, Update(5, [1], logprobs=[{1: -0.5}], first_token_ns=11)),
                (1, Update(6, [7])),
                (0, Update(5, [2, 3], logprobs=[{2: -0.1}, {3: -0.2}])),
                (0, Update(5, [4], "length", logprobs=[{4: -0.3}])),
                (0, Update(5, [], "abort")),   # after the choice's end: not news
                (1, Update(6, [8]))])
    assert got == [(0, Update(5, [1, 2, 3, 4], "length", [{1: -0.5}, {2: -0.1}, {3: -0.2}, {4: -0.3}], 11)),
                   (1, Update(6, [7, 8]))]


def test_an_error_after_tokens_ends_the_merged_update():
    got = take([(0, Update(1, [1, 2])), (0, Update(1, [], "error"))])
    assert got == [(0, Update(1, [1, 2], "error"))]


def test_with_nothing_queued_it_waits_for_the_next_update_alone():
    got = take([], later=[(2, Update(3, [9]))])
    assert got == [(2, Update(3, [9]))]
