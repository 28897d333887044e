"""The FUSE operations: inodes, handles, errno and INIT; the module that answers pyfuse3's requests.

A thin adapter over the tree (rangefs.tree) and the cached files (rangefs.cachedfile): each handler
finds its node or handle, asks the cached file, and answers. An open is served either by the
kernel from the cache file (rangefs.passthrough) or through read(), behind which the kernel's
pages are dropped (rangefs.dropbehind); reads whose reader went away are cancelled
(rangefs.readers). Errors become errno here and only here, through ``_ERRNO``; an unexpected
exception is logged with its traceback and answered with EIO, so one bad request never stops the
mount.

Concurrency: every handler runs on the trio thread, in pyfuse3's tasks; ``_handles``,
``_next_fh`` and ``_kernel_generation`` are touched only there. A handler's ``await`` (the cached
file's revalidate, acquire and read, a backing file's open) lets other handlers run between its
steps: open counts a handle only once nothing can fail any more.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from rangefs import kernel
from rangefs.cache import Cache
from rangefs.cachedfile import CachedFile
from rangefs.dropbehind import DropBehind, ReaderPages
from rangefs.errors import CacheError, OriginError, RangefsError, RemoteChanged, RemoteNotFound
from rangefs.lazy import Probes
from rangefs.offline import ServerDown
from rangefs.origin import RemoteFile
from rangefs.passthrough import Backing, Passthrough
from rangefs.prefetch import Readahead
from rangefs.readers import Opener, ReaderWatch, process_of
from rangefs.tree import Node, Tree

log = logging.getLogger(__name__)

# The tree changes only by a reload, which tells the kernel (rangefs.reload), so the kernel may
# keep names long; attributes carry st_blocks (what is cached, for `du`), so they are refreshed
# every second.
_ENTRY_TIMEOUT = 300.0
_ATTR_TIMEOUT = 1.0

# First match wins: the most specific classes first.
_ERRNO: tuple[tuple[type[BaseException], int], ...] = (
    (RemoteChanged, errno.ESTALE),
    (OriginError, errno.EIO),
    (CacheError, errno.EIO),
    (RangefsError, errno.EIO),
)

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


def _fuse_fd() -> int:
    """Our descriptor of /dev/fuse, once mounted (only the pyfuse3 of scripts/build-pyfuse3 has it)."""
    return pyfuse3.fuse_fd()


async def _erofs(*args: Any, **kwargs: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


@dataclass
class _Handle:
    """An open file: its cache, its reader's readahead state, the version it opened, and the
    per-handle state of passthrough, drop-behind and the reader watch."""

    inode: int
    cached: CachedFile
    readahead: Readahead
    generation: int
    backing: Backing | None  # set: the kernel reads the data file itself; no read reaches us
    pages: ReaderPages  # the kernel's pages dropped behind its reader (rangefs.dropbehind)
    opener: Opener  # who opened it, and its reads in progress (rangefs.readers)


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
        self._passthrough = Passthrough(self.enable_passthrough, _fuse_fd)
        # Read by that pyfuse3 during INIT, which sets direct_io_mmap when the kernel (>= 6.6) lets
        # direct-I/O files be mmapped; without that, direct I/O would break mmap (ENODEV).
        self.enable_direct_io_mmap = direct_io
        self.direct_io_mmap = False
        # The same: that pyfuse3 sets splice_replies when read() may answer with a FileSlice,
        # which libfuse splices from the cache file (see rangefs.cachedfile.FileSlice).
        self.enable_splice_replies = True
        self.splice_replies = False
        self.tune_system = tune_system  # may change system-wide settings (see rangefs.kernel)
        # Drop-behind writes its notifications to /dev/fuse, which only that pyfuse3 exposes.
        self._drop_behind = DropBehind(hasattr(pyfuse3, "fuse_fd"), cache, self._passthrough.daemon_handles)
        self._handles: dict[int, _Handle] = {}
        self._readers = ReaderWatch(lambda: (h.opener for h in self._handles.values()), self._path_of)
        self._kernel_generation: dict[int, int] = {}  # inode -> version the kernel's page cache holds
        self._next_fh = 1
        self._mount_time_ns = time.time_ns()
        self._uid, self._gid = os.getuid(), os.getgid()
        self.initialized = trio.Event()
        self.probes: Probes | None = None  # the probes the mount did not wait for (rangefs.lazy)

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
        if self._drop_behind.available:
            self._drop_behind.start(pyfuse3.fuse_fd())
        self.initialized.set()

    def _node(self, inode: int) -> Node:
        try:
            return self.tree.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def _probed(self, node: Node) -> Node:
        """``node``, its probe waited for if it is a file not probed yet (rangefs.lazy). A file
        the server does not have is ENOENT; other failures EIO (the probe logged why)."""
        if node.entry is not None and node.cached is None and self.probes is not None:
            try:
                await self.probes.resolve(node)
            except RemoteNotFound:
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            except OriginError:
                raise pyfuse3.FUSEError(errno.EIO) from None
        return node

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.InodeT(node.inode)
        attrs.entry_timeout = _ENTRY_TIMEOUT
        attrs.attr_timeout = _ATTR_TIMEOUT
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        mtime = self._mount_time_ns
        if not node.is_dir:
            if node.cached is None:  # its probe failed (see _probed)
                raise pyfuse3.FUSEError(errno.EIO)
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
        return self._attributes(await self._probed(self._node(inode)))

    @_fuse_errors
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(await self._probed(self._node(inode)))

    @_fuse_errors
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    @_fuse_errors
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        children = self._node(fh).children or {}
        entries = sorted(children.items())
        if self.probes is not None:  # attributes need the probes of the files listed
            nodes = (self.tree.nodes.get(inode) for _, inode in entries[start_id:])
            await self.probes.resolve_all(node for node in nodes if node is not None)
            entries = sorted((self._node(fh).children or {}).items())  # a reload may have come meanwhile
        for index, (name, inode) in enumerate(entries):
            if index < start_id:
                continue
            node = self.tree.nodes.get(inode)
            if node is None or (not node.is_dir and node.cached is None):
                continue  # a file whose probe failed is left out (its lookup says why)
            attrs = self._attributes(node)
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name), attrs, index + 1):
                return

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_fuse_errors
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = await self._probed(self._node(inode))
        if node.cached is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        cached = node.cached
        switched = False
        try:
            switched = await cached.revalidate()
        except RemoteChanged:
            raise
        except OriginError as exc:  # cannot ask the server: the cached version is still one version
            # A server that is down was warned about once (rangefs.offline), not for every file.
            log.log(logging.DEBUG if isinstance(exc, ServerDown) else logging.WARNING,
                    "%s: cannot revalidate (%s); serving the cached version", cached.identity.url, exc)
        await cached.acquire()
        backing = None
        try:
            backing = await self._passthrough.backing_for(inode, cached)
            # keep_cache: pages the kernel holds stay valid while the version does. After a version
            # switch the kernel must drop them (it does at an open without keep_cache) and its size.
            keep_cache = self._kernel_generation.setdefault(inode, cached.generation) == cached.generation
            if not keep_cache:
                self._kernel_generation[inode] = cached.generation
            if not keep_cache or switched:
                # Also a switch at this open, the first of the file in this mount: the size the
                # kernel holds came from a lookup (maybe from the catalog, before any probe).
                pyfuse3.invalidate_inode(inode, attr_only=True)
        except BaseException:
            self._passthrough.abandon(inode, backing)
            await cached.release()
            raise
        # Counted only now, with nothing left to fail: each count is undone by one RELEASE.
        fh = self._next_fh
        self._next_fh += 1
        readahead = self.cache.config.readahead()
        handle = self._handles[fh] = _Handle(inode, cached, readahead, cached.generation, backing,
                                             ReaderPages(inode, cached, readahead),
                                             Opener(inode, cached.identity.url, process_of(ctx.pid)))
        self._passthrough.opened(inode, cached, backing)
        if backing is not None:
            # The kernel refuses keep_cache with passthrough; its page cache is unused.
            return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=False, backing_id=backing.backing_id)
        # Direct I/O: the kernel hands each read() to us at the reader's size and copies our answer
        # straight into the reader's buffer, instead of filling its own page cache in readahead
        # requests. Faster for a large sequential reader, but every read costs a request, so small
        # reads get slower (measured: docs/experiments.md, 'Direct I/O option'). Hence an option, and only
        # for files not complete yet (a complete one keeps the page cache).
        direct = self.direct_io_mmap and cached.cached_bytes() < cached.size
        handle.pages.active = self._drop_behind.available and not direct  # its first read decides
        if not direct:
            readahead.lead = kernel.READAHEAD_LEAD
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=keep_cache, direct_io=direct)

    @_fuse_errors
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        handle = self._handle(fh)
        # pyfuse3 takes any buffer, and a FileSlice from the one scripts/build-pyfuse3 builds; its
        # stub says bytes. A bytearray spares a copy per read.
        with trio.CancelScope() as scope:  # cancelled by watch_readers once its reader is gone
            handle.opener.reads[scope] = trio.current_time()
            try:
                data = await handle.cached.read(off, size, handle.readahead, handle.generation,
                                                slices=self.splice_replies)
            finally:
                del handle.opener.reads[scope]
        if scope.cancelled_caught:
            raise pyfuse3.FUSEError(errno.EINTR)
        if handle.pages.active:
            self._drop_behind.after_read(handle.pages)
        return cast(bytes, data)

    async def stop_drops(self, timeout: float) -> None:
        """Start no more drop-behind and wait (up to ``timeout``) for the drop under way, if any
        (see DropBehind.stop: called before the FUSE loop stops)."""
        await self._drop_behind.stop(timeout)

    @_fuse_errors
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        handle.pages.active = False  # a drop under way must not start another for a closed handle
        self._passthrough.released(handle.inode, handle.cached, handle.backing)
        if not self.has_handles(handle.inode):
            self.tree.drop(handle.inode)  # if a reload removed it, its last handle is gone now
        await handle.cached.release(handle.readahead)

    async def watch_readers(self) -> None:
        """Cancel the reads of handles whose opening process is gone or killed (see rangefs.readers)."""
        await self._readers.watch()

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        """A descriptor of the handle was closed (one of several, maybe). Reads still waiting may
        be only the kernel's readahead for a reader that is done: its RELEASE waits for them, so
        watch_readers checks whether any process still holds the file."""
        handle = self._handles.get(fh)
        if handle is not None and handle.opener.reads:
            handle.opener.flushed = True

    def _path_of(self, inode: int) -> str:
        """The path of a file under the mount point ('' when the mount point is not known)."""
        return self.tree.path_of(inode, self.mountpoint)

    def has_handles(self, inode: int) -> bool:
        """Whether a handle is open on ``inode``."""
        return any(handle.inode == inode for handle in self._handles.values())

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
        if inode == pyfuse3.ROOT_INODE and name == _CACHE_DIR_XATTR:  # how `rangefs status` finds the daemon
            return os.fsencode(self.cache.config.cache_dir)
        if node.cached is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        values = _xattrs(node.cached)
        if name not in values:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return values[name]

    @_fuse_errors
    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> Sequence[pyfuse3.XAttrNameT]:
        node = self._node(inode)
        if inode == pyfuse3.ROOT_INODE:
            return [pyfuse3.XAttrNameT(_CACHE_DIR_XATTR)]
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


_CACHE_DIR_XATTR = b"user.rangefs.cache_dir"  # on the root: the cache directory (rangefs.control)


def _xattrs(cached: CachedFile) -> dict[bytes, bytes]:
    """Per-file cache state, readable with ``getfattr -d``; URLs are shown redacted."""
    return {
        b"user.rangefs.url": cached.identity.url.encode(),
        b"user.rangefs.cached_bytes": str(cached.cached_bytes()).encode(),
        b"user.rangefs.saved_bytes": str(cached.saved_bytes()).encode(),
        b"user.rangefs.block_size": str(cached.block_size).encode(),
        b"user.rangefs.passthrough_handles": str(cached.passthrough_handles).encode(),
        b"user.rangefs.prefetch_unused_bytes": str(cached.prefetch_unused_bytes).encode(),
    }
