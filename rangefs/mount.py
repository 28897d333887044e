"""The mount lifecycle: check the input, probe the URLs, mount, serve, shut down cleanly.

Sits on top of every other module. ``mount()`` returns once the filesystem is mounted and ready
(a daemon keeps serving it) or raises a RangefsError whose message is the one line to show.
``unmount()`` asks the kernel to unmount and waits for the daemon to save its state and exit.
Imports pyfuse3 for the main loop's lifecycle only (init, main, close); the FUSE operations are
rangefs.fs's.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from rangefs import kernel
from rangefs.cache import DEFAULT_BLOCK_SIZE, Cache, CacheConfig
from rangefs.catalog import Catalog
from rangefs.control import ControlServer
from rangefs.errors import CacheError, RangefsError, UsageError
from rangefs.fetcher import Fetcher, SplitFetcher
from rangefs.fetchproc import FetchProcess, HelperConfig
from rangefs.fs import Filesystem
from rangefs.lazy import Probes
from rangefs.logsetup import LOG_FORMAT, setup_logging
from rangefs.offline import Reachability
from rangefs.origin import Origin, OriginConfig
from rangefs.probing import PROBE_CONCURRENCY, Files, learn
from rangefs.reload import Reloader
from rangefs.tree import Tree
from rangefs.urllist import Entry, load_url_list

log = logging.getLogger(__name__)

_FSTYPE = "fuse.rangefs"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_RELOAD_SIGNAL = signal.SIGHUP
_ABORT_GRACE = 2.0  # seconds reads in flight get to finish after a stop signal before fetches are cancelled
_DISCONNECT_POLL = 0.5  # seconds between checks whether the kernel ended the mount
_MAX_NEAR_BYTES = 1024 * 1024  # fetches up to this size run in the daemon (see SplitFetcher)
_HELPER_START_TIMEOUT = 60.0  # seconds for the fetch process to import and start


@dataclass(frozen=True)
class MountOptions:
    """Everything ``rangefs mount`` was asked to do."""

    url_list: Path
    mountpoint: Path
    cache_dir: Path
    foreground: bool = False
    verbose: bool = False
    log_file: Path | None = None
    skip_unavailable: bool = False
    allow_other: bool = False
    growing: bool = False  # every file may grow by appends (an entry's grow=no still says otherwise)
    passthrough: bool = True  # the kernel may read complete, checked files from the cache itself
    direct_io: bool = False  # files not complete in the cache are opened with direct I/O
    startup_timeout: float = 300.0
    tune_system: bool = False  # may change system-wide settings for speed (see rangefs.kernel)
    probe_timeout: float = 120.0  # the whole probe phase, so that a mount's start-up stays bounded
    list_path: Path | None = None  # url_list made absolute at mount: what a reload reads again
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(Path(".")))
    origin: OriginConfig = field(default_factory=OriginConfig)

    @property
    def log_path(self) -> Path:
        return self.log_file or self.cache_dir / "rangefs.log"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rangefs``, else ``~/.cache/rangefs``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rangefs"


def daemon_pid(mountpoint: str | os.PathLike[str]) -> int | None:
    """The pid of the daemon serving a rangefs mount: it names itself ``rangefs:PID`` in the mount table.

    The mount table is the one record that lives exactly as long as the mount, so no pid file
    can go stale or be planted.
    """
    entry = kernel.find_mount(mountpoint)
    if entry is None or entry.fstype != _FSTYPE or not entry.source.startswith("rangefs:"):
        return None
    pid = entry.source.removeprefix("rangefs:")
    return int(pid) if pid.isdigit() else None


# -- checks before anything is started ------------------------------------------------------


def check_mountpoint(mountpoint: Path) -> None:
    """Raise UsageError unless ``mountpoint`` is an existing directory with nothing mounted on it."""
    entry = kernel.find_mount(mountpoint)
    if entry is not None:
        if entry.fstype.startswith("fuse") and _stale(mountpoint):
            raise UsageError(
                f"mount point '{mountpoint}' holds a stale mount; run 'rangefs unmount {mountpoint}' first"
            )
        raise UsageError(f"mount point '{mountpoint}' is already mounted")
    try:
        mountpoint.stat()
    except FileNotFoundError:
        raise UsageError(f"mount point '{mountpoint}' does not exist") from None
    except OSError as exc:
        if exc.errno == 107:  # ENOTCONN: a FUSE mount whose daemon is gone
            raise UsageError(
                f"mount point '{mountpoint}' holds a stale mount; run 'rangefs unmount {mountpoint}' first"
            ) from None
        raise UsageError(f"mount point '{mountpoint}': {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount point '{mountpoint}' is not a directory")


def _stale(mountpoint: Path) -> bool:
    """True for a FUSE mount whose daemon is gone (statvfs fails at once; stat may be cached)."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _mount_fstype(mountpoint: Path) -> str | None:
    """The filesystem type mounted exactly at ``mountpoint``, if any."""
    entry = kernel.find_mount(mountpoint)
    return entry.fstype if entry else None


