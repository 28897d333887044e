"""Helpers for the real-mount tests: run the CLI, make and tear down mounts, inspect processes."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from procs import alive, children

from rangefs.kernel import find_mount
from rangefs.mount import daemon_pid

from nginx import Nginx

RANGEFS = [sys.executable, "-m", "rangefs"]
COMMAND_TIMEOUT = 60


_SYS_CACHESTAT = 451  # x86_64, Linux >= 6.5
_libc = ctypes.CDLL(None, use_errno=True)


def cached_pages(fd: int, offset: int = 0, length: int = 0) -> int:
    """Pages of the open file ``fd`` in the page cache, of ``length`` bytes from ``offset`` (0:
    to the end), by cachestat(2), without touching them."""
    byte_range = struct.pack("=QQ", offset, length)
    stats = ctypes.create_string_buffer(5 * 8)
    if _libc.syscall(_SYS_CACHESTAT, fd, byte_range, stats, 0) != 0:
        raise OSError(ctypes.get_errno(), "cachestat")
    return int(struct.unpack("=5Q", stats.raw)[0])


def resident_pages(path: Path) -> int:
    with open(path, "rb") as f:
        return cached_pages(f.fileno())


def seeded_bytes(size: int, seed: int) -> bytes:
    """Deterministic random test data."""
    return random.Random(seed).randbytes(size)


def pread_random(path: Path, offset: int, size: int) -> bytes:
    """One read on a fresh handle without kernel readahead: only the blocks asked for are fetched."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def run_rangefs(*args: str | os.PathLike[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run the rangefs CLI as a user would; returns the finished process (never raises on exit code)."""
    return subprocess.run([*RANGEFS, *map(str, args)], capture_output=True, text=True, timeout=timeout)


class Server:
    """A running nginx and its document root; ``put`` adds a file, ``url`` names it."""

    def __init__(self, nginx: Nginx, www: Path) -> None:
        self.nginx = nginx
        self.www = www

    def put(self, rel: str, data: bytes) -> str:
        path = self.www / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a new inode: nginx's open-file cache cannot serve the old bytes
        return self.nginx.url(rel)

    def url(self, rel: str) -> str:
        return self.nginx.url(rel)

    def bytes_sent(self, rel: str = "", since: int = 0) -> int:
        return self.nginx.bytes_sent(rel, since=since)

    def mark(self) -> int:
        return self.nginx.mark()


@dataclass
class Mount:
    """One rangefs mount made by a test."""

    path: Path
    cache_dir: Path
    url_list: Path
    result: subprocess.CompletedProcess[str] | None = None

    def pid(self) -> int:
        pid = daemon_pid(self.path)
        assert pid is not None, f"no rangefs daemon serves {self.path}"
        return pid

    def mounted(self) -> bool:
        return fstype(self.path) is not None

    def unmount(self) -> subprocess.CompletedProcess[str]:
        return run_rangefs("unmount", self.path)


@dataclass
class Mounts:
    """Factory of mounts for one test; everything it made is unmounted and killed afterwards."""

    tmp: Path
    made: list[Mount] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)

    def write_list(self, lines: list[str], name: str = "urls.txt") -> Path:
        path = self.tmp / name
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        return path

    def mount(self, lines: list[str], *args: str, cache_dir: Path | None = None, check: bool = True) -> Mount:
        """Mount a URL list given as lines; with check=False the CLI's failure is returned, not raised."""
        index = len(self.made)
        mountpoint = self.tmp / f"mnt{index}"
        mountpoint.mkdir(exist_ok=True)
        cache = cache_dir or self.tmp / "cache"
        url_list = self.write_list(lines, f"urls{index}.txt")
        m = Mount(mountpoint, cache, url_list)
        self.made.append(m)
        m.result = run_rangefs("mount", url_list, mountpoint, "--cache-dir", cache, *args)
        if m.mounted():
            self._track(m)
        if check:
            assert m.result.returncode == 0, f"mount failed: {m.result.stderr}"
            assert m.mounted()
        return m

    def remount(self, m: Mount, *args: str) -> Mount:
        """Mount the same list on the same mount point and cache again."""
        m.result = run_rangefs("mount", m.url_list, m.path, "--cache-dir", m.cache_dir, *args)
        assert m.result.returncode == 0, f"remount failed: {m.result.stderr}"
        self._track(m)
        return m

    def remount_tracked(self, m: Mount) -> None:
        """Track the daemon of a mount the test made itself on ``m``'s mount point."""
        self._track(m)

    def _track(self, m: Mount) -> None:
        """Remember the daemon and its fetch process, to end both by pid."""
        self.pids.add(m.pid())
        self.pids.update(children(m.pid()))

    def cleanup(self) -> None:
        for m in self.made:
            if m.mounted():
                subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True, timeout=30)
        for pid in self.pids:
            end_process(pid)

    @contextmanager
    def small_disk(self) -> Iterator[Path]:
        """A 2 MiB tmpfs under the test's tmp dir, for a cache that fills up; the mounts are
        cleaned up before it is unmounted."""
        small = self.tmp / "small"
        small.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True, timeout=30)
        try:
            yield small
        finally:
            self.cleanup()
            subprocess.run(["umount", "-l", str(small)], capture_output=True, timeout=30)


def fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at ``path`` (from the mount table), or None."""
    entry = find_mount(path)
    return entry.fstype if entry else None


def end_process(pid: int) -> None:
    """Stop a daemon we started: SIGTERM, a bounded wait, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if not alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
