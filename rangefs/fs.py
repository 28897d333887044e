"""The FUSE side: inodes, handles and errno; the only module that imports pyfuse3.

The tree is fixed at mount time (one file per URL-list entry, directories from their paths).
Errors become errno here and only here, through ``_ERRNO``; an unexpected exception is logged
with its traceback and answered with EIO, so one bad request never stops the mount.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import mmap
import os
import stat
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from rangefs import kernel, safefs
from rangefs.cache import Cache, CachedFile
from rangefs.errors import CacheError, OriginError, RangefsError, RemoteChanged
from rangefs.origin import RemoteFile
from rangefs.prefetch import Readahead
from rangefs.urllist import Entry

log = logging.getLogger(__name__)

# The tree never changes while mounted, so the kernel may keep names long; attributes carry
# st_blocks (what is cached, for `du`), so they are refreshed every second.
_ENTRY_TIMEOUT = 300.0
_ATTR_TIMEOUT = 1.0

# First match wins: the most specific classes first.
_ERRNO: tuple[tuple[type[BaseException], int], ...] = (
    (RemoteChanged, errno.ESTALE),
    (OriginError, errno.EIO),
    (CacheError, errno.EIO),
    (RangefsError, errno.EIO),
)

# FUSE passthrough (Linux >= 6.9): the kernel reads a file's data from a backing file we name,
# with no request to the daemon. ioctls on /dev/fuse from <linux/fuse.h>: BACKING_OPEN takes a
# struct fuse_backing_map {int32 fd; uint32 flags; uint64 padding} and returns a backing id;
# BACKING_CLOSE takes the id. _IOW(229, nr, size) = 1 << 30 | size << 16 | 229 << 8 | nr.
_FUSE_DEV_IOC_BACKING_OPEN = 1 << 30 | 16 << 16 | 229 << 8 | 1
_FUSE_DEV_IOC_BACKING_CLOSE = 1 << 30 | 4 << 16 | 229 << 8 | 2

# Drop-behind: pages of the kernel's cache of a file (the FUSE file's page cache, filled by its
# readahead) that lie this far behind a sequential reader's latest read are dropped, in steps of
# at least _DROP_STEP. The cache file keeps the same bytes in its own page cache, so a cold read
# through the mount held every byte twice; dropping one copy behind the reader lets the kernel
# reuse those pages for the next ones instead of taking fresh memory, which is slow on this VM
# (free pages go back to the host). A cold 1 GiB `dd bs=1M`: 758 against 514 MB/s, daemon CPU
# 0.67 against 1.03 s, helper 0.94 against 1.73 s (medians of 6 runs each, ABBA order). 64 MiB
# is four times the readahead rangefs sets (kernel.READ_AHEAD_KB): the reader itself has passed
# these pages. Only within a sequential run that started while the file was incomplete, and
# while the handle is the inode's one handle served through read() (see _drop_behind_reader).
_DROP_BEHIND = 64 * 1024 * 1024
_DROP_STEP = 32 * 1024 * 1024
# What libfuse's fuse_lowlevel_notify_inval_inode writes to /dev/fuse: struct fuse_out_header
# {uint32 len; int32 error = the notify code; uint64 unique = 0}, then struct
# fuse_notify_inval_inode_out {uint64 ino; int64 off; int64 len}.
_FUSE_NOTIFY_INVAL_INODE = 2
_NOTIFY_INVAL_INODE = struct.Struct("=IiQQqq")

# Reads waiting this long are checked every as long: has the process that opened the file gone
# (or been killed)? Then nobody takes their answers, and they are cancelled along with the
# fetches only they wanted. pyfuse3 passes no FUSE_INTERRUPT on, and the kernel sends no RELEASE
# while its own reads of the file are unanswered, so this is how a killed reader is noticed.
_READER_CHECK = 0.5
_SIGKILL_BIT = 1 << (9 - 1)  # SIGKILL in the pending-signal masks of /proc/PID/status

_P = ParamSpec("_P")
_R = TypeVar("_R")


def errno_for(exc: BaseException) -> int:
    """The errno a rangefs error becomes at the FUSE boundary."""
    for cls, number in _ERRNO:
        if isinstance(exc, cls):
            return number
    return errno.EIO


def _fuse_errors(fn: Callable[_P, Coroutine[Any, Any, _R]]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Let FUSEError through, map rangefs errors by table, log and EIO anything else."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except RangefsError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno_for(exc)) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


async def _erofs(*args: Any, **kwargs: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


@dataclass
class Node:
    """A file or directory of the mount."""

    inode: int
    name: bytes
    parent: int
    children: dict[bytes, int] | None = None  # directories only
    entry: Entry | None = None  # files only
    cached: CachedFile | None = None  # files only

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclass
class Tree:
    """Inodes of the mount, built once from the URL list."""

    nodes: dict[int, Node] = field(default_factory=dict)

    @classmethod
    def build(cls, files: Sequence[tuple[Entry, CachedFile]]) -> Tree:
        tree = cls()
        tree.nodes[pyfuse3.ROOT_INODE] = Node(pyfuse3.ROOT_INODE, b"", pyfuse3.ROOT_INODE, children={})
        for entry, cached in files:
            parent = tree.nodes[pyfuse3.ROOT_INODE]
            for part in entry.path[:-1]:
                parent = tree._subdir(parent, os.fsencode(part))
            node = tree._add(parent, os.fsencode(entry.path[-1]))
            node.entry, node.cached = entry, cached
        return tree

    def _add(self, parent: Node, name: bytes, directory: bool = False) -> Node:
        assert parent.children is not None and name not in parent.children
        node = Node(len(self.nodes) + pyfuse3.ROOT_INODE, name, parent.inode, children={} if directory else None)
        self.nodes[node.inode] = node
        parent.children[name] = node.inode
        return node

    def _subdir(self, parent: Node, name: bytes) -> Node:
        assert parent.children is not None
        inode = parent.children.get(name)
        return self.nodes[inode] if inode is not None else self._add(parent, name, directory=True)


@dataclass
class _Handle:
    """An open file: its cache, its reader's readahead state, and the version it opened."""

    inode: int
    cached: CachedFile
    readahead: Readahead
    generation: int
    backing: _Backing | None = None  # set: the kernel reads the data file itself; no read reaches us
    drop_behind: bool = False  # drop the kernel's pages behind this reader (see _DROP_BEHIND)
    run: int = -1  # the reader's sequential run (Readahead.run) that ``dropped`` belongs to
    dropped: int = 0  # the kernel's pages from the run's start to this offset were dropped
    dropping: bool = False  # a drop is under way
    opener: int = -1  # the process that opened it (-1: not known)
    reads: dict[trio.CancelScope, float] = field(default_factory=dict)  # reads in progress: when each began
    flushed: bool = False  # a descriptor of it was closed while reads waited (see flush)


