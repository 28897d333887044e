"""Which opens the kernel serves from the cache file itself (FUSE passthrough), and their backing files.

FUSE passthrough (Linux >= 6.9): the kernel reads a file's data from a backing file we name,
with no request to the daemon. The kernel fails an open (EIO) that would mix passthrough and
daemon-served handles on one inode, and wants one backing file for all passthrough handles of an
inode; this module keeps both per-inode counts so that every open is one or the other.

Imports the cache (the file's readiness and its count of passthrough handles) and safefs; never
pyfuse3: fs.py hands it ``pyfuse3.fuse_fd`` as a callable, since /dev/fuse is open only once the
mount exists.

Concurrency: every field is read and written on the trio thread, by the open and release
handlers. Only BACKING_OPEN runs in a worker thread (it opens the cache file, which may block);
it touches no field, and ``backing_for`` reads the tables again after it, since other opens and
releases run meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from rangefs import safefs

if TYPE_CHECKING:
    from rangefs.cachedfile import CachedFile

log = logging.getLogger(__name__)

# ioctls on /dev/fuse from <linux/fuse.h>: BACKING_OPEN takes a struct fuse_backing_map
# {int32 fd; uint32 flags; uint64 padding} and returns a backing id; BACKING_CLOSE takes the id.
# _IOW(229, nr, size) = 1 << 30 | size << 16 | 229 << 8 | nr.
_FUSE_DEV_IOC_BACKING_OPEN = 1 << 30 | 16 << 16 | 229 << 8 | 1
_FUSE_DEV_IOC_BACKING_CLOSE = 1 << 30 | 4 << 16 | 229 << 8 | 2

# The kernel's answers to a backing file it will never take (no passthrough negotiated, not
# root, a cache file system it cannot stack on): stop asking. Others fail only that open.
_PASSTHROUGH_REFUSED = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ELOOP)


@dataclass
class Backing:
    """A data file the kernel reads for an inode's passthrough handles."""

    backing_id: int
    handles: int = 0


class Passthrough:
    """Per inode: its backing while passthrough handles are open, or its daemon-served handles."""

    def __init__(self, enabled: bool, fuse_fd: Callable[[], int]) -> None:
        """``enabled``: passthrough was asked for during INIT. ``fuse_fd``: our descriptor of
        /dev/fuse, where backing files are named (called only once the mount exists)."""
        self.enabled = enabled  # off for good after the kernel refuses once
        self._fuse_fd = fuse_fd
        self._backings: dict[int, Backing] = {}  # inode -> its backing while passthrough handles are open
        self._daemon_handles: dict[int, int] = {}  # inode -> handles served through read()

    def daemon_handles(self, inode: int) -> int:
        """How many open handles of ``inode`` the daemon serves through read()."""
        return self._daemon_handles.get(inode, 0)

    async def backing_for(self, inode: int, cached: CachedFile) -> Backing | None:
        """The backing for a passthrough open of ``inode``, or None to serve it through read().

        While an inode has passthrough handles every open joins them (the version cannot change
        meanwhile, see CachedFile.revalidate); else an open passes through only if no handle of
        the inode is served by read() and the file is complete, checked and flushed. Our counts
        fall at RELEASE, after the kernel's: never too low.

        A complete file whose last blocks are not flushed yet is served through read() meanwhile,
        from the page cache, rather than waiting for the flush, which a large cold read makes long
        (docs/experiments.md, 'Flush at last close'). The last close flushes it; later opens pass through.
        """
        backing = self._backings.get(inode)
        if backing is not None:
            return backing

        def ready() -> bool:
            return self.enabled and not self._daemon_handles.get(inode) and cached.passthrough_ready()

        if not ready():
            return None
        generation = cached.generation
        try:
            backing_id = await trio.to_thread.run_sync(self._backing_open, cached.data_path)
        except OSError as exc:
            if exc.errno in _PASSTHROUGH_REFUSED:
                log.info("the kernel takes no cache file for FUSE passthrough (%s); every read goes through "
                         "rangefs", exc.strerror)
                self.enabled = False
            else:
                log.warning("%s: no passthrough for this open: %s", cached.identity.url, exc.strerror)
            return self._backings.get(inode)  # one made meanwhile must be joined: the kernel allows no mix
        backing = self._backings.get(inode)  # another open may have made one, or a read() handle come
        if backing is None and ready() and cached.generation == generation:
            backing = self._backings[inode] = Backing(backing_id)
            log.debug("%s: complete and checked; the kernel reads it from the cache file", cached.identity.url)
        else:
            self._backing_close(backing_id)
        return backing

    def abandon(self, inode: int, backing: Backing | None) -> None:
        """An open that got ``backing`` failed: close the backing if it was made for that open."""
        if backing is not None and backing.handles == 0:  # made for this open: no one else uses it
            del self._backings[inode]
            self._backing_close(backing.backing_id)

    def opened(self, inode: int, cached: CachedFile, backing: Backing | None) -> None:
        """Count a handle of ``inode`` the open answered: through ``backing``, or served by read()."""
        if backing is not None:
            backing.handles += 1
            cached.passthrough_opened()
        else:
            self._daemon_handles[inode] = self._daemon_handles.get(inode, 0) + 1

    def released(self, inode: int, cached: CachedFile, backing: Backing | None) -> None:
        """Undo ``opened`` at the handle's RELEASE; the last passthrough handle closes the backing."""
        if backing is not None:
            cached.passthrough_closed()
            backing.handles -= 1
            if backing.handles == 0:
                del self._backings[inode]
                self._backing_close(backing.backing_id)
        else:
            self._daemon_handles[inode] -= 1
            if not self._daemon_handles[inode]:
                del self._daemon_handles[inode]

    def _backing_open(self, path: os.PathLike[str]) -> int:
        """Register ``path`` with the kernel as a passthrough backing file; its id.

        The kernel keeps its own reference to the file. It gets a descriptor of its own, not the
        cache's: that one holds the cache's flock, which must go when the cache closes it.
        """
        fd = safefs.open(Path(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            request = bytearray(struct.pack("=iIQ", fd, 0, 0))
            return int(fcntl.ioctl(self._fuse_fd(), _FUSE_DEV_IOC_BACKING_OPEN, request, True))
        finally:
            os.close(fd)

    def _backing_close(self, backing_id: int) -> None:
        """Close our reference to a backing file (files still open through it keep theirs)."""
        try:
            fcntl.ioctl(self._fuse_fd(), _FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("=I", backing_id)), True)
        except OSError as exc:
            log.warning("cannot close passthrough backing %d: %s", backing_id, exc.strerror)