# -- mount ----------------------------------------------------------------------------------


def mount(opts: MountOptions) -> None:
    """Mount ``opts.url_list`` at ``opts.mountpoint``; return when ready (or when unmounted, in the foreground).

    Raises:
        RangefsError: with the one-line reason the mount could not be made.
    """
    entries = load_url_list(opts.url_list)
    opts = dataclasses.replace(opts, list_path=Path(os.path.abspath(opts.url_list)))  # the daemon leaves the cwd
    check_mountpoint(opts.mountpoint)
    Cache.prepare(opts.cache_dir)
    setup_logging(opts.log_path, verbose=opts.verbose, foreground=opts.foreground, required=True)
    if opts.foreground:
        kernel.tune_malloc()
        trio.run(_serve, opts, entries, _ForegroundReporter())
        return
    _daemonize(opts, entries)


class _ForegroundReporter:
    """Start-up news for a mount in the foreground: straight to stderr."""

    def warn(self, message: str) -> None:
        print(f"rangefs: warning: {message}", file=sys.stderr, flush=True)

    def ready(self) -> None:
        log.info("mounted")


class _PipeReporter:
    """Start-up news from the daemon to the waiting parent, one line each: W warning, R ready."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def warn(self, message: str) -> None:
        self._send(f"W {message}")

    def ready(self) -> None:
        # The daemon outlives the mount command from here on; told afterwards, it would die with it.
        _die_with_parent(False)
        try:
            self._send("R")
        except OSError:
            raise RangefsError("the mount command went away before the mount was ready") from None
        finally:
            os.close(self.fd)
            self.fd = -1

    def fail(self, message: str) -> None:
        self._send(f"E {message}")

    def _send(self, line: str) -> None:
        if self.fd >= 0:
            os.write(self.fd, line.replace("\n", " ").encode() + b"\n")


def _daemonize(opts: MountOptions, entries: list[Entry]) -> None:
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _run_daemon(opts, entries, write_fd, parent)
    os.close(write_fd)
    _await_daemon(pid, read_fd, opts)


def _run_daemon(opts: MountOptions, entries: list[Entry], write_fd: int, parent: int) -> None:
    """The daemon: detach, serve until unmounted, exit. Never returns."""
    # Until it is ready, the daemon works for the mount command: if that dies (killed, or gave
    # up waiting), the daemon must not go on probing with nobody to mount for.
    _die_with_parent(True)
    if os.getppid() != parent:  # it died before we asked
        os._exit(1)
    os.setsid()
    os.chdir("/")  # do not keep the caller's directory busy
    kernel.tune_malloc()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    reporter = _PipeReporter(write_fd)
    code = 0
    try:
        trio.run(_serve, opts, entries, reporter)
    except RangefsError as exc:
        reporter.fail(str(exc))
        code = 1
    except BaseException:
        log.exception("daemon failed")
        reporter.fail(f"the daemon failed; see {opts.log_path}")
        code = 1
    logging.shutdown()
    os._exit(code)


def _die_with_parent(die: bool) -> None:
    """Have the kernel send SIGTERM when the parent process dies (or no longer); where it cannot,
    a dead mount command is noticed at the ready message only."""
    kernel.die_with_parent(signal.SIGTERM if die else 0)


def _await_daemon(pid: int, read_fd: int, opts: MountOptions) -> None:
    """Relay the daemon's start-up news; return once it says ready, raise if it fails."""
    deadline = time.monotonic() + opts.startup_timeout
    try:
        for line in _daemon_news(read_fd, deadline):
            kind, _, message = line.partition(" ")
            if kind == "W":
                print(f"rangefs: warning: {message}", file=sys.stderr, flush=True)
            elif kind == "R":
                return
            elif kind == "E":
                os.waitpid(pid, 0)
                raise RangefsError(message)
    finally:
        os.close(read_fd)
    if time.monotonic() >= deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise RangefsError(f"mount not ready after {opts.startup_timeout:.0f}s; gave up (see {opts.log_path})")
    os.waitpid(pid, 0)
    raise RangefsError(f"the daemon exited during start-up; see {opts.log_path}")


def _daemon_news(read_fd: int, deadline: float) -> Iterator[str]:
    """Lines from the daemon's pipe until it closes it or the deadline passes."""
    buffer = b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode(errors="replace")
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]:
            return
        chunk = os.read(read_fd, 4096)
        if not chunk:
            return
        buffer += chunk


