"""Turn missing blocks into Range requests and the answers back into whole blocks.

Sits between the cache (above) and the origin (below); imports rangefs.origin, never httpx or
pyfuse3. Planning is pure logic (``plan_runs``); ``Fetcher.fetch`` bounds how many requests are
in flight at once over the whole mount.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from rangefs.origin import Origin, RemoteFile

BlockSink = Callable[[int, bytes], Awaitable[None]]


@dataclass(frozen=True)
class BlockRun:
    """Blocks ``first <= b < stop`` of one file, fetched with one Range request."""

    first: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.first

    def byte_range(self, block_size: int, file_size: int) -> tuple[int, int]:
        """The ``(start, stop)`` byte offsets this run covers, clipped at the end of the file."""
        return self.first * block_size, min(self.stop * block_size, file_size)


def plan_runs(blocks: Iterable[int], max_blocks: int) -> list[BlockRun]:
    """Coalesce block numbers into runs of adjacent blocks, each at most ``max_blocks`` long."""
    runs: list[BlockRun] = []
    for block in sorted(set(blocks)):
        last = runs[-1] if runs else None
        if last is not None and last.stop == block and len(last) < max_blocks:
            runs[-1] = BlockRun(last.first, block + 1)
        else:
            runs.append(BlockRun(block, block + 1))
    return runs


class Fetcher:
    """Fetch block runs from an origin, handing each block on as soon as it is complete."""

    def __init__(self, origin: Origin, block_size: int, max_requests: int = 8) -> None:
        self.origin = origin
        self.block_size = block_size
        self._requests = trio.CapacityLimiter(max_requests)

    async def fetch(self, remote: RemoteFile, run: BlockRun, on_block: BlockSink) -> None:
        """Fetch ``run`` of ``remote``; call ``on_block(block, data)`` for each block, in order.

        Blocks delivered before an error stay delivered: they are the server's bytes for
        this version (the origin checked the 206 against the request and If-Range).
        """
        start, stop = run.byte_range(self.block_size, remote.size)
        assembler = _BlockAssembler(self.block_size, run.first, stop - start, on_block)
        async with self._requests:
            await self.origin.fetch(remote, start, stop, assembler.feed)


class _BlockAssembler:
    """Cut an in-order byte stream into whole blocks (the last one may be short)."""

    def __init__(self, block_size: int, first_block: int, length: int, on_block: BlockSink) -> None:
        self.block_size = block_size
        self.block = first_block
        self.remaining = length
        self.on_block = on_block
        self.pieces: list[bytes] = []
        self.buffered = 0

    async def feed(self, offset: int, chunk: bytes) -> None:
        del offset  # the origin delivers in order; the assembler only counts
        while chunk:
            take = min(len(chunk), self.block_size - self.buffered)
            self.pieces.append(chunk[:take])
            self.buffered += take
            self.remaining -= take
            chunk = chunk[take:]
            if self.buffered == self.block_size or self.remaining == 0:
                await self._flush()

    async def _flush(self) -> None:
        data = b"".join(self.pieces)
        self.pieces, self.buffered = [], 0
        block, self.block = self.block, self.block + 1
        await self.on_block(block, data)
