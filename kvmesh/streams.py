"""Several generations answered as one: OpenAI's ``n`` and prompt lists become one stream per
choice, interleaved here as their messages arrive."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from kvmesh.v1 import inference_pb2 as pb


async def merge(
    streams: dict[int, AsyncIterator[pb.GenerateResponse]],
) -> AsyncIterator[tuple[int, pb.GenerateResponse, dict[str, str]]]:
    """Interleaves the choices' streams as messages arrive; one stream's error ends them all."""
    if len(streams) == 1:  # the common case: no tasks, no queue
        ((index, stream),) = streams.items()
        try:
            async for response in stream:
                yield index, response, getattr(stream, "headers", None) or {}
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[pb.GenerateResponse]) -> None:
        try:
            async for response in stream:
                queue.put_nowait((index, response))
            queue.put_nowait((index, None))
        except Exception as e:
            queue.put_nowait((index, e))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in streams.items()]
    try:
        live = len(tasks)
        while live:
            index, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item, getattr(streams[index], "headers", None) or {}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
