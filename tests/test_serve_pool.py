"""The serve pool's share of a KV cache the slots share: requests start only while their tokens
fit, first come first served, and a request that leaves while waiting leaves no hold behind."""
from __future__ import annotations

import asyncio

import pytest

from pocketlm.serve.engine import KV_SLACK, ContextPool


def _pool(budget: int, slots: int = 4) -> ContextPool:
    pool = ContextPool("none", parallel=slots, max_queue=4, loader=lambda p, n_ctx, n_threads: object())
    pool.kv_budget = budget
    return pool


def test_requests_wait_for_room_in_arrival_order():
    async def main():
        pool = _pool(200)
        order: list[str] = []
        gates = {name: asyncio.Event() for name in "abc"}

        async def request(name: str, tokens: int):
            async with pool.context() as lease:
                await pool.reserve(lease, tokens)
                order.append(f"{name} starts")
                await gates[name].wait()
            order.append(f"{name} ends")

        tasks = [asyncio.create_task(request("a", 120)), asyncio.create_task(request("b", 120)),
                 asyncio.create_task(request("c", 10))]
        await asyncio.sleep(0.05)
        # b does not fit beside a; c would, but does not overtake b
        assert order == ["a starts"] and pool._kv_used == 120 + KV_SLACK
        gates["a"].set()
        await asyncio.sleep(0.05)
        assert order == ["a starts", "a ends", "b starts", "c starts"]
        gates["b"].set()
        gates["c"].set()
        await asyncio.gather(*tasks)
        assert pool._kv_used == 0 and not pool._kv_line

    asyncio.run(main())


def test_a_request_that_leaves_while_waiting_holds_nothing():
    async def main():
        pool = _pool(100)
        hold = asyncio.Event()

        async def first():
            async with pool.context() as lease:
                await pool.reserve(lease, 80)
                await hold.wait()

        async def second():
            async with pool.context() as lease:
                await pool.reserve(lease, 80)

        a = asyncio.create_task(first())
        await asyncio.sleep(0.02)
        b = asyncio.create_task(second())
        await asyncio.sleep(0.02)
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        assert len(pool._kv_line) == 0 and pool._kv_used == 80 + KV_SLACK
        hold.set()
        await a
        assert pool._kv_used == 0

    asyncio.run(main())


def test_without_a_shared_cache_nothing_waits():
    async def main():
        pool = _pool(10)
        pool.kv_budget = None
        async with pool.context() as one, pool.context() as two:
            await pool.reserve(one, 10_000)
            await pool.reserve(two, 10_000)
            assert pool._kv_used == 0

    asyncio.run(main())
