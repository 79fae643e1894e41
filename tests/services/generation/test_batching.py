"""The adaptive batcher without Ray: batches close when full, when arrivals stop, or at the
longest wait; a failing batch fails only its own requests."""

from __future__ import annotations

import asyncio

import pytest

from services.generation.batching import Batcher, BatchPolicy


class Recorder:
    def __init__(self, fail_on: set[int] | None = None, wrong_count: bool = False, delay: float = 0.01) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on or set()
        self.wrong_count = wrong_count
        self.delay = delay

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.delay)
        if self.fail_on & set(items):
            raise ValueError(f"bad item in {items}")
        return [x * 10 for x in items][: len(items) - 1 if self.wrong_count else None]


def run(coro):
    return asyncio.run(coro)


def test_a_burst_fills_batches_up_to_the_limit():
    async def main():
        rec = Recorder()
        batcher = Batcher(rec, BatchPolicy(max_batch_size=8, max_wait_s=0.3, idle_s=0.05))
        results = await asyncio.gather(*(batcher.submit(i) for i in range(12)))
        batcher.close()
        return rec, batcher, results

    rec, batcher, results = run(main())
    assert results == [i * 10 for i in range(12)]
    assert [len(b) for b in rec.batches] == [8, 4]
    assert sorted(x for b in rec.batches for x in b) == list(range(12))
    # the second batch expected as many as the first and waited for them, up to the longest wait
    assert batcher.stats.closed == {"full": 1, "idle": 0, "max_wait": 1}
    assert (batcher.stats.batches, batcher.stats.requests) == (2, 12)


@pytest.mark.slow
def test_arrivals_closer_than_the_idle_gap_share_a_batch():
    async def main():
        rec = Recorder()
        batcher = Batcher(rec, BatchPolicy(max_batch_size=64, max_wait_s=60.0, idle_s=1.0))

        async def late(i):
            await asyncio.sleep(0.02 * i)  # each arrival well inside the 1 s gap of the one before
            return await batcher.submit(i)

        results = await asyncio.gather(*(late(i) for i in range(6)))
        batcher.close()
        return rec, batcher, results

    rec, batcher, results = run(main())
    assert results == [0, 10, 20, 30, 40, 50]
    assert rec.batches == [[0, 1, 2, 3, 4, 5]]
    assert batcher.stats.closed == {"full": 0, "idle": 1, "max_wait": 0}


def test_a_lone_request_closes_on_the_idle_gap_not_the_longest_wait():
    async def main():
        rec = Recorder()
        batcher = Batcher(rec, BatchPolicy(max_batch_size=64, max_wait_s=3600.0, idle_s=0.01))
        out = [await batcher.submit(i) for i in range(3)]  # one client, one request at a time
        batcher.close()
        return rec, batcher, out

    rec, batcher, out = run(main())
    assert out == [0, 10, 20] and rec.batches == [[0], [1], [2]]
    assert batcher.stats.closed == {"full": 0, "idle": 3, "max_wait": 0}


@pytest.mark.slow
def test_after_a_batch_of_n_the_next_one_waits_for_n_callers_past_the_idle_gap():
    async def main():
        rec = Recorder()
        batcher = Batcher(rec, BatchPolicy(max_batch_size=64, max_wait_s=1.0, idle_s=0.02))
        first = await asyncio.gather(*(batcher.submit(i) for i in range(4)))

        async def slow(i):  # returning callers, 0.1 s apart: five idle gaps each
            await asyncio.sleep(0.1 * (i - 10))
            return await batcher.submit(i)

        second = await asyncio.gather(*(slow(i) for i in range(10, 14)))
        lone = await batcher.submit(20)  # the fourth caller left: this batch waits its longest wait
        batcher.close()
        return rec, batcher, first, second, lone

    rec, batcher, first, second, lone = run(main())
    assert rec.batches[:2] == [[0, 1, 2, 3], [10, 11, 12, 13]]
    assert first == [0, 10, 20, 30] and second == [100, 110, 120, 130] and lone == 200
    assert batcher.stats.closed == {"full": 0, "idle": 2, "max_wait": 1}


