"""Fetching in a process of its own, so HTTP bodies and FUSE replies do not share one thread.

pyfuse3 answers every FUSE request on one trio thread. During a cold sequential read that
thread is busy all the time, most of it in the HTTP body path (httpcore, h11, the socket) and in
FUSE replies (profiled: docs/experiments.md, 'Fetch helper process'). So the daemon starts one helper
(``python -m rangefs.fetchproc``) that fetches block runs with its own Origin and writes them
straight into the cache data files. The daemon keeps everything else (bitmap, single flight,
readahead, checkpoints) and hears of each written piece by a message.

The crash rule holds across both processes: the daemon sets a block's bit only after the helper reported the
write done, and a checkpoint's fdatasync in the daemon covers the helper's writes (same file).
A fetch the daemon cancels is acknowledged by the helper before the daemon goes on, so no write
of an abandoned fetch can land later; a helper that does not acknowledge in time is killed.

Messages are pickled tuples, one per packet of a SOCK_SEQPACKET socketpair (both ends are ours):

    daemon -> helper   ("config", HelperConfig)                       first, once
                       ("fetch", id, RemoteFile, BlockRun) + the data file's fd
                       ("cancel", id)
    helper -> daemon   ("ready", None)                                once it can take fetches
                       ("written", id, first block, stop block, sums) grouped (_Reports)
                       ("done", id, error or None)

The data file's descriptor travels with its fetch (SCM_RIGHTS): the helper never opens a cache
file by name, so no link planted in the cache directory can redirect its writes.

The helper exits when its socket closes, and the kernel kills it when the daemon dies
(PR_SET_PDEATHSIG), so a kill -9 of the daemon leaves nothing behind.
"""

from __future__ import annotations

import array
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from rangefs import kernel
from rangefs.errors import CacheError, FetchInterrupted, classify_fetch_error
from rangefs.fetcher import BlockRun, Fetcher, WrittenSink
from rangefs.logsetup import setup_logging
from rangefs.origin import Origin, OriginConfig, RemoteFile
from rangefs.redact import redact_url

log = logging.getLogger(__name__)

_MAX_MESSAGE = 1024 * 1024  # a message carries at most one URL; this is far above any real one
_CANCEL_GRACE = 5.0  # seconds a helper has to confirm a cancelled fetch before it is killed
_RESTART_DELAY = 1.0  # between a helper's death and its replacement: bounded restart rate
_RESTART_WAIT = 10.0  # how long a new fetch waits for a replacement helper before failing
_EXIT_GRACE = 2.0  # seconds a closing helper has to exit before SIGKILL
_REPORT_BYTES = 2 * 1024 * 1024  # written blocks are reported in messages of up to this much (see _Reports)
_REPORT_DELAY = 0.002  # seconds a written block may wait for others to share its report


@dataclass(frozen=True)
class HelperConfig:
    """What the helper needs to know; sent as its first message."""

    origin: OriginConfig
    block_size: int
    max_requests: int
    log_path: str | None
    log_format: str
    verbose: bool
    foreground: bool


class _Request:
    def __init__(self, on_written: WrittenSink) -> None:
        self.on_written = on_written
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.sent_to: subprocess.Popen[bytes] | None = None  # the helper that has it