async def _serve(opts: MountOptions, entries: list[Entry], reporter: _ForegroundReporter | _PipeReporter) -> None:
    fetch_process = FetchProcess(_helper_config(opts))
    failure: RangefsError | None = None
    async with trio.open_nursery() as helpers:
        # The helper starts while we probe; it must outlive every fetch, so it ends last.
        await helpers.start(fetch_process.supervise)
        try:
            async with Origin(opts.origin) as origin:  # probes here; fetches go through the helper
                origin.entry_headers.update((entry.url, entry.headers) for entry in entries if entry.headers)
                catalog = Catalog(opts.cache_dir)
                await trio.to_thread.run_sync(catalog.load)
                reachability = Reachability(origin.probe)
                usable, later = await learn(origin, entries, catalog, reachability, opts, reporter.warn)
                # Ready means a first read is fast: do not leave the helper's start-up to it.
                await fetch_process.wait_ready(_HELPER_START_TIMEOUT)
                # One bound per origin over both processes: the helper's fetches take the near's slots.
                near = Fetcher(origin, opts.cache.block_size, opts.cache.max_connections)
                fetcher = SplitFetcher(near, fetch_process, opts.cache.block_size, _MAX_NEAR_BYTES)
                cache = Cache(opts.cache, fetcher, probe=reachability.probe, direct=near.fetch_bytes)
                files = Files(opts, cache, catalog, origin)
                tree = Tree.build([*((entry, files.make(entry, remote, checked)) for entry, remote, checked in usable),
                                   *((entry, None) for entry in later)])
                probes = Probes(origin.probe, files.attach, catalog, str(opts.url_list), PROBE_CONCURRENCY)
                probes.add(node for node in tree.files() if node.cached is None)
                await _serve_files(opts, tree, cache, probes, files, reporter)
        except RangefsError as exc:
            failure = exc  # raised out here, not wrapped in the task group's ExceptionGroup
        finally:
            helpers.cancel_scope.cancel()
    if failure is not None:
        raise failure


def _helper_config(opts: MountOptions) -> HelperConfig:
    return HelperConfig(
        # The helper sends each fetch's own headers (RemoteFile.headers): it needs none of the
        # user's secrets besides, so they stay in the daemon.
        origin=dataclasses.replace(opts.origin, headers=(), netrc=()),
        block_size=opts.cache.block_size,
        max_requests=opts.cache.max_connections,  # never binds: the daemon admits each fetch (SplitFetcher)
        log_path=str(opts.log_path),
        log_format=LOG_FORMAT,
        verbose=opts.verbose,
        foreground=opts.foreground,
    )


async def _serve_files(
    opts: MountOptions,
    tree: Tree,
    cache: Cache,
    probes: Probes,
    files: Files,
    reporter: _ForegroundReporter | _PipeReporter,
) -> None:
    # The canonical path (no '..', no links), as /proc names the files open under the mount;
    # resolved before mounting, so that it looks at the directory beneath, never at our own mount.
    fs = Filesystem(tree, cache, passthrough=opts.passthrough, direct_io=opts.direct_io,
                    tune_system=opts.tune_system, mountpoint=os.path.realpath(opts.mountpoint))
    fs.probes = probes
    reloader = Reloader(fs, probes, files.known, opts.list_path or opts.url_list)
    # Stop signals stay caught until the very end, so a second Ctrl-C cannot cut the shutdown short;
    # caught from before the mount, so that one sent as it is made (the mount command dying) unmounts.
    control = ControlServer(cache, tree, str(opts.mountpoint))
    control.reload = reloader.reload
    with trio.open_signal_receiver(*_STOP_SIGNALS, _RELOAD_SIGNAL) as signals:
        control.open()  # before the mount: a cache directory being cleared fails it cleanly
        try:
            _mount_fuse(fs, opts)
        except BaseException:
            control.close()
            raise
        # From here on the mount exists: every path out goes through the finally clauses.
        unmount_ourselves = True
        try:
            reporter.ready()
            log.info("serving %d files at %s (%d to be probed)", sum(1 for _ in tree.files()), opts.mountpoint,
                     probes.waiting)
            unmount_ourselves = await _run_until_unmounted(fs, opts.mountpoint, signals, control, probes, reloader)
        finally:
            try:
                with trio.CancelScope(shield=True):
                    await _shutdown(cache)
                    files.remember()
                    await trio.to_thread.run_sync(files.catalog.save)
            finally:
                control.close()  # after the last save: a clear without a mount must wait for it
                pyfuse3.close(unmount=unmount_ourselves)
                log.info("unmounted %s", opts.mountpoint)


