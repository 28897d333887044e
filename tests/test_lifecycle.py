"""Start-up and shutdown stay bounded whatever the servers do: dead hosts, stuck fetches, a
mount command that dies, readers that go away while their reads wait on the network."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from fakeorigin import FakeOrigin
from faultserver import FaultServer, RequestRecord

from rangefs import state
from rangefs.cache import Cache, CacheConfig, cache_key
from rangefs.fetcher import BlockRun, Fetcher, WrittenSink, block_sum
from rangefs.origin import Origin, RemoteFile

from util import RANGEFS, Mount, Mounts, Server, alive, children, fstype, run_rangefs, seeded_bytes, wait_until

MiB = 1 << 20
BLOCK = 64 * 1024


def free_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_dead_host_fails_a_long_list_at_once_naming_file_line_and_host(mounts: Mounts) -> None:
    port = free_port()
    lines = [f"http://127.0.0.1:{port}/f{i}.bin" for i in range(2000)]
    started = time.monotonic()
    m = mounts.mount(lines, check=False)
    took = time.monotonic() - started
    assert m.result is not None and m.result.returncode == 1
    error = m.result.stderr.strip()
    assert "\n" not in error and "Traceback" not in error
    assert f"{m.url_list} line 1: http://127.0.0.1:{port}/f0.bin: cannot connect" in error  # the first URL says why
    assert "and 1999 more" in error
    assert took < 20, f"mount took {took:.1f}s to fail"
    assert not m.mounted()


def test_a_dead_host_is_skipped_and_the_good_url_mounts_quickly(mounts: Mounts, nginx: Server) -> None:
    url = nginx.put("lifecycle/good.bin", seeded_bytes(100_000, seed=61))
    port = free_port()
    lines = [f"http://127.0.0.1:{port}/f{i}.bin dead/f{i}.bin" for i in range(2000)] + [url]
    started = time.monotonic()
    m = mounts.mount(lines, "--skip-unavailable")
    took = time.monotonic() - started
    assert (m.path / "good.bin").read_bytes() == seeded_bytes(100_000, seed=61)
    assert took < 20, f"mount took {took:.1f}s"
    assert m.unmount().returncode == 0


def test_the_probe_phase_ends_at_its_deadline(mounts: Mounts, server: FaultServer) -> None:
    server.put("/slow.bin", b"x" * 1000, delay=60.0)  # a server that takes a minute to answer
    started = time.monotonic()
    m = mounts.mount([server.url("/slow.bin")], "--probe-timeout", "2", check=False)
    took = time.monotonic() - started
    assert m.result is not None and m.result.returncode == 1
    assert m.result.stderr.strip() == (f"rangefs: {m.url_list} line 1: {server.url('/slow.bin')}: not probed "
                                       "within 2s (--probe-timeout)")
    assert took < 10, f"mount took {took:.1f}s to give up"


def test_a_killed_mount_command_leaves_no_daemon_probing(mounts: Mounts, server: FaultServer) -> None:
    for i in range(4):
        server.put(f"/slow{i}.bin", b"x" * 1000, delay=30.0)  # every probe waits 30 s for its answer
    url_list = mounts.write_list([server.url(f"/slow{i}.bin") for i in range(4)])
    mountpoint = mounts.tmp / "mnt"
    mountpoint.mkdir()
    command = subprocess.Popen([*RANGEFS, "mount", str(url_list), str(mountpoint), "--cache-dir",
                                str(mounts.tmp / "cache")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: len(server.requests) >= 1, timeout=20), "the daemon never probed"
        daemon = children(command.pid)
        assert len(daemon) == 1
        helpers = children(daemon[0])
        mounts.pids.update(daemon + helpers)  # ended by pid whatever happens
        assert helpers, "no fetch process"
        command.kill()
        command.wait(timeout=10)
        assert wait_until(lambda: not any(alive(pid) for pid in daemon + helpers), timeout=5), \
            "the daemon or its fetch process lives on after the mount command was killed"
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(timeout=10)
    assert not mounts.made and fstype(mountpoint) is None


def start_reader(path: Path, offset: int = 0, size: int = 65536) -> subprocess.Popen[bytes]:
    """A process that reads ``size`` bytes at ``offset`` of ``path`` (and then sleeps, file open)."""
    code = ("import os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "os.pread(fd, int(sys.argv[3]), int(sys.argv[2]))\n"
            "time.sleep(600)\n")
    return subprocess.Popen([sys.executable, "-c", code, str(path), str(offset), str(size)])


def kill_reader(reader: subprocess.Popen[bytes]) -> None:
    reader.kill()
    reader.wait(timeout=10)


def gets(server: FaultServer, path: str) -> list[RequestRecord]:
    return [r for r in server.requests if r.method == "GET" and r.path == path]


@pytest.mark.parametrize("how", ["unmount", "lazy-unmount", "sigterm"])
def test_unmount_is_quick_whatever_fetch_is_stuck(mounts: Mounts, server: FaultServer, how: str) -> None:
    server.put("/stuck.bin", seeded_bytes(4 * MiB, seed=62), hang_from=0)
    m = mounts.mount([server.url("/stuck.bin")])
    daemon = m.pid()
    helpers = children(daemon)
    reader = start_reader(m.path / "stuck.bin")
    try:
        assert wait_until(lambda: len(gets(server, "/stuck.bin")) >= 1, timeout=10), "no fetch reached the server"
    finally:
        kill_reader(reader)  # an open file would make the unmount fail with EBUSY
    started = time.monotonic()
    if how == "sigterm":
        os.kill(daemon, signal.SIGTERM)
        assert wait_until(lambda: not alive(daemon), timeout=30)
        assert not m.mounted()
    else:
        done = run_rangefs("unmount", *(["-z"] if how == "lazy-unmount" else []), m.path, "--timeout", "30",
                           timeout=40)
        assert done.returncode == 0, done.stderr
    took = time.monotonic() - started
    assert took < 15, f"unmount took {took:.1f}s"
    print(f"{how}: daemon gone {took:.2f}s after the request")
    assert not alive(daemon) and not any(alive(pid) for pid in helpers)
    assert all_closed_within(server, "/stuck.bin", 2), "a stuck fetch was left open"


def test_a_stop_is_quick_while_an_open_waits_on_a_stuck_revalidation(mounts: Mounts, server: FaultServer) -> None:
    data = seeded_bytes(4 * MiB, seed=71)
    server.put("/stale.bin", data)
    m = mounts.mount([server.url("/stale.bin")], "--revalidate-interval", "0")  # every open asks the server
    daemon = m.pid()
    with (m.path / "stale.bin").open("rb") as f:
        assert f.read(MiB) == data[:MiB]
    server.set_faults("/stale.bin", hang_head=True)
    mark = server.mark()

    def heads() -> list[RequestRecord]:
        return [r for r in server.since(mark) if r.method == "HEAD"]

    code = "import sys\ntry:\n    open(sys.argv[1], 'rb')\nexcept OSError as exc:\n    sys.exit(exc.errno)\n"
    opener = subprocess.Popen([sys.executable, "-c", code, str(m.path / "stale.bin")])
    try:
        assert wait_until(lambda: len(heads()) >= 1, timeout=10), "the open did not ask the server"
        assert opener.poll() is None, "the open did not wait for the server"
        started = time.monotonic()
        os.kill(daemon, signal.SIGTERM)
        stopped = wait_until(lambda: not alive(daemon), timeout=30)
        took = time.monotonic() - started
        assert stopped and took < 15, f"the daemon took {took:.1f}s to stop" if stopped else "the daemon did not stop"
        print(f"daemon gone {took:.2f}s after SIGTERM")
        assert opener.wait(timeout=10) == errno.EIO
    finally:
        if opener.poll() is None:  # its open waits in the kernel for the daemon's answer: end both
            opener.kill()
            if alive(daemon):
                os.kill(daemon, signal.SIGKILL)
            opener.wait(timeout=10)
    assert not m.mounted()
    assert wait_until(lambda: all(r.closed_at is not None for r in heads()), timeout=2), "the probe was left open"
    saved = state.read(m.cache_dir / "files" / f"{cache_key(server.url('/stale.bin'))}.state")
    assert saved.synced and len(saved.bitmap) * BLOCK >= MiB  # what was read before is kept


def start_sequential_reader(path: Path, chunk: int = 65536) -> subprocess.Popen[bytes]:
    """A process that reads ``path`` from its start in ``chunk``-sized reads (until one waits forever)."""
    code = ("import os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "while os.read(fd, int(sys.argv[2])):\n"
            "    pass\n")
    return subprocess.Popen([sys.executable, "-c", code, str(path), str(chunk)])


def all_closed_within(server: FaultServer, path: str, seconds: float) -> bool:
    """Whether every GET of ``path`` that the server left hanging was given up by rangefs in time."""
    def closed() -> bool:
        return all(r.closed_at is not None for r in gets(server, path) if not r.status)  # unanswered

    return wait_until(closed, timeout=seconds)


@pytest.mark.parametrize("io", ["page-cache", "direct-io"])
def test_a_killed_readers_stuck_fetches_are_cancelled_and_other_reads_go_on(
    mounts: Mounts, server: FaultServer, io: str
) -> None:
    # Its first MiB only; through the page cache the first 8 MiB, so that the window grows past what
    # the kernel asks for (it counts from the reader) and prefetches reach the hang.
    hang = MiB if io == "direct-io" else 8 * MiB
    server.put("/stuck.bin", seeded_bytes(16 * MiB, seed=63), hang_from=hang)
    other = seeded_bytes(2 * MiB, seed=64)
    server.put("/other.bin", other)
    # Direct I/O: the killed reader waits in the kernel for the answer to its read, not yet exited.
    args = ["--direct-io"] if io == "direct-io" else []
    m = mounts.mount([server.url("/stuck.bin"), server.url("/other.bin")], *args)
    reader = start_sequential_reader(m.path / "stuck.bin")
    try:
        assert wait_until(lambda: len(hung(server, "/stuck.bin")) >= 1, timeout=10), "no fetch reached the hang"
        time.sleep(1)  # let the reader's read and the prefetches settle on the stuck server
        assert all(r.closed_at is None for r in hung(server, "/stuck.bin"))
    finally:
        kill_reader(reader)
    killed = time.monotonic()
    assert all_closed_within(server, "/stuck.bin", 5), "a fetch only the killed reader wanted goes on"
    # Runs longer than 1 MiB are fetched by the fetch process: it was told to cancel them too.
    if io == "page-cache":  # (direct I/O of 64 KiB reads prefetches less)
        assert any(length(r) > MiB for r in hung(server, "/stuck.bin")), "no prefetch reached the hang"
    gave_up = max(r.closed_at or 0 for r in gets(server, "/stuck.bin")) - killed
    assert (m.path / "other.bin").read_bytes() == other
    assert (m.path / "stuck.bin").open("rb").read(hang) == seeded_bytes(16 * MiB, seed=63)[:hang]
    print(f"the last stuck fetch was given up {gave_up:.2f}s after the kill")


def length(record: RequestRecord) -> int:
    """The length of the byte range a GET asked for."""
    assert record.range is not None
    first, last = record.range.removeprefix("bytes=").split("-")
    return int(last) - int(first) + 1


def hung(server: FaultServer, path: str) -> list[RequestRecord]:
    """The GETs of ``path`` the server never answered."""
    return [r for r in gets(server, path) if not r.status]


@pytest.mark.parametrize("mode", ["direct-io", "page-cache"])
def test_a_closed_handles_prefetches_are_cancelled_while_another_handle_stays_open(
    mounts: Mounts, server: FaultServer, mode: str
) -> None:
    """With the page cache, the kernel's own readahead waits on the prefetches and holds the
    handle's RELEASE back: the close's FLUSH, and no process holding the file, must end them.
    There the hang starts further on, and the reader asks the kernel to read ahead into it
    (POSIX_FADV_WILLNEED), as its readahead would for a faster reader: its own reads must not
    reach into it."""
    hang = MiB if mode == "direct-io" else 2 * MiB
    server.put("/stuck.bin", seeded_bytes(16 * MiB, seed=65), hang_from=hang)
    m = mounts.mount([server.url("/stuck.bin")], *(["--direct-io"] if mode == "direct-io" else []))
    idle = start_reader(m.path / "stuck.bin", size=4096)  # another handle of the file stays open
    try:
        code = ("import os, sys\n"
                "with open(sys.argv[1], 'rb', buffering=0) as f:\n"
                "    for _ in range(16):\n"
                "        f.read(65536)\n"
                + ("    os.posix_fadvise(f.fileno(), 2 << 20, 1 << 20, os.POSIX_FADV_WILLNEED)\n"
                   if mode == "page-cache" else "") +
                "    print('read', flush=True)\n"
                "    sys.stdin.readline()\n"  # the file stays open until the test says so
                "print('closed', flush=True)\n"
                "sys.stdin.read()\n")  # alive, file closed, until the test ends
        reader = subprocess.Popen([sys.executable, "-c", code, str(m.path / "stuck.bin")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        try:
            assert reader.stdout is not None and reader.stdout.readline() == b"read\n"
            # The prefetches are in the background: let them reach the hanging part before the close.
            assert wait_until(lambda: bool(hung(server, "/stuck.bin")), timeout=10), \
                "the reader's prefetches did not reach the hanging part"
            assert reader.stdin is not None
            reader.stdin.write(b"\n")
            reader.stdin.flush()
            assert reader.stdout.readline() == b"closed\n"
            closed = time.monotonic()
            assert all_closed_within(server, "/stuck.bin", 5), "a closed handle's prefetch goes on"
            print(f"prefetches given up {max(r.closed_at or 0 for r in hung(server, '/stuck.bin')) - closed:.2f}s "
                  "after the close")
        finally:
            kill_reader(reader)
    finally:
        kill_reader(idle)


def test_a_fetch_another_reader_waits_for_goes_on_when_the_first_is_killed(
    mounts: Mounts, server: FaultServer
) -> None:
    server.put("/stuck.bin", seeded_bytes(16 * MiB, seed=66), hang_from=4 * MiB)
    # Direct I/O: each reader's read reaches rangefs. Through the page cache the second reader
    # would wait for the kernel's read of the first (the kernel's own sharing), and ask again,
    # with a fetch of its own, once that read is cancelled.
    m = mounts.mount([server.url("/stuck.bin")], "--direct-io")
    first = start_reader(m.path / "stuck.bin", offset=8 * MiB)
    second = None
    try:
        assert wait_until(lambda: len(hung(server, "/stuck.bin")) >= 1, timeout=10)
        second = start_reader(m.path / "stuck.bin", offset=8 * MiB)  # the same blocks: waits for that fetch
        time.sleep(1)
        kill_reader(first)
        time.sleep(3)  # well past the check of the killed reader
        assert all(r.closed_at is None for r in hung(server, "/stuck.bin")), "a fetch still wanted was cancelled"
        assert len(hung(server, "/stuck.bin")) == 1, "the waiting reader fetched again"
        kill_reader(second)
        assert all_closed_within(server, "/stuck.bin", 5), "a fetch nobody wants any more goes on"
    finally:
        for reader in (first, second):
            if reader is not None and reader.poll() is None:
                kill_reader(reader)


@pytest.mark.parametrize("spelled", ["plain", "with-dot-dot"])
def test_a_read_through_an_inherited_descriptor_goes_on_when_the_opener_exits(
    mounts: Mounts, server: FaultServer, spelled: str
) -> None:
    """Also with the mount point named through '..': the kernel names open files by their
    canonical path, which is what rangefs must look for."""
    server.put("/stuck.bin", seeded_bytes(16 * MiB, seed=67), hang_from=4 * MiB)
    if spelled == "plain":
        m = mounts.mount([server.url("/stuck.bin")])
    else:
        m = Mount(mounts.tmp / "mnt", mounts.tmp / "cache", mounts.write_list([server.url("/stuck.bin")]))
        m.path.mkdir()
        (mounts.tmp / "sub").mkdir()
        mounts.made.append(m)
        result = run_rangefs("mount", m.url_list, mounts.tmp / "sub" / ".." / "mnt", "--cache-dir", m.cache_dir)
        assert result.returncode == 0 and m.mounted(), result.stderr
        mounts.pids.add(m.pid())
        mounts.pids.update(children(m.pid()))
    # The opener starts a child that reads through the descriptor it inherits, then exits.
    code = ("import os, subprocess, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import os, sys; os.pread(int(sys.argv[1]), 65536, "
            "8 << 20)', str(fd)], pass_fds=[fd])\n"
            "print(child.pid, flush=True)\n")
    opener = subprocess.Popen([sys.executable, "-c", code, str(m.path / "stuck.bin")], stdout=subprocess.PIPE)
    assert opener.stdout is not None
    child = int(opener.stdout.readline())
    mounts.pids.add(child)  # ended by pid whatever happens
    try:
        opener.wait(timeout=10)
        assert wait_until(lambda: len(hung(server, "/stuck.bin")) >= 1, timeout=10)
        time.sleep(3)  # well past the check of the opener, gone
        assert alive(child) and all(r.closed_at is None for r in hung(server, "/stuck.bin")), \
            "the read of a process that inherited the file was cancelled"
    finally:
        os.kill(child, signal.SIGKILL)
    assert all_closed_within(server, "/stuck.bin", 5), "the fetch goes on after the inheriting reader was killed"


def test_a_fetch_is_cancelled_when_the_last_read_waiting_for_it_is(tmp_path: Path) -> None:
    """The rule itself, against an in-memory origin that sends nothing for a minute."""
    fake = FakeOrigin(seeded_bytes(4 * BLOCK, seed=68), chunk_delay=60.0)

    async def run() -> None:
        Cache.prepare(tmp_path)
        async with Origin(transport=fake.transport()) as origin:
            cache = Cache(CacheConfig(tmp_path, block_size=BLOCK), Fetcher(origin, BLOCK))
            cached = cache.file("http://origin.test/f.bin", await origin.probe("http://origin.test/f.bin"))
            async with trio.open_nursery() as nursery:
                await nursery.start(cache.serve)
                await cached.acquire()
                scopes = [trio.CancelScope(), trio.CancelScope()]

                async def reader(scope: trio.CancelScope) -> None:
                    with scope:
                        await cached.read(0, 100)

                for scope in scopes:
                    nursery.start_soon(reader, scope)
                await trio.sleep(0.5)
                (flight,) = set(cached.flights._inflight.values())
                scopes[0].cancel()
                await trio.sleep(0.5)
                assert not flight.scope.cancel_called, "a fetch another read waits for was cancelled"
                scopes[1].cancel()
                await trio.sleep(0.5)
                assert flight.scope.cancel_called and not cached.flights._inflight
                await cached.release()
                nursery.cancel_scope.cancel()

    trio.run(run)


class _GatedFetcher:
    """Fetches blocks one at a time, each once its gate opens; counts the fetches cancelled."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.gates = [trio.Event() for _ in range(-(-len(data) // BLOCK))]
        self.runs: list[tuple[int, int]] = []
        self.cancelled = 0

    async def fetch_into(self, remote: RemoteFile, run: BlockRun, fd: int,
                         on_written: WrittenSink) -> None:
        self.runs.append((run.first, run.stop))
        try:
            for block in range(run.first, run.stop):
                await self.gates[block].wait()
                piece = self.data[block * BLOCK : (block + 1) * BLOCK]
                os.pwrite(fd, piece, block * BLOCK)
                await on_written(block, block + 1, [block_sum(piece)])
        except trio.Cancelled:
            self.cancelled += 1
            raise


