"""Probes the mount did not wait for: the files of a big list, and those a reload added.

Imports rangefs.tree, catalog, origin (for its types), errors and redact; never pyfuse3. Every
method runs on the trio thread. A file node whose probe is pending has ``entry`` set and
``cached`` None; ``run`` probes the queued nodes in list order, at most ``concurrency`` at once
(the origin's per-host limit holds as well), and ``resolve`` (called by a lookup, getattr,
readdir or open that needs one) starts a node's probe at once if its turn has not come, then
waits for it. A node probed without error gets its cached file (``attach``); a failed one keeps
its error, which ``resolve`` raises again, and is probed afresh on a later ``resolve`` once
``RETRY_FAILED`` seconds have passed. A host that takes no connection fails its other pending
probes at once, with that reason, for the same time: one warning per host, not one per URL.
Successful probes go to the catalog, which is saved when the queue is empty.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio

from rangefs.catalog import Catalog
from rangefs.errors import HostUnreachable, OriginError
from rangefs.origin import RemoteFile, origin_of
from rangefs.redact import redact_url
from rangefs.tree import Node

log = logging.getLogger(__name__)

RETRY_FAILED = 30.0  # seconds a failed probe's error stands before a lookup asks again


@dataclass(eq=False)  # hashable by identity: the limiter counts who holds its slots
class _Pending:
    node: Node
    done: trio.Event = field(default_factory=trio.Event)
    started: bool = False
    error: OriginError | None = None
    failed_at: float = 0.0


class Probes:
    """The pending probes of one mount."""

    def __init__(
        self,
        probe: Callable[[str], Awaitable[RemoteFile]],
        attach: Callable[[Node, RemoteFile], None],
        catalog: Catalog,
        source: str,
        concurrency: int,
    ) -> None:
        """``probe(url)``: the origin's probe. ``attach(node, remote)``: give a probed node its
        cached file. ``source``: the list's name, for messages."""
        self._probe = probe
        self._attach = attach
        self._catalog = catalog
        self._source = source
        self._limiter = trio.CapacityLimiter(concurrency)
        self._pending: dict[int, _Pending] = {}  # by inode
        self._queue: deque[_Pending] = deque()
        self._queued = trio.Event()
        self._down: dict[str, tuple[float, str]] = {}  # origin -> (when found down, why)
        self._nursery: trio.Nursery | None = None

    def add(self, nodes: Iterable[Node]) -> None:
        """Queue the probes of file nodes that have no cached file yet."""
        for node in nodes:
            pending = self._pending[node.inode] = _Pending(node)
            self._queue.append(pending)
        self._queued.set()

    def forget(self, inode: int) -> None:
        """A node left the tree (reload): its probe is no longer wanted."""
        self._pending.pop(inode, None)

    @property
    def waiting(self) -> int:
        """Nodes not probed yet (or failed)."""
        return len(self._pending)

    async def resolve(self, node: Node) -> None:
        """Wait until ``node`` has its cached file; start its probe now if its turn has not come.

        Raises:
            OriginError: its probe failed (RemoteNotFound for a 404).
        """
        pending = self._pending.get(node.inode)
        if pending is None or node.cached is not None:
            return
        if pending.error is not None and time.monotonic() - pending.failed_at >= RETRY_FAILED:
            pending.done, pending.started, pending.error = trio.Event(), False, None
        if _claim(pending):
            await self._run_one(pending)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error

    async def resolve_all(self, nodes: Iterable[Node]) -> None:
        """``resolve`` each of ``nodes`` at once (errors are left for each node's own resolve)."""

        async def settle(node: Node) -> None:
            try:
                await self.resolve(node)
            except OriginError:
                pass

        async with trio.open_nursery() as nursery:
            for node in nodes:
                if node.inode in self._pending and node.cached is None:
                    nursery.start_soon(settle, node)

    def error_of(self, node: Node) -> OriginError | None:
        pending = self._pending.get(node.inode)
        return pending.error if pending is not None else None

    async def run(self) -> None:
        """Probe the queued nodes in order, bounded; save the catalog whenever the queue empties."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                await self._queued.wait()
                self._queued = trio.Event()
                while self._queue:
                    pending = self._queue.popleft()
                    if pending.started or self._pending.get(pending.node.inode) is not pending:
                        continue
                    # A token of its own per slot taken: a lookup may take a slot for the same
                    # node meanwhile, and one borrower may hold one token only.
                    token = object()
                    await self._limiter.acquire_on_behalf_of(token)
                    if not _claim(pending):  # a lookup started it while we waited for the slot
                        self._limiter.release_on_behalf_of(token)
                        continue
                    nursery.start_soon(self._probe_held, pending, token)
                # Wait for the probes started to end before saving what they learned.
                while self._limiter.borrowed_tokens:
                    await trio.sleep(0.05)
                blob = self._catalog.snapshot()
                if blob is not None:
                    await trio.to_thread.run_sync(self._catalog.write, blob)
                if not self._pending:
                    log.info("every URL of %s is probed", self._source)

    async def _run_one(self, pending: _Pending) -> None:
        """Start one probe now, out of turn (it still takes a slot). Claimed by the caller: if it
        is cancelled before the probe starts, the claim is given back, so that others waiting for
        the node do not wait for ever."""
        token = object()
        try:
            await self._limiter.acquire_on_behalf_of(token)
        except BaseException:
            pending.started = False
            self._queue.append(pending)
            self._queued.set()
            raise
        if self._nursery is not None:
            self._nursery.start_soon(self._probe_held, pending, token)
        else:  # before ``run`` started (not in a mount): probe in this task
            await self._probe_held(pending, token)

    async def _probe_held(self, pending: _Pending, token: object) -> None:
        try:
            await self._probe_one(pending)
        finally:
            self._limiter.release_on_behalf_of(token)
            pending.done.set()

    async def _probe_one(self, pending: _Pending) -> None:
        node = pending.node
        assert node.entry is not None
        url, line = node.entry.url, node.entry.line
        host = origin_of(url)
        down = self._down.get(host)
        if down is not None and time.monotonic() - down[0] < RETRY_FAILED:
            self._fail(pending, HostUnreachable(f"{redact_url(url)}: not probed: {down[1]}"), quiet=True)
            return
        try:
            remote = await self._probe(url)
        except HostUnreachable as exc:
            self._down[host] = (time.monotonic(), f"its host takes no connection ({self._source} line {line})")
            self._fail(pending, exc, quiet=False)
            return
        except OriginError as exc:
            self._fail(pending, exc, quiet=False)
            return
        self._down.pop(host, None)
        if self._pending.get(node.inode) is not pending:
            return  # a reload removed it meanwhile
        self._attach(node, remote)
        self._catalog.put(url, remote)
        del self._pending[node.inode]

    def _fail(self, pending: _Pending, exc: OriginError, quiet: bool) -> None:
        pending.error, pending.failed_at = exc, time.monotonic()
        assert pending.node.entry is not None
        message = f"{self._source} line {pending.node.entry.line}: {exc}; the file is left out of the mount"
        if quiet:
            log.debug("%s", message)
        else:
            log.warning("%s", message)


def _claim(pending: _Pending) -> bool:
    """Mark a probe started; False if it already was."""
    if pending.started:
        return False
    pending.started = True
    return True
