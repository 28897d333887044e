"""The control channel: how `rangefs status`, `prefetch` and `cache clear` reach a mount's daemon.

A unix stream socket ``control-<pid>.sock`` in the cache directory, mode 0600, one per daemon
(``<pid>`` as in the mount table's ``rangefs:<pid>``, so two mounts sharing a cache directory
each have their own). Bound and connected through ``/proc/self/fd/N/`` of the cache directory:
a long cache path would not fit ``sun_path``. The protocol is JSON lines: the client sends one
request line, the daemon answers with zero or more ``{"progress": ...}`` lines and one final line
``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``; then the connection closes.

- ``{"op": "status"}``: the status report (rangefs.status) as ``"status"``.
- ``{"op": "prefetch", "paths": [...], "wait": bool}``: fetch whole files (paths relative to the
  mount's root; a directory means the files under it) in the background; with ``wait``,
  progress every ``_PROGRESS_EVERY`` seconds until they are complete and saved.
- ``{"op": "clear", "paths": [...] | null}``: drop the cached data of files not open (null: all).
- ``{"op": "reload"}``: reread the URL list (rangefs.reload) as ``"reload"``, or the refusal.

Who may use it: the peer's uid (SO_PEERCRED) must be the daemon's or root's; anyone else gets
one refusal line. With --allow-other, other users read the mount but cannot use this. Bounds: a
request line of at most ``_MAX_REQUEST`` bytes, read within ``_REQUEST_TIMEOUT``; at most
``_MAX_CLIENTS`` connections at once (more are refused); each reply line written within
``_SEND_TIMEOUT``; a status or clear answered within ``_ANSWER_TIMEOUT``. Everything runs on the
trio thread of the mount, disk work in worker threads: a request never blocks the FUSE loop.

Imports rangefs.status, tree, cache, limits, errors and redact; never pyfuse3.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import trio

from rangefs import kernel, limits, status
from rangefs.cache import Cache
from rangefs.cachedfile import CachedFile
from rangefs.errors import OriginError, RangefsError, RemoteChanged, UsageError
from rangefs.tree import ROOT_INODE, Tree

log = logging.getLogger(__name__)
_T = TypeVar("_T")

XATTR_CACHE_DIR = "user.rangefs.cache_dir"  # on the mount's root: where the socket is
_MAX_REQUEST = 64 * 1024
_MAX_CLIENTS = 16
_REQUEST_TIMEOUT = 5.0
_SEND_TIMEOUT = 10.0
_ANSWER_TIMEOUT = 60.0
_PROGRESS_EVERY = 0.5
_MAX_STALE_SCAN = 1000  # leftover sockets looked at when a daemon starts
# Files prefetched at once; the others wait their turn. Each job holds its cache files open and
# revalidates first: a prefetch of a large directory must not open every file or probe the server
# for each at once (descriptors, a burst of HEADs). The slots bound the requests anyway.
_MAX_PREFETCH_FILES = 4
_ACCEPT_RETRY = 0.5  # after accept() failed (no descriptor left, say): the mount goes on
_MOUNT_TIMEOUT = 15.0  # the client's look at the mount itself (a path's stat, the root's xattr)


def socket_name(pid: int) -> str:
    return f"control-{pid}.sock"


def _through_fd(dir_fd: int, name: str) -> str:
    return f"/proc/self/fd/{dir_fd}/{name}"


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, such as a daemon killed whose parent has not reaped it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Prefetch:
    """One file being fetched whole for `rangefs prefetch`; ends with ``done`` set."""

    def __init__(self, file: CachedFile) -> None:
        self.file = file
        self.done = trio.Event()
        self.error: str | None = None

    async def run(self) -> None:
        file = self.file
        limits.BACKGROUND.set(True)  # this task's fetches (and those it spawns) go last
        try:
            # As an open does: a file a fetch found changed (stale) moves to the new version first.
            await file.revalidate()
        except RemoteChanged as exc:
            self._failed(exc)
            self.done.set()
            return
        except OriginError as exc:  # the server cannot be asked now: the fetches will tell
            log.warning("%s: cannot revalidate (%s)", file.identity.url, exc)
        except RangefsError as exc:
            self._failed(exc)
            self.done.set()
            return
        try:
            await file.acquire()
        except (RangefsError, OSError) as exc:
            self._failed(exc)
            self.done.set()
            return
        try:
            await self._fetch_all()
            if self.error is None:
                await file.checkpoint()  # complete means saved: flushed and recorded
                persisted = file.journal.persisted
                if persisted is None or not persisted.complete():
                    self.error = f"{file.identity.url}: not all of it could be saved"
        except (RangefsError, OSError) as exc:
            self._failed(exc)
        finally:
            self.done.set()
            with trio.CancelScope(shield=True):
                await file.release()

    async def _fetch_all(self) -> None:
        """Every missing block, in chunks of the longest request, ``max_connections`` at once."""
        file = self.file
        generation, nblocks = file.generation, file.identity.nblocks
        step = file.cache.config.max_request_blocks
        chunks = iter(range(0, nblocks, step))

        async def worker(scope: trio.CancelScope) -> None:
            try:
                for first in chunks:  # shared by the workers: each takes the next chunk
                    await file.ensure(first, min(first + step, nblocks), generation)
            except (RangefsError, OSError) as exc:
                self._failed(exc)
                scope.cancel()

        async with trio.open_nursery() as nursery:
            # No more workers than the slots a background request may hold: a chunk claimed by a
            # worker that must queue for a slot would hold up a read that needs one of its blocks.
            for _ in range(limits.background_share(file.cache.config.max_connections)):
                nursery.start_soon(worker, nursery.cancel_scope)

    def _failed(self, exc: BaseException) -> None:
        if self.error is None:
            url, message = self.file.identity.url, str(exc)
            self.error = message if message.startswith(url) else f"{url}: {message}"
            log.warning("prefetch: %s", self.error)


class ControlServer:
    """The daemon's side: the socket, its clients, and the prefetches they started."""

    def __init__(self, cache: Cache, tree: Tree, mountpoint: str) -> None:
        self.cache = cache
        self.tree = tree
        self.mountpoint = mountpoint
        self.cache_dir = cache.config.cache_dir
        self.name = socket_name(os.getpid())
        self._dir_fd = -1
        self._lock_fd = -1
        self._sock: trio.socket.SocketType | None = None
        self._prefetches: dict[CachedFile, Prefetch] = {}
        self._clients = 0
        self._nursery: trio.Nursery | None = None
        self._job_slots = trio.CapacityLimiter(_MAX_PREFETCH_FILES)
        # ``{"op": "reload"}``: reread the URL list (rangefs.reload); its outcome line, or
        # UsageError naming the list's bad line. None: not offered.
        self.reload: Callable[[], Awaitable[str]] | None = None

    def open(self) -> None:
        """Take the mount lock, remove dead daemons' sockets, bind ours (before mounting).

        Raises:
            UsageError: a clear without a mount holds the cache directory, or the socket cannot be made.
        """
        try:
            self._lock_fd = status.mount_lock(self.cache_dir, exclusive=False)
        except status.InUse:
            raise UsageError(f"cache directory '{self.cache_dir}' is being cleared ('rangefs cache clear'); "
                             "try again") from None
        except OSError as exc:
            raise UsageError(f"cache directory '{self.cache_dir}': cannot lock: {exc.strerror}") from None
        try:
            self._dir_fd = os.open(self.cache_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self._remove_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            path = _through_fd(self._dir_fd, self.name)
            old_umask = os.umask(0o177)  # created 0600: never reachable by others, not even briefly
            try:
                sock.bind(path)
            except OSError:
                sock.close()
                raise
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            sock.listen(_MAX_CLIENTS)
            self._sock = trio.socket.from_stdlib_socket(sock)
        except OSError as exc:
            self.close()
            raise UsageError(f"cache directory '{self.cache_dir}': cannot make the control socket: "
                             f"{exc.strerror or exc}") from None

    def _remove_stale(self) -> None:
        """Sockets of daemons that are gone (a kill -9 leaves its socket behind); ours, if the
        last holder of our pid left one."""
        for name in os.listdir(_through_fd(self._dir_fd, "."))[:_MAX_STALE_SCAN]:
            if not (name.startswith("control-") and name.endswith(".sock")):
                continue
            pid = name.removeprefix("control-").removesuffix(".sock")
            if pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):
                try:
                    os.unlink(_through_fd(self._dir_fd, name))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        """Remove the socket and drop the lock (at unmount)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(_through_fd(self._dir_fd, self.name))
            except OSError:
                pass
        for fd in (self._dir_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._dir_fd = self._lock_fd = -1

    async def serve(self) -> None:
        """Accept clients until cancelled; prefetches run in this task group too."""
        assert self._sock is not None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                try:
                    conn, _ = await self._sock.accept()
                except OSError as exc:  # EMFILE, ENOBUFS...: that client is not served, the mount goes on
                    log.warning("control channel: cannot accept a client: %s", exc.strerror or exc)
                    await trio.sleep(_ACCEPT_RETRY)
                    continue
                nursery.start_soon(self._client, conn)

    async def _client(self, conn: trio.socket.SocketType) -> None:
        with conn:
            self._clients += 1
            try:
                if self._clients > _MAX_CLIENTS:
                    await self._send(conn, {"ok": False, "error": "the daemon is busy with other requests; try again"})
                    return
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))[1]
                if uid not in (os.geteuid(), 0):
                    await self._send(conn, {"ok": False, "error": "permission denied: only the mount's owner "
                                                                  "or root may use its control channel"})
                    return
                request = await self._request(conn)
                if request is not None:
                    await self._answer(conn, request)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                pass  # the client went away or was too slow: its problem, not the mount's
            except Exception:  # a bug must fail this request, not the mount
                log.exception("control request failed")
            finally:
                self._clients -= 1

    async def _request(self, conn: trio.socket.SocketType) -> dict[str, Any] | None:
        buffer = b""
        with trio.fail_after(_REQUEST_TIMEOUT):
            while b"\n" not in buffer:
                chunk = await conn.recv(4096)
                if not chunk:
                    return None
                buffer += chunk
                if len(buffer) > _MAX_REQUEST:
                    await self._send(conn, {"ok": False, "error": f"request longer than {_MAX_REQUEST} bytes"})
                    return None
        try:
            request = json.loads(buffer.split(b"\n", 1)[0])
        except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            await self._send(conn, {"ok": False, "error": "not a request"})
            return None
        return request

    async def _send(self, conn: trio.socket.SocketType, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        with trio.fail_after(_SEND_TIMEOUT):
            while data:
                data = data[await conn.send(data):]

    async def _answer(self, conn: trio.socket.SocketType, request: dict[str, Any]) -> None:
        op = request["op"]
        try:
            if op == "prefetch":
                await self._prefetch(conn, self._files(request.get("paths")), bool(request.get("wait", True)))
                return
            with trio.fail_after(_ANSWER_TIMEOUT):
                if op == "status":
                    reply: dict[str, Any] = {"ok": True, "status": await self.status()}
                elif op == "clear":
                    paths = request.get("paths")
                    reply = {"ok": True, **await self._clear(self._files(paths if paths else None))}
                elif op == "reload" and self.reload is not None:
                    reply = {"ok": True, "reload": await self.reload()}
                else:
                    reply = {"ok": False, "error": f"unknown request '{op}'"}
        except UsageError as exc:
            reply = {"ok": False, "error": str(exc)}
        await self._send(conn, reply)

    # -- the requests ---------------------------------------------------------------------

    def _files(self, paths: object) -> list[tuple[str, CachedFile]]:
        """The files named by ``paths`` (relative to the root; directories: the files under
        them; None: every file), with their paths.

        Raises:
            UsageError: a path is not in the mount.
        """
        if paths is None:
            paths = [""]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise UsageError("paths must be a list of strings")
        found: dict[CachedFile, str] = {}
        seen: set[int] = set()  # each directory walked once, however many paths name it or what is above it
        for path in paths:
            inode = ROOT_INODE
            parts = [p for p in path.split("/") if p not in ("", ".")]
            for part in parts:
                node = self.tree.nodes[inode]
                try:
                    name = os.fsencode(part)
                except UnicodeError:  # a lone surrogate that no file name can hold
                    name = b""
                child = node.children.get(name) if node.children is not None and name else None
                if child is None:
                    raise UsageError(f"'{path}' is not a file of the mount at {self.mountpoint}")
                inode = child
            for file_path, cached in self._under(inode, "/".join(parts), seen):
                found.setdefault(cached, file_path)
        return [(path, file) for file, path in found.items()]

    def _under(self, inode: int, path: str, seen: set[int]) -> Iterator[tuple[str, CachedFile]]:
        """The files at and under ``inode``, in path order, skipping what ``seen`` has (walked
        with a stack: a deep tree must not exhaust the recursion limit)."""
        pending = [(inode, path)]
        while pending:
            inode, path = pending.pop()
            if inode in seen:
                continue
            seen.add(inode)
            node = self.tree.nodes[inode]
            if node.cached is not None:
                yield path, node.cached
            children = sorted((node.children or {}).items(), reverse=True)
            pending.extend((child, f"{path}/{os.fsdecode(name)}".lstrip("/")) for name, child in children)

    async def status(self) -> dict[str, Any]:
        listed = self._files(None)
        peeked = await _peek([file for _, file in listed])
        files = []
        for path, file in listed:
            cached = _cached_bytes(file, peeked)
            files.append(status.file_entry(path=path, url=file.identity.url, size=file.size, cached_bytes=cached,
                                           state_name=self._state(file, cached), error=file.last_error))
        allocated, fs_bytes = await trio.to_thread.run_sync(
            lambda: (status.allocated_bytes(self.cache_dir), status.filesystem_bytes(self.cache_dir)))
        config = self.cache.config
        return status.report(mountpoint=self.mountpoint, cache_dir=self.cache_dir, max_bytes=config.max_bytes,
                             min_free_bytes=config.min_free_for(fs_bytes), allocated=allocated, files=files)

    def _state(self, file: CachedFile, cached: int) -> str:
        if file.stale:
            return "stale"
        if file.flights.busy or (file in self._prefetches and not self._prefetches[file].done.is_set()):
            return "fetching"
        if file.last_error is not None:
            return "error"
        return "complete" if cached == file.size else "partial"

    async def _prefetch(self, conn: trio.socket.SocketType, files: list[tuple[str, CachedFile]], wait: bool) -> None:
        limit = self.cache.config.max_bytes
        for path, file in files:
            if limit is not None and file.size > limit:
                raise UsageError(f"'{path}' ({status.human(file.size)}) is larger than the cache limit "
                                 f"(--cache-max-size {status.human(limit)}); not prefetched")
        assert self._nursery is not None
        jobs = []
        for _, file in files:
            job = self._prefetches.get(file)
            if job is None or job.done.is_set():  # a new one: the last may have failed, or been cleared
                job = self._prefetches[file] = Prefetch(file)
                self._nursery.start_soon(self._run_prefetch, job)
            jobs.append(job)
        total = sum(file.size for _, file in files)
        peeked = await _peek([job.file for job in jobs])  # files still waiting their turn: as saved
        if wait:
            while not all(job.done.is_set() for job in jobs):
                await self._send(conn, {"progress": {"done": sum(_cached_bytes(j.file, peeked) for j in jobs),
                                                     "total": total}})
                with trio.move_on_after(_PROGRESS_EVERY):
                    for job in jobs:
                        await job.done.wait()
        errors = [job.error for job in jobs if job.error is not None]
        done = sum(_cached_bytes(job.file, peeked) for job in jobs)
        await self._send(conn, {"ok": not errors, "error": "; ".join(errors) or None, "files": len(jobs),
                                "done": done, "total": total, "waited": wait})

    async def _run_prefetch(self, job: Prefetch) -> None:
        try:
            async with self._job_slots:
                await job.run()
        except Exception:  # a bug must fail this prefetch, not the mount
            log.exception("prefetch failed")
            job.error = job.error or f"{job.file.identity.url}: prefetch failed (see the log)"
            job.done.set()
        finally:
            if self._prefetches.get(job.file) is job:
                del self._prefetches[job.file]

    async def _clear(self, files: list[tuple[str, CachedFile]]) -> dict[str, Any]:
        cleared: list[str] = []
        skipped: list[dict[str, str]] = []
        freed = 0
        for path, file in files:
            async with file.lock:  # no user can open the files while they go
                if file.data.fd >= 0 or file in self._prefetches:
                    skipped.append({"path": path, "reason": "prefetching" if file in self._prefetches else "open"})
                    continue
                try:
                    freed += await trio.to_thread.run_sync(status.drop_files, self.cache.files_dir, file.key)
                except status.InUse:
                    skipped.append({"path": path, "reason": "open in another mount"})
                    continue
                except OSError as exc:
                    skipped.append({"path": path, "reason": exc.strerror or str(exc)})
                    continue
                finally:
                    file.unload()  # read again from disk at the next look (whatever is left)
                file.last_error = None
                cleared.append(path)
        return {"cleared": cleared, "skipped": skipped, "freed_bytes": freed}


def _unread(file: CachedFile) -> bool:
    """Whether ``file.cached_bytes()`` would read its state file (on the calling thread)."""
    return file.bitmap is None and file.data.fd < 0 and bool(file.remote.if_range)


async def _peek(files: list[CachedFile]) -> dict[CachedFile, int]:
    """The saved bytes of the files not looked at yet in this session, read in a worker thread
    (``cached_bytes()`` would read them on the trio thread, one by one), and not kept: a file
    opened meanwhile has its own bitmap, which a peek must not replace."""
    unread = [(file, file.identity) for file in files if _unread(file)]
    if not unread:
        return {}
    return await trio.to_thread.run_sync(
        lambda: {file: status.bytes_in(identity, file.data.peek(identity)) for file, identity in unread})


def _cached_bytes(file: CachedFile, peeked: dict[CachedFile, int]) -> int:
    return peeked.get(file, 0) if _unread(file) else file.cached_bytes()


# -- the client -----------------------------------------------------------------------------


def bounded(mountpoint: Path, call: Callable[[], _T]) -> _T:
    """``call()``, which asks the mount (a stat, an xattr), given up on after ``_MOUNT_TIMEOUT``:
    the request waits for the daemon, and a stopped or hung daemon would hang the command for
    good, Ctrl-C included. It runs in a daemon thread, which the process's exit ends.

    Raises:
        UsageError: no answer in time; else what ``call`` raises.
    """
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="rangefs-mount-look", daemon=True)
    thread.start()
    thread.join(_MOUNT_TIMEOUT)
    if not outcome:
        raise UsageError(f"'{mountpoint}': the mount does not answer (its daemon is stopped or hung)")
    ok, value = outcome[0]
    if not ok:
        raise value
    result: _T = value
    return result


class Client:
    """One request to the daemon serving a mount, and its replies."""

    def __init__(self, mountpoint: Path, pid: int, timeout: float = 60.0) -> None:
        try:
            cache_dir = os.fsdecode(bounded(mountpoint, lambda: os.getxattr(mountpoint, XATTR_CACHE_DIR)))
        except OSError as exc:
            raise UsageError(f"'{mountpoint}': cannot find its cache directory: {exc.strerror}") from None
        self.cache_dir = Path(cache_dir)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            dir_fd = os.open(cache_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self.sock.connect(_through_fd(dir_fd, socket_name(pid)))
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.sock.close()
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise UsageError(f"'{mountpoint}': permission denied: only the mount's owner or root may use "
                                 "its control channel") from None
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise UsageError(f"'{mountpoint}': its daemon does not answer (no control socket in "
                                 f"'{cache_dir}')") from None
            raise UsageError(f"'{mountpoint}': cannot reach its daemon: {exc.strerror}") from None
        # The pid and the cache directory come from the mount itself, which anyone can make: the
        # socket's peer must be the daemon the mount table names and run as the user who mounted
        # it, so that a mount made to look like rangefs cannot steer a command to another's daemon.
        peer_pid, peer_uid, _ = struct.unpack("3i", self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        entry = kernel.find_mount(mountpoint)
        if peer_pid != pid or entry is None or entry.user_id is None or peer_uid != entry.user_id:
            self.sock.close()
            raise UsageError(f"'{mountpoint}': the control socket in '{cache_dir}' is not this mount's daemon's")
        self._buffer = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, request: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(request).encode() + b"\n")

    def replies(self) -> Iterator[dict[str, Any]]:
        """The daemon's reply lines, up to and including the final one.

        Raises:
            UsageError: the daemon closed the connection or went silent before its final line.
        """
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                try:
                    reply = json.loads(line)
                except (ValueError, RecursionError):
                    reply = None
                if not isinstance(reply, dict):  # not our daemon, or a bug: one line, no traceback
                    raise UsageError("the daemon's answer is not understood")
                yield reply
                if "ok" in reply:
                    return
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise UsageError("the daemon did not answer in time") from None
            except OSError as exc:
                raise UsageError(f"the daemon's connection failed: {exc.strerror}") from None
            if not chunk:
                raise UsageError("the daemon closed the connection without answering (did it stop?)")
            self._buffer += chunk

    def final(self) -> dict[str, Any]:
        """The final reply, past any progress."""
        return list(self.replies())[-1]

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``request``; its final reply (an ``ok: false`` one raises UsageError)."""
        self.send(request)
        final = self.final()
        if not final.get("ok"):
            raise UsageError(str(final.get("error")))
        return final