def test_a_reader_waiting_for_several_blocks_of_anothers_fetch_keeps_it_wanted_until_the_last(
    tmp_path: Path,
) -> None:
    """Once the reader that started a fetch is gone, a read waiting for several of its blocks
    wants it until its last block comes, not only until its first one."""
    data = seeded_bytes(8 * BLOCK, seed=71)
    fetcher = _GatedFetcher(data)

    async def run() -> None:
        Cache.prepare(tmp_path)
        cache = Cache(CacheConfig(tmp_path, block_size=BLOCK), fetcher)  # type: ignore[arg-type]
        cached = cache.file("http://origin.test/f.bin", RemoteFile("http://origin.test/f.bin", len(data), '"v1"', None))
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.serve)
            await cached.acquire()
            first = trio.CancelScope()
            got: list[bytes] = []

            async def claimer() -> None:
                with first:
                    await cached.read(0, 4 * BLOCK)

            async def waiter() -> None:
                got.append(bytes(await cached.read(BLOCK, 3 * BLOCK)))

            nursery.start_soon(claimer)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()  # its reader is gone; the waiter still wants blocks 1..3
            await trio.testing.wait_all_tasks_blocked()
            for block in range(4):
                fetcher.gates[block].set()
                await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.01)
            assert got == [data[BLOCK : 4 * BLOCK]]
            assert fetcher.cancelled == 0, "a fetch a read still waited for was cancelled at its first block"
            assert fetcher.runs == [(0, 4)]
            await cached.release()
            nursery.cancel_scope.cancel()

    trio.run(run)


def test_killed_readers_of_a_stuck_server_give_the_mount_back_to_a_healthy_one(
    mounts: Mounts, server: FaultServer, nginx: Server
) -> None:
    server.put("/stuck.bin", seeded_bytes(16 * MiB, seed=69), hang_from=0)
    healthy = seeded_bytes(3 * MiB, seed=70)
    url = nginx.put("lifecycle/healthy.bin", healthy)
    m = mounts.mount([server.url("/stuck.bin"), url])
    readers = [start_reader(m.path / "stuck.bin", offset=i * MiB) for i in range(10)]
    try:
        # The mount's connections (eight) all wait on the stuck server.
        assert wait_until(lambda: len(hung(server, "/stuck.bin")) >= 8, timeout=10)
    finally:
        for reader in readers:
            kill_reader(reader)
    started = time.monotonic()
    done = subprocess.run(["cat", str(m.path / "healthy.bin")], capture_output=True, timeout=20)
    took = time.monotonic() - started
    assert done.returncode == 0 and done.stdout == healthy
    assert took < 5, f"a read of the healthy server took {took:.1f}s after the stuck readers were killed"
    assert all_closed_within(server, "/stuck.bin", 5)