@dataclass
class _Backing:
    """A data file the kernel reads for an inode's passthrough handles."""

    backing_id: int
    handles: int = 0


# The kernel's answers to a backing file it will never take (no passthrough negotiated, not
# root, a cache file system it cannot stack on): stop asking. Others fail only that open.
_PASSTHROUGH_REFUSED = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ELOOP)


class Filesystem(pyfuse3.Operations):
    """Read-only operations over a Tree whose files are served by the block cache."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self, tree: Tree, cache: Cache, passthrough: bool = True, direct_io: bool = False,
        tune_system: bool = False, mountpoint: str = ""
    ) -> None:
        """``passthrough``: let the kernel read complete, checked files from the cache itself
        (needs Linux >= 6.9, root, and the pyfuse3 that scripts/build-pyfuse3 builds).
        ``direct_io``: open files that are not complete in the cache with direct I/O (see open).
        ``tune_system``: raise fs.pipe-max-size if spliced replies need it (see rangefs.kernel).
        ``mountpoint``: where the tree is mounted, to find processes that have a file open."""
        super().__init__()
        self.tree = tree
        self.cache = cache
        self.mountpoint = mountpoint
        # Read by pyfuse3 as built by scripts/build-pyfuse3 (ignored by others) during INIT. Only
        # root may name backing files; asking costs a stacking level (no overlayfs on top of us).
        self.enable_passthrough = passthrough and hasattr(pyfuse3, "fuse_fd") and os.geteuid() == 0
        self._passthrough = self.enable_passthrough  # off for good after the kernel refuses once
        # Read by that pyfuse3 during INIT, which sets direct_io_mmap when the kernel (>= 6.6) lets
        # direct-I/O files be mmapped; without that, direct I/O would break mmap (ENODEV).
        self.enable_direct_io_mmap = direct_io
        self.direct_io_mmap = False
        # The same: that pyfuse3 sets splice_replies when read() may answer with a FileSlice,
        # which libfuse splices from the cache file (see rangefs.cache.FileSlice).
        self.enable_splice_replies = True
        self.splice_replies = False
        self.tune_system = tune_system  # may change system-wide settings (see rangefs.kernel)
        self._drop_behind = hasattr(pyfuse3, "fuse_fd")  # writing the notification needs /dev/fuse
        self._notify_fd = -1  # our own descriptor of /dev/fuse for it (see _drop_pages)
        self._drops = trio.CapacityLimiter(1)  # a blocked drop holds one thread, not trio's pool
        self._drops_stopped = False
        self._backings: dict[int, _Backing] = {}  # inode -> its backing while passthrough handles are open
        self._cached_handles: dict[int, int] = {}  # inode -> handles served through read()
        self._handles: dict[int, _Handle] = {}
        self._kernel_generation: dict[int, int] = {}  # inode -> version the kernel's page cache holds
        self._next_fh = 1
        self._mount_time_ns = time.time_ns()
        self._uid, self._gid = os.getuid(), os.getgid()
        self.initialized = trio.Event()

    def init(self) -> None:
        # Called while the kernel's INIT is handled; the reply is sent before any waiter runs.
        if self.direct_io_mmap:
            log.info("files not complete in the cache are opened with direct I/O")
        elif self.enable_direct_io_mmap:
            log.warning("--direct-io needs Linux >= 6.6 and the pyfuse3 that scripts/build-pyfuse3 builds; "
                        "reads go through the page cache")
        if self.splice_replies:
            # Before any reply: libfuse grows its pipe at the first large reply it splices, and
            # after one refusal never tries again (each reply is then read and copied by libfuse).
            self.splice_replies = kernel.allow_splice_pipes(self.tune_system)
            log.info("replies to reads are %s", "spliced from the cache files when their bytes are in the page cache"
                     if self.splice_replies else "copied (no pipe of 2 MiB allowed, see fs.pipe-max-size)")
        if self._drop_behind:
            # Never closed (the process ends after the unmount): a drop abandoned at the unmount
            # may still write to it, and a closed number could meanwhile name another file.
            self._notify_fd = os.dup(pyfuse3.fuse_fd())
            log.info("the kernel's pages of a file far behind a sequential reader are dropped "
                     "(the cache file keeps them)")
        self.initialized.set()

    def _node(self, inode: int) -> Node:
        try:
            return self.tree.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.InodeT(node.inode)
        attrs.entry_timeout = _ENTRY_TIMEOUT
        attrs.attr_timeout = _ATTR_TIMEOUT
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        mtime = self._mount_time_ns
        if node.cached is not None:
            remote: RemoteFile = node.cached.remote
            attrs.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o444)
            attrs.st_nlink = 1
            attrs.st_size = remote.size
            attrs.st_blksize = node.cached.block_size
            attrs.st_blocks = -(-node.cached.cached_bytes() // 512)  # `du` shows what is cached
            mtime = remote.mtime_ns or mtime
        else:
            attrs.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o555)
            attrs.st_nlink = 2
            attrs.st_size = 0
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = mtime
        return attrs

    @_fuse_errors
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attributes(parent)
        if name == b"..":
            return self._attributes(self._node(parent.parent))
        inode = parent.children.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(self._node(inode))

    @_fuse_errors
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(self._node(inode))

    @_fuse_errors
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    @_fuse_errors
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = self._node(fh).children or {}
        for index, (name, inode) in enumerate(sorted(children.items())):
            if index < start_id:
                continue
            attrs = self._attributes(self._node(inode))
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name), attrs, index + 1):
                return

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_fuse_errors
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.cached is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        cached = node.cached
        try:
            await cached.revalidate()
        except RemoteChanged:
            raise
        except OriginError as exc:  # cannot ask the server: the cached version is still one version
            log.warning("%s: cannot revalidate (%s); serving the cached version", cached.identity.url, exc)
        await cached.acquire()
        backing = None
        try:
            backing = await self._backing_for(inode, cached)
            # keep_cache: pages the kernel holds stay valid while the version does. After a version
            # switch the kernel must drop them (it does at an open without keep_cache) and its size.
            keep_cache = self._kernel_generation.setdefault(inode, cached.generation) == cached.generation
            if not keep_cache:
                self._kernel_generation[inode] = cached.generation
                pyfuse3.invalidate_inode(inode, attr_only=True)
        except BaseException:
            if backing is not None and backing.handles == 0:  # made for this open: no one else uses it
                del self._backings[inode]
                _backing_close(backing.backing_id)
            await cached.release()
            raise
        # Counted only now, with nothing left to fail: each count is undone by one RELEASE.
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(inode, cached, self.cache.config.readahead(), cached.generation, backing,
                                    opener=_process_of(ctx.pid))
        if backing is not None:
            backing.handles += 1
            cached.passthrough_handles += 1
            # The kernel refuses keep_cache with passthrough; its page cache is unused.
            return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=False, backing_id=backing.backing_id)
        self._cached_handles[inode] = self._cached_handles.get(inode, 0) + 1
        # Direct I/O: the kernel hands each read() to us at the reader's size and copies our answer
        # straight into the reader's buffer, instead of filling its own page cache in 1 MiB
        # readahead requests. A cold `dd bs=1M` of 1 GiB ran ~1.5x as fast (548-627 against
        # 358-405 MB/s, 4 runs each, taking turns), but every read costs a request (~0.1-0.14 ms
        # of daemon CPU): 32 KiB reads (ffmpeg's) ran at half the speed, 4 KiB reads at a tenth.
        # Hence an option, and only for files not complete yet (a complete one keeps the page cache).
        direct = self.direct_io_mmap and cached.cached_bytes() < cached.size
        self._handles[fh].drop_behind = self._drop_behind and not direct  # its first read decides
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=keep_cache, direct_io=direct)

    async def _backing_for(self, inode: int, cached: CachedFile) -> _Backing | None:
        """The backing for a passthrough open of ``inode``, or None to serve it through read().

        The kernel fails an open (EIO) that would mix the two modes on one inode, and wants one
        backing file for all passthrough opens of an inode: while an inode has passthrough handles
        every open joins them (the version cannot change meanwhile, see CachedFile.revalidate);
        else an open passes through only if no handle of the inode is served by read() and the
        file is complete, checked and flushed. Our counts drop at RELEASE, after the kernel's: never
        too low.

        A complete file whose last blocks are not flushed yet is served through read() meanwhile,
        from the page cache, rather than waiting for the flush: right after a cold read of 1 GiB
        the next open waited 1.7 s for it here. The last close flushes it; later opens pass through.
        """
        backing = self._backings.get(inode)
        if backing is not None:
            return backing

        def ready() -> bool:
            return self._passthrough and not self._cached_handles.get(inode) and cached.passthrough_ready()

        if not ready():
            return None
        generation = cached.generation
        try:
            backing_id = await trio.to_thread.run_sync(_backing_open, cached.data_path)
        except OSError as exc:
            if exc.errno in _PASSTHROUGH_REFUSED:
                log.info("the kernel takes no cache file for FUSE passthrough (%s); every read goes through "
                         "rangefs", exc.strerror)
                self._passthrough = False
            else:
                log.warning("%s: no passthrough for this open: %s", cached.identity.url, exc.strerror)
            return self._backings.get(inode)  # one made meanwhile must be joined: the kernel allows no mix
        backing = self._backings.get(inode)  # another open may have made one, or a read() handle come
        if backing is None and ready() and cached.generation == generation:
            backing = self._backings[inode] = _Backing(backing_id)
            log.debug("%s: complete and checked; the kernel reads it from the cache file", cached.identity.url)
        else:
            _backing_close(backing_id)
        return backing

    @_fuse_errors
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        # pyfuse3 takes any buffer, and a FileSlice from the one scripts/build-pyfuse3 builds; its
        # stub says bytes. A bytearray spares a copy per read.
        with trio.CancelScope() as scope:  # cancelled by watch_readers once its reader is gone
            handle.reads[scope] = trio.current_time()
            try:
                data = await handle.cached.read(off, size, handle.readahead, handle.generation,
                                                slices=self.splice_replies)
            finally:
                del handle.reads[scope]
        if scope.cancelled_caught:
            raise pyfuse3.FUSEError(errno.EINTR)
        if handle.drop_behind:
            self._drop_behind_reader(handle)
        return cast(bytes, data)

    def _drop_behind_reader(self, handle: _Handle) -> None:
        """Drop the kernel's pages of the file far behind a sequential reader (see _DROP_BEHIND).

        Pages of the reader's current sequential run only. A run that starts once the file is
        complete drops nothing: a reader that passes over a file again (an mmap of model weights,
        a looped video) keeps the kernel's copy, the fast one.
        """
        readahead, cached = handle.readahead, handle.cached
        if readahead.expected is None or handle.dropping or self._drops_stopped:
            return
        if readahead.run != handle.run:
            handle.run, handle.dropped = readahead.run, readahead.expected - readahead.consumed
            handle.drop_behind = cached.cached_bytes() < cached.size
        stop = (readahead.expected - _DROP_BEHIND) // mmap.PAGESIZE * mmap.PAGESIZE
        start = handle.dropped
        if not handle.drop_behind or stop - start < _DROP_STEP or self._cached_handles.get(handle.inode) != 1:
            return
        handle.dropped, handle.dropping = stop, True
        if not self.cache.spawn(self._drop_pages, handle, start, stop):
            handle.dropping = False

    async def _drop_pages(self, handle: _Handle, start: int, stop: int) -> None:
        message = _NOTIFY_INVAL_INODE.pack(_NOTIFY_INVAL_INODE.size, _FUSE_NOTIFY_INVAL_INODE, 0,
                                           handle.inode, start, stop - start)
        try:
            # In a worker thread: the kernel waits for pages that a read in flight holds locked,
            # and that read waits for the FUSE loop (see stop_drops). Abandoned if cancelled, on
            # our own descriptor, so no reused descriptor number can receive it.
            await trio.to_thread.run_sync(os.write, self._notify_fd, message, limiter=self._drops,
                                          abandon_on_cancel=True)
        except OSError as exc:  # the kernel forgot the inode meanwhile, or the mount is going away
            log.debug("dropping pages %d-%d of inode %d: %s", start, stop, handle.inode, exc.strerror)
        finally:
            handle.dropping = False
        if handle.drop_behind:
            self._drop_behind_reader(handle)  # the reader may have gone a step further meanwhile

    async def stop_drops(self, timeout: float) -> None:
        """Start no more drops and wait (up to ``timeout``) for the one under way, if any.

        Called while requests are still answered, before the FUSE loop stops: a drop waits for
        pages whose reads are in flight, and once the loop stops nobody answers those reads, so
        the drop's write would never return and the daemon could not exit.
        """
        self._drops_stopped = True
        with trio.move_on_after(timeout):
            async with self._drops:  # first in first out: after every drop already waiting
                pass

    @_fuse_errors
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        handle.drop_behind = False  # a drop under way must not start another for a closed handle
        inode, backing = handle.inode, handle.backing
        if backing is not None:
            handle.cached.passthrough_handles -= 1
            backing.handles -= 1
            if backing.handles == 0:
                del self._backings[inode]
                _backing_close(backing.backing_id)
        else:
            self._cached_handles[inode] -= 1
            if not self._cached_handles[inode]:
                del self._cached_handles[inode]
        await handle.cached.release(handle.readahead)

    async def watch_readers(self) -> None:
        """Cancel the reads of handles whose opening process is gone or killed (see _READER_CHECK)."""
        while True:
            await trio.sleep(_READER_CHECK)
            before = trio.current_time() - _READER_CHECK
            for handle in list(self._handles.values()):
                if any(began <= before for began in handle.reads.values()):
                    if handle.flushed or (handle.opener > 0 and not _running(handle.opener)):
                        await self._reader_gone(handle, before)

    async def _reader_gone(self, handle: _Handle, before: float) -> None:
        """The opener of ``handle`` is gone, or a descriptor of it was closed: cancel its waiting
        reads, unless a process still has the file open or mapped (a child may have inherited it,
        or the opener kept a duplicate): that one is watched instead. The openers of the file's
        other handles do not count: they read through their own."""
        path = self._path_of(handle.inode)
        others = {h.opener for h in self._handles.values() if h.inode == handle.inode and h is not handle}
        if not _running(handle.opener):
            others.add(handle.opener)  # a process being killed still shows its descriptors
        handle.flushed = False
        holder = await trio.to_thread.run_sync(_holder, path, others) if path else None
        if holder is not None:
            log.debug("%s: process %d has it open", path, holder)
            handle.opener = holder
            return
        waiting = [scope for scope, began in handle.reads.items() if began <= before]
        log.info("%s: no process holds it any more; cancelling %d read(s) waiting for it",
                 handle.cached.identity.url, len(waiting))
        handle.opener = -1
        for scope in waiting:
            scope.cancel()

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        """A descriptor of the handle was closed (one of several, maybe). Reads still waiting may
        be only the kernel's readahead for a reader that is done: its RELEASE waits for them, so
        watch_readers checks whether any process still holds the file."""
        handle = self._handles.get(fh)
        if handle is not None and handle.reads:
            handle.flushed = True

    def _path_of(self, inode: int) -> str:
        """The path of a file under the mount point ('' when the mount point is not known)."""
        if not self.mountpoint:
            return ""
        names = []
        node = self.tree.nodes[inode]
        while node.inode != pyfuse3.ROOT_INODE:
            names.append(os.fsdecode(node.name))
            node = self.tree.nodes[node.parent]
        return os.path.join(self.mountpoint, *reversed(names))

    def _handle(self, fh: int) -> _Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        files = [n.cached for n in self.tree.nodes.values() if n.cached is not None]
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = sum(-(-f.size // 4096) for f in files)
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.tree.nodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    @_fuse_errors
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        node = self._node(inode)
        if node.cached is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        values = _xattrs(node.cached)
        if name not in values:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return values[name]

    @_fuse_errors
    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> Sequence[pyfuse3.XAttrNameT]:
        node = self._node(inode)
        return [] if node.cached is None else [pyfuse3.XAttrNameT(name) for name in _xattrs(node.cached)]

    # Everything that would change the tree or a file answers EROFS.
    setattr = _erofs
    mknod = _erofs
    mkdir = _erofs
    unlink = _erofs
    rmdir = _erofs
    symlink = _erofs
    rename = _erofs
    link = _erofs
    write = _erofs
    create = _erofs
    setxattr = _erofs
    removexattr = _erofs


def _xattrs(cached: CachedFile) -> dict[bytes, bytes]:
    """Per-file cache state, readable with ``getfattr -d``; URLs are shown redacted."""
    return {
        b"user.rangefs.url": cached.identity.url.encode(),
        b"user.rangefs.cached_bytes": str(cached.cached_bytes()).encode(),
        b"user.rangefs.saved_bytes": str(cached.saved_bytes()).encode(),
        b"user.rangefs.block_size": str(cached.block_size).encode(),
        b"user.rangefs.passthrough_handles": str(cached.passthrough_handles).encode(),
    }


def _status(pid: int) -> dict[bytes, bytes] | None:
    """The fields of /proc/PID/status (``b"State"``: ``b"S (sleeping)"``...); None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            return dict(line.split(b":", 1) for line in status if b":" in line)
    except OSError:
        return None


