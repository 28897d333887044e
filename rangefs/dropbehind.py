"""Drop-behind: drop the kernel's pages of a file that lie far behind a sequential reader.

The kernel's page cache of a mounted file (filled by its readahead) and the cache file's own page
cache hold the same bytes, so a cold read through the mount holds every byte twice. Dropping the
mounted file's pages far behind the reader lets the kernel reuse them for the next ones instead
of taking fresh memory, which costs time and CPU where free memory is slow to get back (measured:
docs/experiments.md, 'Drop-behind'). Only within a sequential stretch of reads that started while
the file was incomplete, and while the handle is its inode's one handle served through read().
Here "drop" always means dropping the kernel's pages of the mounted file; the cache file keeps its own.

Imports trio, the cache (its task group runs the drops; a file's cached bytes) and the reader's
Readahead (where its sequential stretch started); never pyfuse3: fs.py hands over a descriptor of
/dev/fuse at INIT, and the notification is written to it as libfuse's
fuse_lowlevel_notify_inval_inode writes it.

Concurrency: every field is read and written on the trio thread (the read and release handlers,
and the drop tasks started in the cache's task group). A drop's write runs in a worker thread
behind a CapacityLimiter(1), so a write the kernel blocks holds one thread, not trio's pool; that
thread touches no field. ``ReaderPages.dropping`` and ``dropped_to`` are set before a drop starts
and ``dropping`` is cleared when its thread returns, so one handle has at most one drop at a time.
A write abandoned at the unmount may still run later, on our own descriptor, which is never closed.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from rangefs.prefetch import Readahead

if TYPE_CHECKING:
    from rangefs.cache import Cache
    from rangefs.cachedfile import CachedFile

log = logging.getLogger(__name__)

# Pages this far behind a sequential reader's latest read are dropped, in steps of at least
# _DROP_STEP: far beyond what the kernel's readahead (kernel.READ_AHEAD_KB) runs ahead of the
# reader, so the reader itself has passed these pages.
_DROP_BEHIND = 64 * 1024 * 1024
_DROP_STEP = 32 * 1024 * 1024
# What libfuse's fuse_lowlevel_notify_inval_inode writes to /dev/fuse: struct fuse_out_header
# {uint32 len; int32 error = the notify code; uint64 unique = 0}, then struct
# fuse_notify_inval_inode_out {uint64 ino; int64 off; int64 len}.
_FUSE_NOTIFY_INVAL_INODE = 2
_NOTIFY_INVAL_INODE = struct.Struct("=IiQQqq")


@dataclass
class ReaderPages:
    """Per open handle: how far the kernel's pages behind its reader were dropped."""

    inode: int
    cached: CachedFile
    readahead: Readahead
    active: bool = False  # drop the kernel's pages behind this reader
    stretch: int = -1  # the reader's sequential stretch (Readahead.stretch) that ``dropped_to`` belongs to
    dropped_to: int = 0  # the kernel's pages from the stretch's start to this offset were dropped
    dropping: bool = False  # a drop is under way


class DropBehind:
    """Drops the kernel's pages behind sequential readers, one drop at a time."""

    def __init__(self, available: bool, cache: Cache, daemon_handles: Callable[[int], int]) -> None:
        """``available``: the notification can be written (this pyfuse3 exposes /dev/fuse).
        ``cache``: its task group runs the drops. ``daemon_handles``: how many handles of an
        inode the daemon serves through read() (drops only while there is exactly one)."""
        self.available = available
        self._cache = cache
        self._daemon_handles = daemon_handles
        self._notify_fd = -1  # our own descriptor of /dev/fuse (see start)
        self._limiter = trio.CapacityLimiter(1)  # a blocked drop holds one thread, not trio's pool
        self._stopped = False

    def start(self, fuse_fd: int) -> None:
        """At INIT: take our own descriptor of /dev/fuse for the notifications."""
        # Never closed (the process ends after the unmount): a drop abandoned at the unmount
        # may still write to it, and a closed number could meanwhile name another file.
        self._notify_fd = os.dup(fuse_fd)
        log.info("the kernel's pages of a file far behind a sequential reader are dropped "
                 "(the cache file keeps them)")

    def after_read(self, pages: ReaderPages) -> None:
        """Drop the kernel's pages of the file far behind a sequential reader (see _DROP_BEHIND).

        Pages of the reader's current sequential stretch only. A stretch that starts once the
        file is complete drops nothing: a reader that passes over a file again (an mmap of model
        weights, a looped video) keeps the kernel's copy, the fast one.
        """
        readahead, cached = pages.readahead, pages.cached
        if readahead.expected is None or pages.dropping or self._stopped:
            return
        if readahead.stretch != pages.stretch:
            pages.stretch, pages.dropped_to = readahead.stretch, readahead.expected - readahead.consumed
            pages.active = cached.cached_bytes() < cached.size
        stop = (readahead.expected - _DROP_BEHIND) // mmap.PAGESIZE * mmap.PAGESIZE
        start = pages.dropped_to
        if not pages.active or stop - start < _DROP_STEP or self._daemon_handles(pages.inode) != 1:
            return
        pages.dropped_to, pages.dropping = stop, True
        if not self._cache.spawn(self._drop, pages, start, stop):
            pages.dropping = False

    async def _drop(self, pages: ReaderPages, start: int, stop: int) -> None:
        message = _NOTIFY_INVAL_INODE.pack(_NOTIFY_INVAL_INODE.size, _FUSE_NOTIFY_INVAL_INODE, 0,
                                           pages.inode, start, stop - start)
        try:
            # In a worker thread: the kernel waits for pages that a read in flight holds locked,
            # and that read waits for the FUSE loop (see stop). Abandoned if cancelled, on our
            # own descriptor, so no reused descriptor number can receive it.
            await trio.to_thread.run_sync(os.write, self._notify_fd, message, limiter=self._limiter,
                                          abandon_on_cancel=True)
        except OSError as exc:  # the kernel forgot the inode meanwhile, or the mount is going away
            log.debug("dropping pages %d-%d of inode %d: %s", start, stop, pages.inode, exc.strerror)
        finally:
            pages.dropping = False
        if pages.active:
            self.after_read(pages)  # the reader may have gone a step further meanwhile

    async def stop(self, timeout: float) -> None:
        """Start no more drops and wait (up to ``timeout``) for the one under way, if any.

        Called while requests are still answered, before the FUSE loop stops: a drop waits for
        pages whose reads are in flight, and once the loop stops nobody answers those reads, so
        the drop's write would never return and the daemon could not exit.
        """
        self._stopped = True
        with trio.move_on_after(timeout):
            async with self._limiter:  # first in first out: after every drop already waiting
                pass
