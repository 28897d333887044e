"""FUSE passthrough: the kernel reads complete, checked, flushed files from the cache file itself.

Through real mounts. `user.rangefs.passthrough_handles` tells how many open handles of a file
the kernel serves itself; the first test also shows it with the daemon stopped. A file read
whole is flushed by its last close, which runs after close() returns: tests wait for
`user.rangefs.saved_bytes` before they expect an open to pass through.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from faultserver import FaultServer

from rangefs import state
from rangefs.cache import DEFAULT_BLOCK_SIZE, cache_key

from util import Mounts, Server, seeded_bytes, wait_until

pytestmark = pytest.mark.timeout(60)
BLOCK = DEFAULT_BLOCK_SIZE
MiB = 1 << 20


def passthrough_handles(path: Path) -> int:
    return int(os.getxattr(path, "user.rangefs.passthrough_handles"))


def saved_bytes(path: Path) -> int:
    return int(os.getxattr(path, "user.rangefs.saved_bytes"))


def wait_saved(path: Path) -> None:
    """Until the file's blocks are all flushed and claimed by its state file."""
    assert wait_until(lambda: saved_bytes(path) == path.stat().st_size), f"{path.name} never flushed"


def read_fd(fd: int, size: int) -> bytes:
    return b"".join(os.pread(fd, MiB, offset) for offset in range(0, size, MiB))


def open_ro(path: Path) -> int:
    return os.open(path, os.O_RDONLY)


def test_a_complete_file_is_read_by_the_kernel_even_with_the_daemon_stopped(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(3 * MiB + 777, seed=41)
    m = mounts.mount([nginx.put("pt/whole.bin", data)])
    path = m.path / "whole.bin"
    assert path.read_bytes() == data  # fetched, written and checked: complete
    wait_saved(path)
    fd = open_ro(path)
    try:
        assert passthrough_handles(path) == 1
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # nothing left in the FUSE page cache
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(read_fd(fd, len(data))), daemon=True)
        pid = m.pid()
        mark = nginx.mark()
        os.kill(pid, signal.SIGSTOP)
        try:
            reader.start()
            reader.join(10)
            finished = not reader.is_alive()
        finally:
            os.kill(pid, signal.SIGCONT)
        reader.join(20)
        assert finished, "a read of a complete file waited for the stopped daemon"
        assert result == [data]
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapped:
            assert mapped[BLOCK - 10 : 2 * BLOCK] == data[BLOCK - 10 : 2 * BLOCK]
            assert mapped[-100:] == data[-100:]
        assert nginx.bytes_sent("pt/whole.bin", since=mark) == 0
    finally:
        os.close(fd)
    assert passthrough_handles(path) == 0


