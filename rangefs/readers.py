"""Noticing readers that went away: cancel the reads that only a gone or killed opener waited for.

pyfuse3 passes no FUSE_INTERRUPT on, and the kernel sends no RELEASE while its own reads of the
file are unanswered, so a killed reader is noticed by looking at /proc: reads that have waited a
while are checked, and if the process that opened the file is gone (or being killed) and no other
process holds the file open or mapped, they are cancelled along with the fetches only they wanted.

Imports trio and the standard library only. Reads only /proc: its links name the files without
asking us, so a check never sends a request to our own mount.

Concurrency: ``Opener`` fields are read and written on the trio thread: ``reads`` by the read
handlers (each adds and removes its own scope), ``flushed`` by flush and the watch, ``pid`` by the
watch. The scan of /proc for a holder runs in a worker thread and touches no field: it gets the
path and a set of process ids built before it starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

# Reads waiting this long are checked every as long: has the process that opened the file gone
# (or been killed)? Then nobody takes their answers.
_READER_CHECK = 0.5
_SIGKILL_BIT = 1 << (9 - 1)  # SIGKILL in the pending-signal masks of /proc/PID/status


@dataclass
class Opener:
    """Per open handle: the process that opened it, and its reads in progress."""

    inode: int
    url: str  # the file's URL as logged (redacted)
    pid: int = -1  # the process that opened it (-1: not known)
    reads: dict[trio.CancelScope, float] = field(default_factory=dict)  # reads in progress: when each began
    flushed: bool = False  # a descriptor of it was closed while reads waited (see Filesystem.flush)


class ReaderWatch:
    """Cancels the waiting reads of handles whose opening process is gone or killed."""

    def __init__(self, openers: Callable[[], Iterable[Opener]], path_of: Callable[[int], str]) -> None:
        """``openers``: those of the open handles. ``path_of``: an inode's path under the mount
        point ('' if not known: then any process's holding is not looked for)."""
        self._openers = openers
        self._path_of = path_of

    async def watch(self) -> None:
        """Check every _READER_CHECK, until cancelled."""
        while True:
            await trio.sleep(_READER_CHECK)
            before = trio.current_time() - _READER_CHECK
            for opener in list(self._openers()):
                if any(began <= before for began in opener.reads.values()):
                    if opener.flushed or (opener.pid > 0 and not _running(opener.pid)):
                        await self._reader_gone(opener, before)

    async def _reader_gone(self, opener: Opener, before: float) -> None:
        """The opener of a handle is gone, or a descriptor of it was closed: cancel its waiting
        reads, unless a process still has the file open or mapped (a child may have inherited it,
        or the opener kept a duplicate): that one is watched instead. The openers of the file's
        other handles do not count: they read through their own."""
        path = self._path_of(opener.inode)
        others = {o.pid for o in self._openers() if o.inode == opener.inode and o is not opener}
        if not _running(opener.pid):
            others.add(opener.pid)  # a process being killed still shows its descriptors
        opener.flushed = False
        holder = await trio.to_thread.run_sync(_holder, path, others) if path else None
        if holder is not None:
            log.debug("%s: process %d has it open", path, holder)
            opener.pid = holder
            return
        waiting = [scope for scope, began in opener.reads.items() if began <= before]
        log.info("%s: no process holds it any more; cancelling %d read(s) waiting for it",
                 opener.url, len(waiting))
        opener.pid = -1
        for scope in waiting:
            scope.cancel()


def process_of(tid: int) -> int:
    """The process (thread group) a thread belongs to; -1 if it cannot be told.

    The kernel names the thread that made a request; the process outlives that thread.
    """
    fields = _status(tid)
    try:
        return int(fields[b"Tgid"]) if fields is not None else -1
    except (KeyError, ValueError):
        return -1


def _status(pid: int) -> dict[bytes, bytes] | None:
    """The fields of /proc/PID/status (``b"State"``: ``b"S (sleeping)"``...); None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            return dict(line.split(b":", 1) for line in status if b":" in line)
    except OSError:
        return None


def _holder(path: str, skip: set[int]) -> int | None:
    """A running process, not one of ``skip``, that has ``path`` open or mapped, if any."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) not in skip and _holds(int(entry.name), path):
            return int(entry.name)
    return None


def _holds(pid: int, path: str) -> bool:
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(fd.path) == path:
                    return _running(pid)
            except OSError:
                continue  # closed meanwhile
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            if any(line.rstrip("\n").endswith(" " + path) for line in maps):
                return _running(pid)
    except OSError:
        pass  # gone meanwhile, or not ours to read
    return False


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not exiting (a zombie, or SIGKILL pending: a killed
    reader can wait in the kernel for our answer before it exits)."""
    fields = _status(pid)
    if fields is None:
        return False
    try:
        pending = int(fields[b"SigPnd"], 16) | int(fields[b"ShdPnd"], 16)
        state = fields[b"State"].split()[0]
    except (KeyError, ValueError, IndexError):
        return True
    return state not in (b"Z", b"X") and not pending & _SIGKILL_BIT