def test_the_longest_wait_closes_a_batch_that_keeps_receiving():
    async def main():
        rec = Recorder()
        batcher = Batcher(rec, BatchPolicy(max_batch_size=1000, max_wait_s=0.05, idle_s=10.0))

        async def late(i):
            await asyncio.sleep(0.02 * i)
            return await batcher.submit(i)

        results = await asyncio.gather(*(late(i) for i in range(10)))
        batcher.close()
        return rec, batcher, results

    rec, batcher, results = run(main())
    assert results == [i * 10 for i in range(10)]
    assert len(rec.batches) >= 2  # the first batch did not wait for all ten
    assert batcher.stats.closed["max_wait"] >= 1


def test_a_failing_batch_fails_only_its_own_requests():
    async def main():
        rec = Recorder(fail_on={3})
        batcher = Batcher(rec, BatchPolicy(max_batch_size=4, max_wait_s=0.2, idle_s=0.05))
        results = await asyncio.gather(*(batcher.submit(i) for i in range(8)), return_exceptions=True)
        after = await batcher.submit(9)  # the batcher still serves
        batcher.close()
        return results, after

    results, after = run(main())
    assert all(isinstance(r, ValueError) for r in results[:4])
    assert results[4:] == [40, 50, 60, 70] and after == 90


def test_a_wrong_number_of_results_is_an_error_not_a_misaligned_answer():
    async def main():
        batcher = Batcher(Recorder(wrong_count=True), BatchPolicy(max_batch_size=4, max_wait_s=30.0, idle_s=0.5))
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        batcher.close()
        return results

    results = run(main())
    assert all(isinstance(r, RuntimeError) and "returned 2 results" in str(r) for r in results)


def test_a_caller_that_gave_up_is_not_run():
    async def main():
        rec = Recorder()
        batcher = Batcher(rec, BatchPolicy(max_batch_size=8, max_wait_s=30.0, idle_s=0.2))
        gone = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0)  # queued
        gone.cancel()
        kept = await batcher.submit(2)
        batcher.close()
        return rec, kept

    rec, kept = run(main())
    assert kept == 20 and rec.batches == [[2]]


def test_submit_after_close_is_refused():
    async def main():
        batcher = Batcher(Recorder(), BatchPolicy(max_batch_size=8, max_wait_s=1.0, idle_s=0.1))
        batcher.close()
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.submit(1)

    run(main())


def test_callers_that_queued_while_a_batch_ran_count_in_the_next_ones_expected_size():
    async def main():
        rec = Recorder(delay=0.3)
        batcher = Batcher(rec, BatchPolicy(max_batch_size=64, max_wait_s=30.0, idle_s=0.02))

        async def client(first: int, again: int | None, start: float, think: float):
            await asyncio.sleep(start)
            out = await batcher.submit(first)
            if again is None:
                return out
            await asyncio.sleep(think)  # comes back slowly: longer than the idle gap
            return await batcher.submit(again)

        # two callers make the first batch; three more queue while it runs; the first two
        # come back 0.1 s and 0.2 s after their answers
        results = await asyncio.gather(client(0, 10, 0.0, 0.1), client(1, 11, 0.0, 0.2),
                                       *(client(i, None, 0.15, 0.0) for i in (2, 3, 4)))
        batcher.close()
        return rec, results

    rec, results = run(main())
    assert rec.batches[0] == [0, 1]
    assert sorted(rec.batches[1]) == [2, 3, 4, 10, 11]  # 2 answered + 3 that waited: it waited for 5


def test_a_failed_result_fails_its_own_request_only():
    from services.generation.batching import Failed

    async def run_batch(items: list[int]) -> list:
        return [Failed(ValueError(f"item {x} is bad")) if x == 2 else x * 10 for x in items]

    async def main():
        batcher = Batcher(run_batch, BatchPolicy(max_batch_size=8, max_wait_s=0.05, idle_s=0.01))
        results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
        batcher.close()
        return results

    results = run(main())
    assert results[0] == 0 and results[1] == 10 and results[3] == 30
    assert isinstance(results[2], ValueError) and "item 2" in str(results[2])
