"""Turn missing blocks into Range requests, write the answers into the data file, report whole blocks.

Sits between the cache (above) and the origin (below); imports rangefs.origin and rangefs.limits,
never httpx or pyfuse3. Planning (``plan_runs``) and block progress (``BlockProgress``) are pure
logic; ``Fetcher.fetch_into`` bounds how many requests are in flight at once, per origin (a slow host
uses its own share, never another's) and over all origins (sockets are finite). A mount runs its
large fetches in a helper process (rangefs.fetchproc); the cache sees both through ``SplitFetcher``,
which admits the helper's fetches to the daemon Fetcher's per-origin slots too: one bound per origin
(``--max-connections``) over the whole mount, whichever process sends the request.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import trio
import xxhash

from rangefs.errors import classify_fetch_error
from rangefs.limits import PerOrigin, Slots
from rangefs.origin import Origin, RemoteFile, origin_of
from rangefs.redact import redact_url

log = logging.getLogger(__name__)

# Told (first, stop, sums) once blocks ``first <= b < stop`` are written to the data file;
# sums[i] is the block_sum() of block first + i as received.
WrittenSink = Callable[[int, int, list[int]], Awaitable[None]]

# Requests in flight over all origins, per Fetcher: each holds a socket, and a mount has a
# file-descriptor limit; well above one origin's share, so a few slow hosts leave room for the rest.
MAX_REQUESTS_ALL_ORIGINS = 128


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


class RunFetcher(Protocol):
    """Fetches a run of blocks into a data file (``Fetcher``, or ``FetchProcess`` in the helper)."""

    async def fetch_into(
        self, remote: RemoteFile, run: BlockRun, fd: int, on_written: WrittenSink
    ) -> None: ...


class BlockFetcher(RunFetcher, Protocol):
    """What the cache needs: runs, and whole-file streams for servers that ignore Range."""

    async def stream_into(
        self, remote: RemoteFile, fd: int, present: Callable[[int], bool], on_written: WrittenSink
    ) -> None: ...


class Fetcher:
    """Fetch block runs from an origin into a data file, telling which blocks are complete."""

    def __init__(self, origin: Origin, block_size: int, max_requests: int = 8, *, write_in_thread: bool = True) -> None:
        """``max_requests``: requests in flight per origin (scheme, host, port), with those
        admitted for another fetcher (``admit``).

        ``write_in_thread``: pwrite from a worker thread, as the FUSE thread must never block
        on the disk; a process that only fetches (rangefs.fetchproc) writes directly."""
        self.origin = origin
        self.block_size = block_size
        self.write_in_thread = write_in_thread
        self._per_origin = PerOrigin(lambda: Slots(max_requests))
        self._all_origins = trio.CapacityLimiter(MAX_REQUESTS_ALL_ORIGINS)

    @asynccontextmanager
    async def admit(self, remote: RemoteFile, urgent: bool) -> AsyncIterator[None]:
        """Hold one of the origin's request slots, for a request of this fetcher or another's
        (the helper's, which runs far fewer origins than it has sockets for)."""
        async with self._per_origin.of(origin_of(remote.url)).hold(urgent):
            yield

    @asynccontextmanager
    async def _request_slot(self, remote: RemoteFile) -> AsyncIterator[None]:
        """Hold one of the origin's request slots, then one of all origins' (in that order, so a
        request waiting for its busy origin holds nothing another origin could use). This
        fetcher's own requests are small (see SplitFetcher): urgent."""
        async with self.admit(remote, urgent=True), self._all_origins:
            yield

    async def fetch_into(self, remote: RemoteFile, run: BlockRun, fd: int, on_written: WrittenSink) -> None:
        """Fetch ``run`` into the data file ``fd``.

        Each chunk is written at its offset as it arrives, without copying it into blocks;
        ``on_written(first, stop)`` hears of blocks once every byte of them is written. Blocks
        reported before an error stay valid: they are the server's bytes for this version (the
        origin checked the 206 against the request and If-Range).

        Raises:
            CacheUnwritable: a write failed; RangefsError: the fetch failed.
        """
        start, stop = run.byte_range(self.block_size, remote.size)
        delivery = _Delivery(self.block_size, run, start, stop, on_written)

        async def store(offset: int, chunk: bytes) -> None:
            await self._write(remote, fd, chunk, offset)
            await delivery.written(offset, chunk)

        async with self._request_slot(remote):
            await self.origin.fetch(remote, start, stop, store)

    async def stream_into(
        self, remote: RemoteFile, fd: int, present: Callable[[int], bool], on_written: WrittenSink
    ) -> None:
        """Stream the whole file (for a server that ignores Range) into ``fd``.

        Blocks that are ``present`` when the stream reaches their first byte are not written
        again, nor reported; ``on_written`` hears of the other blocks once complete.
        """
        run = BlockRun(0, -(-remote.size // self.block_size))
        size = self.block_size
        skipped: set[int] = set()  # present when the stream reached them: neither rewritten nor reported

        async def report(first: int, stop: int, sums: list[int]) -> None:
            """Hand on the rewritten blocks only: a skipped one was never checked against these bytes."""
            start = first
            for block in range(first, stop + 1):
                if block == stop or block in skipped:
                    if start < block:
                        await on_written(start, block, sums[start - first : block - first])
                    start = block + 1
            skipped.difference_update(range(first, stop))

        delivery = _Delivery(self.block_size, run, 0, remote.size, report)

        async def store(offset: int, chunk: bytes) -> None:
            view, position = memoryview(chunk), offset
            while view:
                block = position // size
                piece = view[: (block + 1) * size - position]
                if position == block * size and present(block):
                    skipped.add(block)  # decided at its first byte: a block is rewritten whole or not at all
                if block not in skipped:
                    await self._write(remote, fd, piece, position)
                view, position = view[len(piece) :], position + len(piece)
            await delivery.written(offset, chunk)

        async with self._request_slot(remote):
            await self.origin.stream(remote, store)

    async def _write(self, remote: RemoteFile, fd: int, data: bytes | memoryview, offset: int) -> None:
        try:
            if self.write_in_thread:
                await trio.to_thread.run_sync(pwrite_all, fd, data, offset)
            else:
                pwrite_all(fd, data, offset)
        except OSError as exc:
            raise classify_fetch_error(redact_url(remote.url), exc, log) from None

    async def fetch_bytes(self, remote: RemoteFile, start: int, stop: int) -> bytes:
        """Bytes ``start .. stop`` of ``remote`` in memory, not cached (when the cache cannot take them)."""
        buffer = bytearray()

        async def keep(offset: int, chunk: bytes) -> None:
            buffer.extend(chunk)  # the origin delivers in order, resuming where it stopped

        async with self._request_slot(remote):
            await self.origin.fetch(remote, start, stop, keep)
        return bytes(buffer)


class SplitFetcher:
    """Small runs fetched in this process, large ones by another fetcher (the helper process).

    A random read waits for its fetch: handing a small fetch to the helper and back costs two
    process wake-ups and messages, more than the CPU the fetch itself takes (measured:
    docs/experiments.md, 'Small fetches in the daemon'). Large runs are sequential prefetches,
    whose body CPU belongs off the FUSE thread. Both kinds take a slot of the near fetcher's
    per-origin bound, the large ones not urgently (``Fetcher.admit``): that one bound counts every
    range request of the mount, and the far fetcher's own bound never binds.
    """

    def __init__(self, near: Fetcher, far: RunFetcher, block_size: int, max_near_bytes: int) -> None:
        self.near, self.far = near, far
        self.max_near_blocks = max(1, max_near_bytes // block_size)

    async def fetch_into(self, remote: RemoteFile, run: BlockRun, fd: int, on_written: WrittenSink) -> None:
        if len(run) <= self.max_near_blocks:
            await self.near.fetch_into(remote, run, fd, on_written)
            return
        async with self.near.admit(remote, urgent=False):
            await self.far.fetch_into(remote, run, fd, on_written)

    async def stream_into(
        self, remote: RemoteFile, fd: int, present: Callable[[int], bool], on_written: WrittenSink
    ) -> None:
        await self.near.stream_into(remote, fd, present, on_written)  # rare: servers that ignore Range


class BlockProgress:
    """Which blocks of a run an in-order byte stream has completed so far."""

    def __init__(self, block_size: int, run: BlockRun, start: int, stop: int) -> None:
        self.block_size = block_size
        self.run = run
        self.start, self.stop = start, stop
        self.reported = run.first  # blocks before this one have been reported

    def advance(self, end: int) -> tuple[int, int] | None:
        """The bytes up to ``end`` are written: the blocks ``(first, stop)`` this completes, if any."""
        complete = self.run.stop if end >= self.stop else self.run.first + (end - self.start) // self.block_size
        if complete <= self.reported:
            return None
        first, self.reported = self.reported, complete
        return first, complete


def block_sum(data: bytes | bytearray | memoryview) -> int:
    """The checksum of one block: the low 32 bits of its XXH3-64.

    XXH3 rather than CRC-32: zlib's crc32 took a large share of the fetch helper's CPU, XXH3 is
    several times faster (measured: docs/experiments.md, 'Block checksums'). 32 bits are plenty to tell a damaged
    block from a good one (not an adversary).
    """
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


class BlockChecksums:
    """``block_sum`` of each block of an in-order byte stream, computed as the bytes go by.

    Stored with the cache, they let a later session tell a block that was damaged or overwritten
    on disk from a good one (rangefs.verifier checks each block once per session before use).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._hasher = xxhash.xxh3_64()  # of the bytes seen so far of the block in progress
        self.done: list[int] = []

    def feed(self, offset: int, chunk: bytes | memoryview) -> None:
        view, position = memoryview(chunk), offset
        while view:
            boundary = (position // self.block_size + 1) * self.block_size
            piece = view[: boundary - position]
            view, position = view[len(piece) :], position + len(piece)
            if position == boundary and len(piece) == self.block_size:
                self.done.append(block_sum(piece))  # a whole block in one piece (the usual case)
                continue
            self._hasher.update(piece)
            if position == boundary:
                self._finish()

    def take(self, count: int) -> list[int]:
        """The sums of the next ``count`` completed blocks (a short last block ends with the one in progress)."""
        if len(self.done) < count:
            self._finish()
        taken, self.done = self.done[:count], self.done[count:]
        return taken

    def _finish(self) -> None:
        self.done.append(self._hasher.intdigest() & 0xFFFFFFFF)
        self._hasher.reset()


class _Delivery:
    """Tells ``on_written`` of each block of a run, with its sum, once all its bytes are written."""

    def __init__(self, block_size: int, run: BlockRun, start: int, stop: int, on_written: WrittenSink) -> None:
        self.progress = BlockProgress(block_size, run, start, stop)
        self.sums = BlockChecksums(block_size)
        self.on_written = on_written

    async def written(self, offset: int, chunk: bytes) -> None:
        self.sums.feed(offset, chunk)
        done = self.progress.advance(offset + len(chunk))
        if done is not None:
            await self.on_written(*done, self.sums.take(done[1] - done[0]))


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view, offset = view[written:], offset + written
