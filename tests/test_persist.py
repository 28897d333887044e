"""What the cache keeps on disk and in memory, through a real mount: storage that follows the
blocks cached (not the size a server claims), saves that lose little to a kill -9, a previous
state generation to fall back on, and a cached_bytes xattr that claims only checkable blocks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from faultserver import FaultServer, Pattern, pattern_bytes

from rangefs import state
from rangefs.cache import DEFAULT_BLOCK_SIZE, cache_key

from proxy import ThrottleProxy
from util import Mount, Mounts, Server, alive, children, seeded_bytes, wait_until

MiB = 1024 * 1024
TiB = 1024**4
BLOCK = DEFAULT_BLOCK_SIZE


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def allocated_bytes(path: Path) -> int:
    """Disk space the files under ``path`` take (holes of sparse files do not count)."""
    done = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


def test_a_size_claimed_by_the_server_costs_memory_and_disk_only_for_blocks_read(
    mounts: Mounts, server: FaultServer
) -> None:
    size = 8 * TiB
    server.put("/huge.bin", Pattern(size))
    url = server.url("/huge.bin")
    m = mounts.mount([url])
    path = m.path / "huge.bin"
    assert path.stat().st_size == size
    reads = [0, size // 2 + 12345, size - 1000]
    with open(path, "rb") as f:
        for offset in reads:
            f.seek(offset)
            assert f.read(64 * 1024) == pattern_bytes(offset, min(offset + 64 * 1024, size))
        processes = [m.pid(), *children(m.pid())]
        assert len(processes) == 2  # the daemon and its fetch process
        for pid in processes:
            assert rss_bytes(pid) < 200 * 1000 * 1000, f"pid {pid} holds {rss_bytes(pid)} bytes"
    assert allocated_bytes(m.cache_dir) < 64 * MiB
    assert m.unmount().returncode == 0
    files = m.cache_dir / "files" / cache_key(url)
    assert files.with_suffix(".state").stat().st_size <= 4096  # what each save writes
    assert allocated_bytes(files.with_suffix(".xxh")) <= 64 * 1024
    assert allocated_bytes(m.cache_dir) < 64 * MiB

    mounts.remount(m)  # loading it back costs no more
    mark = server.mark()
    with open(path, "rb") as f:
        for offset in reads:
            f.seek(offset)
            assert f.read(100) == pattern_bytes(offset, min(offset + 100, size))
        for pid in [m.pid(), *children(m.pid())]:
            assert rss_bytes(pid) < 200 * 1000 * 1000
    assert [r for r in server.since(mark) if r.method == "GET"] == []  # all from the cache


def test_a_server_that_ignores_range_and_claims_a_huge_size_costs_no_memory_for_it(
    mounts: Mounts, server: FaultServer
) -> None:
    """Such a file is streamed from its start; what tracks the stream must not list the blocks
    it will bring (the size claimed is 2**27 blocks)."""
    size = 8 * TiB
    server.put("/stream.bin", Pattern(size), ignore_range=True, rate=4 * MiB)
    m = mounts.mount([server.url("/stream.bin")])
    with open(m.path / "stream.bin", "rb") as f:
        assert f.read(100 * 1000) == pattern_bytes(0, 100 * 1000)
        for pid in [m.pid(), *children(m.pid())]:
            assert rss_bytes(pid) < 200 * 1000 * 1000, f"pid {pid} holds {rss_bytes(pid)} bytes"
    assert m.unmount().returncode == 0


def kill_9(m: Mount, processes: list[int]) -> None:
    """Kill the daemon and its fetch process at once, and drop the dead mount."""
    for pid in processes:
        os.kill(pid, signal.SIGKILL)
    for pid in processes:
        assert wait_until(lambda pid=pid: not alive(pid), timeout=10)
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True, timeout=30)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def test_a_kill_9_right_after_a_large_read_loses_at_most_32_mib(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(200 * MiB, seed=160)
    url = nginx.put("persist/k.bin", data)
    m = mounts.mount([url])
    processes = [m.pid(), *children(m.pid())]
    f = open(m.path / "k.bin", "rb")
    try:
        assert f.read() == data
        kill_9(m, processes)  # as the read returns, the file still open: no close saves it
    finally:
        with contextlib.suppress(OSError):  # the mount is gone
            f.close()
    mounts.remount(m)
    mark = nginx.mark()
    assert sha256_of(m.path / "k.bin") == hashlib.sha256(data).hexdigest()
    assert nginx.bytes_sent("persist/k.bin", since=mark) <= 32 * MiB


def test_a_kill_9_during_a_slow_read_loses_at_most_32_mib(
    mounts: Mounts, nginx: Server, throttled: Callable[[float], ThrottleProxy]
) -> None:
    data = seeded_bytes(96 * MiB, seed=161)
    nginx.put("persist/t.bin", data)
    proxy = throttled(8 * MiB)  # per connection: the read takes seconds
    m = mounts.mount([f"http://127.0.0.1:{proxy.port}/persist/t.bin"], "--max-connections", "1")  # at the proxy's pace
    processes = [m.pid(), *children(m.pid())]
    reader = subprocess.Popen(["cat", str(m.path / "t.bin")], stdout=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: proxy.forwarded >= 40 * MiB, timeout=60)
        kill_9(m, processes)
    finally:
        reader.kill()
        reader.wait(timeout=30)
    received = proxy.forwarded  # what reached the daemon's fetch process before the kill
    assert received < len(data), "the read finished before the kill"
    mounts.remount(m)
    mark = nginx.mark()
    assert sha256_of(m.path / "t.bin") == hashlib.sha256(data).hexdigest()
    # Every byte not received before the kill is sent now; anything more was received twice.
    assert received + nginx.bytes_sent("persist/t.bin", since=mark) - len(data) <= 32 * MiB


def newest_slot(state_path: Path) -> Path:
    """The slot of a state file that holds its newest save."""
    return max((state_path, state.previous(state_path)), key=lambda slot: state.read_slot(slot).sequence)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "removed"])
def test_a_damaged_state_file_falls_back_to_the_previous_generation(
    mounts: Mounts, nginx: Server, damage: str
) -> None:
    data = seeded_bytes(24 * MiB + 777, seed=162)
    url = nginx.put(f"persist/{damage}.bin", data)
    m = mounts.mount([url])
    assert (m.path / f"{damage}.bin").read_bytes() == data
    assert m.unmount().returncode == 0
    state_path = newest_slot(m.cache_dir / "files" / f"{cache_key(url)}.state")
    blob = state_path.read_bytes()
    if damage == "truncated":
        state_path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flipped":
        state_path.write_bytes(blob[:40] + bytes([blob[40] ^ 1]) + blob[41:])
    else:
        state_path.unlink()
    mounts.remount(m)
    mark = nginx.mark()
    assert (m.path / f"{damage}.bin").read_bytes() == data
    assert nginx.bytes_sent(f"persist/{damage}.bin", since=mark) <= MiB


def test_a_previous_generation_of_another_version_is_not_used(mounts: Mounts, server: FaultServer) -> None:
    old, new = seeded_bytes(3 * BLOCK, seed=163), seeded_bytes(3 * BLOCK, seed=164)
    server.put("/v.bin", old)
    m = mounts.mount([server.url("/v.bin")])
    assert (m.path / "v.bin").read_bytes() == old
    assert m.unmount().returncode == 0
    server.change("/v.bin", new)  # same size, new ETag
    newest_slot(m.cache_dir / "files" / f"{cache_key(server.url('/v.bin'))}.state").write_bytes(b"torn")
    mounts.remount(m)
    assert (m.path / "v.bin").read_bytes() == new


@pytest.mark.parametrize("sums", ["removed", "cut"])
def test_cached_bytes_counts_no_block_whose_sum_is_lost(mounts: Mounts, nginx: Server, sums: str) -> None:
    data = seeded_bytes(5 * BLOCK + 10, seed=165)
    url = nginx.put(f"persist/sums-{sums}.bin", data)
    m = mounts.mount([url])
    path = m.path / f"sums-{sums}.bin"
    assert path.read_bytes() == data
    assert int(os.getxattr(path, "user.rangefs.cached_bytes")) == len(data)
    assert m.unmount().returncode == 0
    xxh = m.cache_dir / "files" / f"{cache_key(url)}.xxh"
    if sums == "removed":
        xxh.unlink()
    else:
        os.truncate(xxh, 4 * 2)  # the sums of blocks 0 and 1 only
    kept = 0 if sums == "removed" else 2 * BLOCK
    mounts.remount(m)
    assert int(os.getxattr(path, "user.rangefs.cached_bytes")) == kept  # before any open
    assert path.stat().st_blocks * 512 == kept
    mark = nginx.mark()
    assert path.read_bytes() == data
    assert nginx.bytes_sent(f"persist/sums-{sums}.bin", since=mark) == len(data) - kept
