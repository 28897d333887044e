"""Kernel-side tuning of a FUSE mount through sysfs (best effort, needs root), of malloc, and
the page-cache and pipe facts that spliced FUSE replies need.

Only knobs of our own mount are changed by default (its readahead, and its max_background under
an already mounted fusectl). Settings of the whole system change only when the user asks with
``--tune-system`` (``tune_system=True``): raising ``fs.pipe-max-size`` (left raised: another
process may rely on it by then) and mounting fusectl when it is missing.

pyfuse3 cannot pass these as mount options. Without them the kernel sends FUSE reads of
128 KiB (the default readahead of a FUSE mount) and keeps at most 12 of them in flight
(``max_background``), which caps a sequential reader far below what the cache can serve.
Imports only the standard library; every failure is logged at debug level and ignored.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The kernel's readahead on the mount. rangefs must fetch whatever the kernel asks for, and the
# kernel grows its window to this size on any sequential stretch, however slowly the reader
# reads: a large one makes a player or a decoder that seeks fetch several times what it reads.
# Reading ahead of a fast reader is the job of rangefs's own readahead (rangefs.prefetch), which
# follows the reader's rate; this much keeps one kernel read in flight ahead of the reader, and
# cold and warm sequential reads were as fast as with 16 MiB (docs/experiments.md, 'Kernel
# readahead'). The default FUSE readahead (128 KiB) was slower for warm reads.
READ_AHEAD_KB = 512
# How far ahead of a sequential reader the kernel's reads run: the window being read and the next.
READAHEAD_LEAD = 2 * READ_AHEAD_KB * 1024
# Async readahead requests in flight: 64 (kernel default 12) so readahead is never starved.
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
_FUSECTL = Path("/sys/fs/fuse/connections")
_PR_SET_PDEATHSIG = 1  # prctl(2)
_M_TRIM_THRESHOLD = -1  # glibc mallopt() parameters, from <malloc.h>
_M_MMAP_THRESHOLD = -3
# libfuse splices a reply through a pipe that must hold all of it: a 1 MiB read, its header and
# libfuse's margin of three pages need a pipe of 2 MiB (sizes are powers of two pages).
SPLICE_PIPE_SIZE = 2 * 1024 * 1024
_PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")
# cachestat(2), Linux 6.5+: 451 in the unified syscall table (x86_64, arm64, riscv, ...); a few
# architectures (alpha, mips) number it otherwise, and there it is never found to work.
_NR_CACHESTAT = {"x86_64": 451, "aarch64": 451, "riscv64": 451, "ppc64le": 451, "s390x": 451}.get(
    platform.machine(), -1)
_PAGE = mmap.PAGESIZE  # cachestat counts kernel pages


@dataclass(frozen=True)
class MountEntry:
    """What /proc/self/mountinfo says of one mount."""

    major: int
    minor: int
    fstype: str
    source: str  # the "fsname" of a FUSE mount
    user_id: int | None = None  # a FUSE mount's user_id= option: who mounted it, set by the kernel's caller


def find_mount(mountpoint: str | os.PathLike[str]) -> MountEntry | None:
    """The mount at exactly ``mountpoint`` (the top one if stacked), from /proc/self/mountinfo.

    Read from mountinfo rather than by stat(): a daemon must not touch its own mount before its
    request loop runs, and stat() of a mount whose daemon died fails.
    """
    target = os.path.abspath(mountpoint)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) > 4 and right and _unescape(fields[4]) == target:
            major, _, minor = fields[2].partition(":")
            kind = right.split()
            options = dict(o.partition("=")[::2] for o in kind[2].split(",")) if len(kind) > 2 else {}
            user_id = options.get("user_id", "")
            found = MountEntry(int(major), int(minor), kind[0], _unescape(kind[1]) if len(kind) > 1 else "",
                               int(user_id) if user_id.isdigit() else None)
    return found


def _unescape(path: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space and so on)."""
    return path.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def tune(mountpoint: str, tune_system: bool = False) -> None:
    """Raise readahead and background-request limits of our FUSE mount, when permitted.

    ``tune_system``: mount fusectl if it is missing (a system-wide change) to reach the latter.

    Must run after the FUSE handshake: the kernel clamps readahead to what INIT negotiated.
    It must not touch the mount itself: a daemon thread blocked in a request to its own mount
    cannot die, so a kill -9 would leave a hung mount instead of a stale one.
    """
    entry = find_mount(mountpoint)
    if entry is None:
        log.debug("kernel tuning: mount %s not found in mountinfo", mountpoint)
        return
    major, minor = entry.major, entry.minor
    _write(Path(f"/sys/class/bdi/{major}:{minor}/read_ahead_kb"), READ_AHEAD_KB)
    if not _FUSECTL.joinpath(str(minor)).is_dir():
        if not tune_system:
            log.info("fusectl is not mounted at %s: this mount keeps the kernel's max_background "
                     "(--tune-system mounts it)", _FUSECTL)
            return
        _mount_fusectl()
    connection = _FUSECTL / str(minor)
    _write(connection / "max_background", MAX_BACKGROUND)
    _write(connection / "congestion_threshold", CONGESTION_THRESHOLD)