def _process_of(tid: int) -> int:
    """The process (thread group) a thread belongs to; -1 if it cannot be told.

    The kernel names the thread that made a request; the process outlives that thread.
    """
    fields = _status(tid)
    try:
        return int(fields[b"Tgid"]) if fields is not None else -1
    except (KeyError, ValueError):
        return -1


def _holder(path: str, skip: set[int]) -> int | None:
    """A running process, not one of ``skip``, that has ``path`` open or mapped, if any.

    Reads only /proc (the links name the file without asking us: no request to our own mount).
    """
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


def _backing_open(path: os.PathLike[str]) -> int:
    """Register ``path`` with the kernel as a passthrough backing file; its id.

    The kernel keeps its own reference to the file. It gets a descriptor of its own, not the
    cache's: that one holds the cache's flock, which must go when the cache closes it.
    """
    fd = safefs.open(Path(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        request = bytearray(struct.pack("=iIQ", fd, 0, 0))
        return int(fcntl.ioctl(pyfuse3.fuse_fd(), _FUSE_DEV_IOC_BACKING_OPEN, request, True))
    finally:
        os.close(fd)


def _backing_close(backing_id: int) -> None:
    """Drop our reference to a backing file (files still open through it keep theirs)."""
    try:
        fcntl.ioctl(pyfuse3.fuse_fd(), _FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("=I", backing_id)), True)
    except OSError as exc:
        log.warning("cannot close passthrough backing %d: %s", backing_id, exc.strerror)
