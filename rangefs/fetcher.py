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

# Receives (first block, data): data covers whole blocks from ``first`` on; only the run's last
# block may be short. It may be a memoryview into the socket buffer: consume it before returning.
BlockSink = Callable[[int, bytes | memoryview], Awaitable[None]]


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


@dataclass
class Readahead:
    """Sequential-access detection for one open handle: how far ahead of a read to prefetch.

    Like mountpoint-s3's prefetcher: a read that starts near where the previous one ended is
    sequential (reads the kernel sends out of order, up to ``tolerance`` apart, still count, and
    so does a forward skip into the window being fetched);
    each sequential read doubles the window, from ``initial`` up to ``maximum``; any other read
    drops it to nothing, so random access fetches only the blocks it touches.
    """

    initial: int
    maximum: int
    tolerance: int
    window: int = 0
    expected: int | None = None  # where the next sequential read should start
    frontier: int = 0  # prefetch has been issued up to this byte offset

    def advise(self, offset: int, size: int) -> int:
        """Record a read; return the offset up to which data should be fetched ahead (0: none)."""
        end = offset + size
        expected = self.expected
        ahead = max(self.tolerance, self.window)  # a skip into what is already being fetched is fine
        if expected is not None and expected - self.tolerance <= offset <= expected + ahead:
            self.window = min(self.maximum, max(self.initial, 2 * self.window))
            self.expected = max(expected, end)
            return self.expected + self.window
        self.window, self.expected, self.frontier = 0, end, end
        return 0


class Fetcher:
    """Fetch block runs from an origin, handing each block on as soon as it is complete."""

    def __init__(self, origin: Origin, block_size: int, max_requests: int = 8) -> None:
        self.origin = origin
        self.block_size = block_size
        self._requests = trio.CapacityLimiter(max_requests)

    async def fetch(self, remote: RemoteFile, run: BlockRun, on_blocks: BlockSink) -> None:
        """Fetch ``run`` of ``remote``; call ``on_blocks(first, data)`` as whole blocks arrive, in order.

        Blocks delivered before an error stay delivered: they are the server's bytes for
        this version (the origin checked the 206 against the request and If-Range).
        """
        start, stop = run.byte_range(self.block_size, remote.size)
        assembler = _BlockAssembler(self.block_size, run.first, stop - start, on_blocks)
        async with self._requests:
            await self.origin.fetch(remote, start, stop, assembler.feed)


class _BlockAssembler:
    """Cut an in-order byte stream into whole blocks (the last one of a run may be short).

    Whole blocks inside a chunk are handed on as one zero-copy view covering all of them, so a
    1 MiB socket read costs one write of four 256 KiB blocks; only the pieces of a block that
    straddle two chunks are copied.
    """

    def __init__(self, block_size: int, first_block: int, length: int, on_blocks: BlockSink) -> None:
        self.block_size = block_size
        self.block = first_block
        self.remaining = length
        self.on_blocks = on_blocks
        self.partial = bytearray()

    async def feed(self, offset: int, chunk: bytes) -> None:
        del offset  # the origin delivers in order; the assembler only counts
        view = memoryview(chunk)
        if self.partial:
            take = min(len(view), self.block_size - len(self.partial))
            self.partial += view[:take]
            view = view[take:]
            if len(self.partial) == self.block_size or len(self.partial) == self.remaining:
                await self._emit(bytes(self.partial))
                self.partial = bytearray()
        whole = len(view) // self.block_size * self.block_size
        if len(view) == self.remaining:
            whole = len(view)  # the end of the run: a short last block goes too
        if whole:
            await self._emit(view[:whole])
        self.partial += view[whole:]

    async def _emit(self, data: bytes | memoryview) -> None:
        first = self.block
        self.block += -(-len(data) // self.block_size)
        self.remaining -= len(data)
        await self.on_blocks(first, data)