class FetchProcess:
    """The daemon's side: a ``BlockFetcher`` whose fetches run in the helper process.

    ``supervise`` must be running (in a task group that outlives every fetch) for ``fetch_into`` to work.
    """

    def __init__(self, config: HelperConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: trio.socket.SocketType | None = None
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Request] = {}
        self._ids = itertools.count()
        self._running = trio.Event()  # set while a helper is there to take fetches

    async def fetch_into(self, remote: RemoteFile, run: BlockRun, fd: int, on_written: WrittenSink) -> None:
        """Have the helper fetch ``run`` into the data file ``fd`` (sent along); see ``Fetcher.fetch_into``."""
        request = _Request(on_written)
        rid = next(self._ids)
        self._pending[rid] = request
        try:
            for attempt in range(2):
                # A helper that died is replaced; wait for that rather than fail the read.
                with trio.move_on_after(_RESTART_WAIT):
                    await self._running.wait()
                try:
                    helper = self._proc
                    await self._send(("fetch", rid, remote, run), fd)
                    request.sent_to = helper
                    if self._proc is not helper and not request.done.is_set():  # it died as we sent
                        request.error = FetchInterrupted("the fetch process exited")
                        request.done.set()
                    break
                except CacheError:
                    if attempt:
                        raise
            try:
                await request.done.wait()
            except trio.Cancelled:
                with trio.CancelScope(shield=True):
                    await self._cancel(rid, request)
                raise
        finally:
            self._pending.pop(rid, None)
        if request.error is not None:
            raise request.error

    async def _cancel(self, rid: int, request: _Request) -> None:
        """Stop a fetch in the helper and wait until it no longer writes; kill a helper that hangs."""
        with trio.move_on_after(_CANCEL_GRACE):
            try:
                await self._send(("cancel", rid))
            except CacheError:
                return  # no helper: nothing can still be writing
            await request.done.wait()
            return
        log.warning("fetch process did not stop a cancelled fetch within %.0fs; killing it", _CANCEL_GRACE)
        if request.sent_to is not None and request.sent_to.poll() is None:
            request.sent_to.kill()
            await trio.to_thread.run_sync(request.sent_to.wait)  # no write of it can land after this

    async def _send(self, message: tuple[object, ...], fd: int = -1) -> None:
        """Send ``message``, and a duplicate of ``fd`` with it unless -1."""
        if self._sock is None:
            raise CacheError("the fetch process is not running")
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd >= 0 else []
        async with self._send_lock:
            try:
                await self._sock.sendmsg([pickle.dumps(message)], fds)
            except OSError as exc:
                self._lost()
                raise CacheError(f"cannot reach the fetch process: {exc.strerror}") from None

    async def wait_ready(self, timeout: float) -> None:
        """Return once the helper can take fetches (its imports take a few hundred ms).

        Raises:
            CacheError: it was not ready within ``timeout`` seconds.
        """
        with trio.move_on_after(timeout):
            await self._running.wait()
            return
        raise CacheError(f"the fetch process did not start within {timeout:.0f}s")

    def _lost(self) -> None:
        """The helper is gone: new fetches wait for its replacement (ready again when it says so)."""
        if self._running.is_set():
            self._running = trio.Event()

    async def supervise(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a helper running and relay its news until cancelled; then end it."""
        started = False
        try:
            while True:
                await self._start()
                if not started:
                    task_status.started()
                    started = True
                await self._relay()
                self._lost()
                log.warning("fetch process exited (status %s); starting a new one", self._reap())
                await trio.sleep(_RESTART_DELAY)
        finally:
            self._stop()

    async def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "rangefs.fetchproc", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C for a foreground daemon is not for its helper
            )
        self._sock = trio.socket.from_stdlib_socket(ours)
        await self._send(("config", self.config))
        log.debug("fetch process %d started", self._proc.pid)

    async def _relay(self) -> None:
        """Hand the helper's news to the waiting fetches; return when the helper is gone."""
        assert self._sock is not None
        while True:
            try:
                packet = await self._sock.recv(_MAX_MESSAGE)
            except OSError:
                packet = b""
            if not packet:
                self._fail_pending(FetchInterrupted("the fetch process exited"), self._proc)
                return
            kind, rid, *rest = pickle.loads(packet)
            if kind == "ready":
                self._running.set()
                continue
            request = self._pending.get(rid)
            if request is None:
                continue  # a fetch given up by its reader
            if kind == "written":
                try:
                    await request.on_written(*rest)
                except Exception as exc:  # the relay serves every fetch: one bad report must not end it
                    log.exception("fetch %d: cannot record written blocks", rid)
                    request.error = CacheError(f"cannot record written blocks: {exc!r}")
                    request.done.set()
            elif kind == "done":
                request.error = rest[0]
                request.done.set()

    def _fail_pending(self, error: FetchInterrupted, helper: subprocess.Popen[bytes] | None = None) -> None:
        """End the fetches that ``helper`` had (every one when None): it will not answer them."""
        for request in self._pending.values():
            if not request.done.is_set() and (helper is None or request.sent_to is helper):
                request.error = error
                request.done.set()

    def _reap(self) -> int | None:
        """Close our end and collect the helper; its exit status."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is None:
            return None
        proc, self._proc = self._proc, None
        try:
            return proc.wait(timeout=_EXIT_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _stop(self) -> None:
        # Closing the socket tells the helper to stop; it has _EXIT_GRACE to do so.
        self._fail_pending(FetchInterrupted("unmounting"))
        status = self._reap()
        log.debug("fetch process ended (status %s)", status)


# -- the helper process -----------------------------------------------------------------------


def main() -> None:
    """Entry point of the helper: ``python -m rangefs.fetchproc FD``."""
    kernel.die_with_parent(signal.SIGKILL)  # if it cannot, the closed socket still ends us, just later
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on a foreground mount is for the daemon
    kernel.tune_malloc()
    raw = socket.socket(fileno=int(sys.argv[1]))
    try:
        trio.run(_helper, raw)
    except KeyboardInterrupt:
        pass


class _Reports:
    """One fetch's "written" reports, sent together: at most every ``_REPORT_BYTES`` of blocks, and
    ``_REPORT_DELAY`` after the first block not yet reported (so a stalled stream holds none back).

    One report per socket read would make thousands of messages per GiB, each unpickled and
    applied by the daemon's one thread; grouped, a cold sequential read is faster and costs both
    processes less CPU (measured: docs/experiments.md, 'Grouped written reports').
    """

    def __init__(self, send: Callable[[tuple[object, ...]], Awaitable[None]], rid: int, block_size: int) -> None:
        self._send, self._rid = send, rid
        self._max_blocks = max(1, _REPORT_BYTES // block_size)
        self._first = self._stop = 0
        self._sums: list[int] = []
        self._due = trio.Event()  # set while blocks wait to be reported
        self.timer = trio.CancelScope()  # around send_when_due: cancelled when the fetch ends

    async def add(self, first: int, stop: int, sums: list[int]) -> None:
        if self._sums and first != self._stop:
            await self.send_now()  # not adjacent (a fetch reports in order, so never): no gap reported
        if not self._sums:
            self._first = first
            self._due.set()
        self._stop = stop
        self._sums += sums
        if self._stop - self._first >= self._max_blocks:
            await self.send_now()

    async def send_now(self) -> None:
        if not self._sums:
            return
        message = ("written", self._rid, self._first, self._stop, self._sums)
        self._sums, self._due = [], trio.Event()
        with trio.CancelScope(shield=True):  # taken off the list: must not be lost to the timer's end
            await self._send(message)

    def discard(self) -> None:
        self._sums = []

    async def send_when_due(self) -> None:
        with self.timer:
            while True:
                await self._due.wait()
                await trio.sleep(_REPORT_DELAY)
                try:
                    await self.send_now()
                except OSError:
                    return  # the daemon is gone; the fetch's own next report finds out too


async def _helper(raw: socket.socket) -> None:
    sock = trio.socket.from_stdlib_socket(raw)
    kind, config = pickle.loads(await sock.recv(_MAX_MESSAGE))
    if kind != "config":
        return
    log_path = Path(config.log_path) if config.log_path else None
    setup_logging(log_path, verbose=config.verbose, foreground=config.foreground, required=False,
                  log_format=config.log_format)
    send_lock = trio.Lock()
    scopes: dict[int, trio.CancelScope] = {}

    async def send(message: tuple[object, ...]) -> None:
        async with send_lock:
            await sock.send(pickle.dumps(message))

    async def fetch_one(nursery: trio.Nursery, rid: int, fd: int, remote: RemoteFile, run: BlockRun) -> None:
        error: BaseException | None = None
        scope = scopes[rid]
        reports = _Reports(send, rid, config.block_size)
        nursery.start_soon(reports.send_when_due)
        try:
            with scope:
                if fd < 0:
                    raise CacheError(f"{redact_url(remote.url)}: no cache file came with the fetch")
                await fetcher.fetch_into(remote, run, fd, reports.add)
            if scope.cancelled_caught:
                error = CacheError(f"{redact_url(remote.url)}: fetch cancelled")
        except Exception as exc:  # a bug must fail this fetch, not the helper
            error = classify_fetch_error(redact_url(remote.url), exc, log)
        finally:
            del scopes[rid]
            if fd >= 0:
                os.close(fd)
            reports.timer.cancel()
            if scope.cancel_called:
                reports.discard()  # the daemon gave this fetch up: it hears "done" alone
            with trio.CancelScope(shield=True):
                try:
                    await reports.send_now()  # blocks written before an error are still good
                    await send(("done", rid, error))
                except OSError:
                    pass  # the daemon is gone

    async with Origin(config.origin) as origin:
        fetcher = Fetcher(origin, config.block_size, config.max_requests, write_in_thread=False)
        await send(("ready", None))
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    packet, fds = await _receive(sock)
                except OSError:
                    packet, fds = b"", []
                if not packet:
                    nursery.cancel_scope.cancel()  # the daemon closed the socket or died
                    return
                kind, rid, *rest = pickle.loads(packet)
                if kind == "fetch":
                    scopes[rid] = trio.CancelScope()
                    nursery.start_soon(fetch_one, nursery, rid, fds.pop(0) if fds else -1, *rest)
                elif kind == "cancel" and rid in scopes:
                    scopes[rid].cancel()
                for fd in fds:  # none is expected
                    os.close(fd)


async def _receive(sock: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it (close-on-exec)."""
    fds = array.array("i")
    packet, ancdata, _, _ = await sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return packet, list(fds)


if __name__ == "__main__":
    main()