def test_no_passthrough_while_the_file_is_partial_or_open_through_rangefs(mounts: Mounts, nginx: Server) -> None:
    """The kernel fails an open that mixes the two modes on one file: rangefs never asks for it."""
    data = seeded_bytes(2 * MiB + 5, seed=42)
    m = mounts.mount([nginx.put("pt/mixed.bin", data)])
    path = m.path / "mixed.bin"
    first = open_ro(path)  # the file is empty in the cache: served by rangefs
    try:
        assert passthrough_handles(path) == 0
        assert read_fd(first, len(data)) == data  # now complete and checked
        second = open_ro(path)  # `first` is still open through rangefs: so is this one
        try:
            assert passthrough_handles(path) == 0
            assert read_fd(second, len(data)) == data
            os.close(first)
            first = -1
            third = open_ro(path)  # `second` is still served by rangefs
            assert passthrough_handles(path) == 0
            os.close(third)
        finally:
            os.close(second)
        wait_saved(path)
        fds = [open_ro(path) for _ in range(3)]  # now every open passes through, on one backing file
        try:
            assert passthrough_handles(path) == 3
            assert all(read_fd(fd, len(data)) == data for fd in fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert passthrough_handles(path) == 0
    finally:
        if first >= 0:
            os.close(first)


def test_after_a_remount_the_first_open_checks_the_cache_and_the_next_passes_through(
    mounts: Mounts, nginx: Server
) -> None:
    data = seeded_bytes(2 * MiB, seed=43)
    m = mounts.mount([nginx.put("pt/remount.bin", data)])
    path = m.path / "remount.bin"
    assert path.read_bytes() == data
    assert m.unmount().returncode == 0
    # Damaged while unmounted: a block the kernel read itself would never be checked.
    data_file = next(m.cache_dir.glob("files/*.data"))
    with open(data_file, "r+b") as f:
        f.seek(BLOCK + 3)
        f.write(b"\0damaged\0")
    mounts.remount(m)
    with open(path, "rb") as f:
        assert passthrough_handles(path) == 0
        assert f.read() == data  # every block checked; the damaged one fetched again
    wait_saved(path)
    with open(path, "rb") as f:
        assert passthrough_handles(path) == 1
        assert f.read() == data


def test_a_remote_change_keeps_passthrough_readers_on_the_old_version_and_fails_new_opens(
    mounts: Mounts, server: FaultServer
) -> None:
    old, new = seeded_bytes(6 * BLOCK + 11, seed=44), seeded_bytes(9 * BLOCK, seed=45)
    server.put("/f.bin", old)
    m = mounts.mount([server.url("/f.bin")], "--revalidate-interval", "0")
    path = m.path / "f.bin"
    assert path.read_bytes() == old
    wait_saved(path)
    fd = open_ro(path)
    try:
        assert passthrough_handles(path) == 1
        server.change("/f.bin", new)
        with pytest.raises(OSError) as refused:
            open_ro(path)
        assert refused.value.errno == errno.ESTALE
        assert read_fd(fd, len(old)) == old  # whole and unmixed: the cache file was left alone
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert passthrough_handles(path) == 0  # the new version is not cached yet
        assert os.fstat(f.fileno()).st_size == len(new)
        assert f.read() == new
    log = (m.cache_dir / "rangefs.log").read_text(encoding="utf-8")
    assert "changed while 1 open handle(s) read the cached version" in log


def test_a_complete_file_is_served_by_rangefs_until_flushed_then_passes_through(mounts: Mounts, nginx: Server) -> None:
    """One URL at two paths: the first path's handle completes the file, whose blocks no
    checkpoint has flushed yet (60 s interval). The second path's open does not wait for a flush
    (it took 1.7 s after a cold read of 1 GiB): rangefs serves it. Once the last close has
    flushed the file, an open passes through. Not before: a failed flush later would drop the
    cached pages the kernel reads, leaving it whatever the disk holds."""
    data = seeded_bytes(3 * MiB, seed=49)
    url = nginx.put("pt/twice.bin", data)
    m = mounts.mount([f"{url} a.bin", f"{url} b.bin"], "--checkpoint-interval", "60")
    a, b = m.path / "a.bin", m.path / "b.bin"
    state_path = m.cache_dir / "files" / f"{cache_key(url)}.state"
    with open(a, "rb") as first:
        assert first.read() == data
        assert int(os.getxattr(a, "user.rangefs.cached_bytes")) == len(data)
        assert saved_bytes(a) == 0  # complete in the cache, nothing flushed yet
        with open(b, "rb") as second:
            assert passthrough_handles(b) == 0
            assert saved_bytes(b) == 0  # the open did not flush
            assert second.read() == data
    wait_saved(b)  # by the last close
    assert state.load(state_path)[1].complete()
    with open(b, "rb") as third:
        assert passthrough_handles(b) == 1
        assert third.read() == data


# Maps the file with libc's mmap (Python's mmap keeps a dup of the descriptor, which would keep
# the handle open), closes it, waits for a line, then prints the sha256 of the mapped bytes. In a
# child: a mapping of a truncated file dies of SIGBUS.
_MAPPER = """
import ctypes, hashlib, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
os.close(fd)
print("mapped", flush=True)
sys.stdin.readline()
print(hashlib.sha256(ctypes.string_at(address, size)).hexdigest(), flush=True)
"""


def test_a_mapping_outlives_its_handle_and_keeps_reading_its_version_whole(
    mounts: Mounts, server: FaultServer
) -> None:
    """A passthrough mapping holds the cache file, not the handle: once the descriptor is closed the
    version may switch, and the switch leaves the mapped (old) data file alone."""
    old, new = seeded_bytes(6 * BLOCK + 11, seed=47), seeded_bytes(6 * BLOCK + 11, seed=48)
    server.put("/m.bin", old)
    m = mounts.mount([server.url("/m.bin")], "--revalidate-interval", "0")
    path = m.path / "m.bin"
    assert path.read_bytes() == old
    wait_saved(path)
    mapper = subprocess.Popen([sys.executable, "-c", _MAPPER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert mapper.stdout is not None and mapper.stdin is not None
        assert mapper.stdout.readline().strip() == "mapped"
        assert wait_until(lambda: passthrough_handles(path) == 0), "the mapping kept its handle"
        server.change("/m.bin", new)
        assert path.read_bytes() == new  # switched, into a new data file
        out, _ = mapper.communicate("go\n", timeout=30)
    finally:
        if mapper.poll() is None:
            mapper.kill()
            mapper.wait()
    assert mapper.returncode == 0, "the mapping died (SIGBUS: its file was truncated)"
    assert out.strip() == hashlib.sha256(old).hexdigest()


@pytest.mark.parametrize("option", ["--no-passthrough", "--growing"])
def test_no_passthrough_when_turned_off_or_for_files_that_grow(mounts: Mounts, nginx: Server, option: str) -> None:
    data = seeded_bytes(MiB + 1, seed=46)
    m = mounts.mount([nginx.put(f"pt/off{option}.bin", data)], option)
    path = m.path / f"off{option}.bin"
    assert path.read_bytes() == data
    wait_saved(path)  # else the open would not pass through anyway
    with open(path, "rb") as f:
        assert passthrough_handles(path) == 0
        assert f.read() == data


def test_no_passthrough_for_a_file_without_validator(mounts: Mounts, server: FaultServer) -> None:
    """Without ETag or Last-Modified every due revalidation looks like a change: a passthrough
    handle would make each of them refuse new opens. (Such a cache is emptied at each first open,
    so only a second path of the URL, opened while the first is, could pass through.)"""
    data = seeded_bytes(MiB + 3, seed=50)
    server.put("/plain.bin", data, etag=None, last_modified=None)
    url = server.url("/plain.bin")
    m = mounts.mount([f"{url} a.bin", f"{url} b.bin"], "--checkpoint-interval", "0.2")
    with open(m.path / "a.bin", "rb") as first:
        assert first.read() == data  # complete and checked
        wait_saved(m.path / "a.bin")  # and flushed: only the missing validator holds it back
        with open(m.path / "b.bin", "rb") as second:
            assert passthrough_handles(m.path / "b.bin") == 0
            assert second.read() == data