def _mount_fuse(fs: Filesystem, opts: MountOptions) -> None:
    options = set(pyfuse3.default_options) | {f"fsname=rangefs:{os.getpid()}", "subtype=rangefs", "ro"}
    if opts.allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(fs, str(opts.mountpoint), options)
    except (RuntimeError, OSError) as exc:
        raise UsageError(f"cannot mount at '{opts.mountpoint}': {exc}") from None


async def _run_until_unmounted(
    fs: Filesystem, mountpoint: Path, signals: AsyncIterator[int], control: ControlServer, probes: Probes,
    reloader: Reloader,
) -> bool:
    """Serve until the kernel unmounts us (False) or a signal asks us to stop (True: we unmount)."""
    stopped_by_signal = False

    async def watch_signals(nursery: trio.Nursery) -> None:
        nonlocal stopped_by_signal
        async for signum in signals:
            if signum == _RELOAD_SIGNAL:
                if not stopped_by_signal:
                    nursery.start_soon(reloader.on_signal)
                continue
            if stopped_by_signal:
                log.info("%s: already unmounting", signal.Signals(signum).name)
                continue
            log.info("%s: unmounting", signal.Signals(signum).name)
            stopped_by_signal = True
            await fs.stop_drops(_ABORT_GRACE)
            pyfuse3.terminate()
            nursery.start_soon(abort_after_grace)

    async def abort_after_grace() -> None:
        # terminate() waits for the requests in progress; a read stuck on a slow server must not
        # hold the unmount for minutes of retries.
        await trio.sleep(_ABORT_GRACE)
        fs.cache.abort()

    async with trio.open_nursery() as nursery:
        await nursery.start(fs.cache.serve)
        nursery.start_soon(watch_signals, nursery)
        nursery.start_soon(_tune_kernel, fs, mountpoint)
        nursery.start_soon(_abort_when_disconnected, fs, mountpoint)
        nursery.start_soon(fs.watch_readers)
        nursery.start_soon(control.serve)
        nursery.start_soon(probes.run)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    return stopped_by_signal


async def _abort_when_disconnected(fs: Filesystem, mountpoint: Path) -> None:
    """Cancel every fetch once the kernel has ended the mount (an unmount, or an abort through fusectl).

    The kernel then fails every request in flight itself, so nobody waits for their answers; but
    pyfuse3.main returns only once each handler has returned, and a read waiting on a stuck
    server would hold the daemon for minutes of retries.
    """
    while not _disconnected(mountpoint):
        await trio.sleep(_DISCONNECT_POLL)
    log.info("the kernel ended the mount; cancelling the fetches in flight")
    fs.cache.abort()


def _disconnected(mountpoint: Path) -> bool:
    """Whether the kernel has ended our FUSE connection (the mount table is the fallback: a lazy
    unmount leaves open files served, and only our /dev/fuse descriptor tells when they are done)."""
    fd = pyfuse3.fuse_fd() if hasattr(pyfuse3, "fuse_fd") else -1
    if fd < 0:
        return kernel.find_mount(mountpoint) is None
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR is always reported: /dev/fuse says so once the connection is gone
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


async def _tune_kernel(fs: Filesystem, mountpoint: Path) -> None:
    await fs.initialized.wait()
    await trio.to_thread.run_sync(kernel.tune, str(mountpoint), fs.tune_system, abandon_on_cancel=True)


async def _shutdown(cache: Cache) -> None:
    """Save every file's state and close the cache files."""
    for file in cache:
        try:
            await file.checkpoint()
            await file.close()
        except (RangefsError, OSError) as exc:
            log.warning("%s: %s", file.identity.url, exc)


# -- unmount --------------------------------------------------------------------------------


def unmount(mountpoint: Path, lazy: bool = False, timeout: float = 60.0) -> None:
    """Unmount a rangefs mount and wait until its daemon has saved its state and exited.

    Raises:
        UsageError: not a rangefs mount, busy, or the daemon did not exit in time.
    """
    if _mount_fstype(mountpoint) != _FSTYPE:
        raise UsageError(f"'{mountpoint}' is not a rangefs mount")
    pid = daemon_pid(mountpoint)
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise UsageError("fusermount3 not found: install fuse3") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"fusermount3 did not unmount '{mountpoint}' within {timeout:.0f}s") from None
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        if "busy" in reason.lower():
            raise UsageError(f"'{mountpoint}' is busy (files are open); close them or use --lazy")
        raise UsageError(f"cannot unmount '{mountpoint}': {reason}")
    if pid is not None and not _wait_for_exit(pid, timeout):
        raise UsageError(f"unmounted '{mountpoint}', but its daemon (pid {pid}) did not exit within {timeout:.0f}s")


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}") or _is_zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


__all__ = ["DEFAULT_BLOCK_SIZE", "CacheError", "MountOptions", "daemon_pid", "mount", "unmount"]
