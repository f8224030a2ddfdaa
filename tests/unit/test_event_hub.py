"""The event hub's reader: streams that open in a burst are served by a few reads, not one each."""

from __future__ import annotations

import asyncio
from typing import Any

from api.event_hub import EventHub


def test_a_burst_of_stream_opens_costs_a_few_reads() -> None:
    """Each new stream wakes the reader for its catch-up. Opens come in bursts, let through a few
    at a time, so streams join one after another: a read per join was a read per stream."""
    reads: list[int] = []

    def read(snapshot: list[Any]) -> list[Any]:
        reads.append(sum(len(pending) for _, pending in snapshot))
        return []

    async def burst() -> None:
        hub = EventHub(render=lambda ev: b"", poll_s=5.0)
        hub._read = read  # type: ignore[method-assign]
        streams = []
        for _ in range(20):  # twenty streams joining 2 ms apart
            streams.append(asyncio.create_task(anext(hub.watch("ftjob-1", 0))))
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.3)
        for s in streams:
            s.cancel()
        await asyncio.gather(*streams, return_exceptions=True)

    asyncio.run(burst())
    assert 1 < len(reads) <= 3, reads  # the first join at once, the rest together