def _mount_fusectl() -> None:
    if os.geteuid() != 0:
        return
    try:
        subprocess.run(
            ["mount", "-t", "fusectl", "none", str(_FUSECTL)], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("kernel tuning: cannot mount fusectl: %s", exc)


def _write(path: Path, value: int) -> None:
    try:
        path.write_text(f"{value}\n")
        log.debug("kernel tuning: %s = %d", path, value)
    except OSError as exc:
        log.debug("kernel tuning: cannot set %s: %s", path, exc.strerror)


def die_with_parent(signum: int) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies (0: no longer).

    Returns whether it could be asked (prctl PR_SET_PDEATHSIG, Linux).
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, signum) == 0)
    except (OSError, AttributeError):
        return False


def tune_malloc() -> None:
    """Keep glibc from mmap()ing and unmapping every MiB-sized buffer (best effort).

    Each body chunk and block is a fresh 1 MiB bytes object; above glibc's adaptive mmap
    threshold every one is a new mapping whose pages fault in zeroed, which halves streaming
    speed until the threshold adapts. Fixed thresholds keep them on the heap.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)
    except (OSError, AttributeError):
        log.debug("mallopt not available; default malloc thresholds")


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


class PageCacheProbe:
    """Whether a range of a file is all in the page cache and readable without waiting.

    A reply spliced from the cache file reads it on the FUSE thread, where a read from the disk
    would stall every request: only a range found in the page cache is spliced. ``cachestat``
    (Linux 6.5+) counts the range's pages without touching them, in one cheap system call; it
    also counts pages whose read from the disk is still in flight (readahead), so the range's first
    and last pages are then read, one byte each, with RWF_NOWAIT, which fails on such a page.
    Readahead fills a range in order, so these two stand for the pages between them; a page
    evicted between the check and the reply costs one wait for the disk. On a kernel without
    cachestat, or when it fails for any reason, ``works`` turns False and nothing is spliced.
    For the trio thread only (one set of buffers).
    """

    def __init__(self) -> None:
        self.works = _NR_CACHESTAT > 0
        self._range, self._stat = _CachestatRange(), _Cachestat()
        self._byte = bytearray(1)
        try:
            syscall = ctypes.CDLL(None, use_errno=True).syscall
        except (OSError, AttributeError):
            self.works = False
            return
        syscall.restype = ctypes.c_long
        syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        self._syscall = syscall
        self._args = (ctypes.addressof(self._range), ctypes.addressof(self._stat), 0)

    def resident(self, fd: int, offset: int, size: int) -> bool:
        if not self.works:
            return False
        first = offset - offset % _PAGE
        self._range.off, self._range.len = first, offset + size - first
        if self._syscall(_NR_CACHESTAT, fd, *self._args) != 0:
            self.works = False
            log.info("cannot tell which cached bytes are in the page cache (cachestat: %s); replies to reads "
                     "are copied", os.strerror(ctypes.get_errno()))
            return False
        if self._stat.nr_cache * _PAGE < offset + size - first:
            return False
        try:
            return bool(os.preadv(fd, [self._byte], offset, os.RWF_NOWAIT)
                        and os.preadv(fd, [self._byte], offset + size - 1, os.RWF_NOWAIT))
        except OSError:  # BlockingIOError: a page still being read from the disk
            return False


def allow_splice_pipes(tune_system: bool = False) -> bool:
    """Whether libfuse can grow its pipe to ``SPLICE_PIPE_SIZE``, so replies may be spliced.

    Pipes larger than ``fs.pipe-max-size`` (1 MiB by default) need CAP_SYS_RESOURCE, which root
    in a container often lacks. With ``tune_system``, root then raises the limit to that size
    (never lowered; it caps only how large a pipe an unprivileged process may ask for). Without
    it replies are not spliced: libfuse gets bytes and copies them, correct and a little slower.
    """
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, SPLICE_PIPE_SIZE)
        return True
    except OSError:
        pass
    finally:
        os.close(read_end)
        os.close(write_end)
    try:
        current = int(_PIPE_MAX_SIZE.read_text())
        if current >= SPLICE_PIPE_SIZE:
            log.debug("a pipe of %d bytes is refused below fs.pipe-max-size (per-user pipe limit?)", SPLICE_PIPE_SIZE)
            return False
        if not tune_system:
            log.info("fs.pipe-max-size (%d) is below the %d bytes a spliced reply needs; --tune-system "
                     "raises it", current, SPLICE_PIPE_SIZE)
            return False
        _PIPE_MAX_SIZE.write_text(f"{SPLICE_PIPE_SIZE}\n")
    except (OSError, ValueError) as exc:
        log.debug("cannot raise fs.pipe-max-size: %s", exc)
        return False
    log.info("raised fs.pipe-max-size from %d to %d so that FUSE replies can be spliced from the cache",
             current, SPLICE_PIPE_SIZE)
    return True
