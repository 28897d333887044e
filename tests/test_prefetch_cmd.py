"""`rangefs prefetch` through real mounts: to completion (complete, saved, exact bytes, large
ranges), in the background, resumed after a kill -9 of the daemon (only the missing bytes
fetched, from nginx's log), refused above --cache-max-size, a Ctrl-C that leaves the daemon
going; and prefetch requests queued behind every other kind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import trio
import trio.testing
from faultserver import FaultServer
from test_cli_errors import assert_one_line_error
from test_persist import kill_9, sha256_of

from rangefs import state
from rangefs.cache import cache_key
from rangefs.limits import BACKGROUND, Slots

from proxy import ThrottleProxy
from util import RANGEFS, Mount, Mounts, Server, children, pread_random, run_rangefs, seeded_bytes, wait_until

MiB = 1024 * 1024


def files_of(m: Mount) -> dict[str, dict[str, Any]]:
    done = run_rangefs("status", m.path, "--json")
    assert done.returncode == 0, done.stderr
    return {f["path"]: f for f in json.loads(done.stdout)["files"]}


def saved_complete(m: Mount, url: str) -> bool:
    saved = state.read(m.cache_dir / "files" / f"{cache_key(url)}.state")
    return saved.bitmap.complete() and saved.synced


def test_prefetch_fetches_whole_files_once_in_large_ranges_and_saves_them(mounts: Mounts, nginx: Server) -> None:
    a, b = seeded_bytes(40 * MiB + 11, seed=200), seeded_bytes(3 * MiB, seed=201)
    url_a, url_b = nginx.put("pre/a.bin", a), nginx.put("pre/b.bin", b)
    m = mounts.mount([url_a, f"{url_b} dir/b.bin"])
    mark = nginx.mark()
    with open(m.path / "a.bin", "rb"):  # open, so that no last close saves it: the prefetch must
        done = run_rangefs("prefetch", m.path / "a.bin", m.path / "dir")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "prefetched 2 files, 43.0M: complete and saved\n"
        assert saved_complete(m, url_a) and saved_complete(m, url_b)  # on disk when the command returns
    files = files_of(m)
    assert files["a.bin"]["complete"] and files["dir/b.bin"]["complete"]
    assert nginx.bytes_sent("pre/a.bin", since=mark) == len(a)  # every byte once
    assert nginx.bytes_sent("pre/b.bin", since=mark) == len(b)
    ranged = [r for r in nginx.nginx.requests(since=mark) if r.path == "/pre/a.bin"]
    assert all(r.status == 206 and r.range.startswith("bytes=") for r in ranged)
    assert len(ranged) <= 4  # requests of up to 16 MiB, not block by block
    mark = nginx.mark()
    assert sha256_of(m.path / "a.bin") == hashlib.sha256(a).hexdigest()
    assert nginx.bytes_sent("pre/", since=mark) == 0
    again = run_rangefs("prefetch", m.path / "a.bin")  # complete already: nothing to fetch
    assert again.returncode == 0 and nginx.bytes_sent("pre/", since=mark) == 0


def test_prefetch_no_wait_returns_at_once_and_the_daemon_finishes(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(8 * MiB, seed=202)
    url = nginx.put("pre/n.bin", data)
    m = mounts.mount([url])
    done = run_rangefs("prefetch", "--no-wait", m.path / "n.bin")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("prefetching 1 file, 8.0M, in the background")
    assert wait_until(lambda: files_of(m)["n.bin"]["complete"], timeout=60)
    assert wait_until(lambda: saved_complete(m, url), timeout=30)


def test_prefetch_after_a_kill_9_mid_prefetch_fetches_only_what_is_missing(
    mounts: Mounts, nginx: Server, throttled: Callable[[float], ThrottleProxy]
) -> None:
    data = seeded_bytes(96 * MiB, seed=203)
    nginx.put("pre/k.bin", data)
    proxy = throttled(8 * MiB)  # per connection: the prefetch takes seconds
    m = mounts.mount([f"http://127.0.0.1:{proxy.port}/pre/k.bin"], "--max-connections", "1")
    processes = [m.pid(), *children(m.pid())]
    assert run_rangefs("prefetch", "--no-wait", m.path / "k.bin").returncode == 0
    assert wait_until(lambda: proxy.forwarded >= 40 * MiB, timeout=60)
    kill_9(m, processes)
    assert proxy.forwarded < len(data), "the prefetch finished before the kill"
    mounts.remount(m, "--max-connections", "1")
    kept = files_of(m)["k.bin"]["cached_bytes"]
    assert 0 < kept < len(data)
    mark = nginx.mark()
    done = run_rangefs("prefetch", m.path / "k.bin", timeout=120)
    assert done.returncode == 0, done.stderr
    assert nginx.bytes_sent("pre/k.bin", since=mark) == len(data) - kept  # only the missing blocks
    assert sha256_of(m.path / "k.bin") == hashlib.sha256(data).hexdigest()


def test_ctrl_c_stops_waiting_but_not_the_prefetch(
    mounts: Mounts, nginx: Server, throttled: Callable[[float], ThrottleProxy]
) -> None:
    data = seeded_bytes(48 * MiB, seed=204)
    nginx.put("pre/c.bin", data)
    proxy = throttled(16 * MiB)
    m = mounts.mount([f"http://127.0.0.1:{proxy.port}/pre/c.bin"], "--max-connections", "1")
    waiting = subprocess.Popen([*RANGEFS, "prefetch", str(m.path / "c.bin")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: proxy.forwarded >= 8 * MiB, timeout=60)
        assert files_of(m)["c.bin"]["state"] == "fetching"
        waiting.send_signal(signal.SIGINT)
        _, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait(timeout=30)
    assert waiting.returncode == 130
    assert "goes on prefetching" in err and "Traceback" not in err
    assert wait_until(lambda: files_of(m)["c.bin"]["complete"], timeout=60)


def test_an_unmount_during_a_prefetch_is_prompt_and_keeps_what_was_fetched(
    mounts: Mounts, nginx: Server, throttled: Callable[[float], ThrottleProxy]
) -> None:
    nginx.put("pre/u.bin", seeded_bytes(64 * MiB, seed=207))
    proxy = throttled(8 * MiB)
    m = mounts.mount([f"http://127.0.0.1:{proxy.port}/pre/u.bin"], "--max-connections", "1")
    assert run_rangefs("prefetch", "--no-wait", m.path / "u.bin").returncode == 0
    assert wait_until(lambda: proxy.forwarded >= 16 * MiB, timeout=60)
    done = m.unmount()
    assert done.returncode == 0, done.stderr
    assert not m.mounted()
    from rangefs.status import offline_files

    kept = offline_files(m.cache_dir)[0]["cached_bytes"]
    assert 8 * MiB <= kept < 64 * MiB


def test_prefetch_of_a_file_larger_than_the_cache_limit_is_refused(mounts: Mounts, nginx: Server) -> None:
    url = nginx.put("pre/big.bin", seeded_bytes(3 * MiB, seed=205))
    small = nginx.put("pre/small.bin", seeded_bytes(1000, seed=206))
    m = mounts.mount([url, small], "--cache-max-size", "2M")
    mark = nginx.mark()
    done = run_rangefs("prefetch", m.path / "small.bin", m.path / "big.bin")
    assert_one_line_error(done, "big.bin", "larger than the cache limit", "--cache-max-size 2.0M")
    assert nginx.bytes_sent("pre/", since=mark) == 0  # refused before anything started


def test_prefetch_requests_queue_behind_reads_and_their_readahead() -> None:
    slots = Slots(1)
    order: list[str] = []

    async def hold(name: str, urgent: bool, background: bool) -> None:
        BACKGROUND.set(background)
        async with slots.hold(urgent):
            order.append(name)
            await trio.sleep(1.0)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, "first", False, False)
            await trio.sleep(0.01)
            for name, urgent, background in (("background-urgent", True, True), ("background", False, True),
                                             ("readahead", False, False), ("read", True, False)):
                nursery.start_soon(hold, name, urgent, background)
                await trio.sleep(0.01)

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    assert order == ["first", "read", "readahead", "background-urgent", "background"]


def test_the_background_mark_reaches_the_tasks_a_prefetch_spawns() -> None:
    seen: list[bool] = []

    async def child() -> None:
        seen.append(BACKGROUND.get())

    async def run() -> None:
        async with trio.open_nursery() as nursery:

            async def parent() -> None:
                BACKGROUND.set(True)
                nursery.start_soon(child)

            nursery.start_soon(parent)
            nursery.start_soon(child)

    trio.run(run)
    assert sorted(seen) == [False, True]


def test_on_a_terminal_prefetch_draws_a_progress_bar(mounts: Mounts, nginx: Server) -> None:
    import pty

    data = seeded_bytes(12 * MiB, seed=208)
    m = mounts.mount([nginx.put("pre/tty.bin", data)])
    leader, follower = pty.openpty()
    try:
        done = subprocess.run([*RANGEFS, "prefetch", str(m.path / "tty.bin")], stdout=follower,
                              stderr=subprocess.PIPE, text=True, timeout=60)
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert done.returncode == 0, done.stderr
    text = shown.decode(errors="replace")
    assert "12.0/12.0 MiB" in text  # the bar's bytes column, drawn by rich
    assert "prefetched 1 file, 12.0M: complete and saved" in text


def test_a_prefetch_that_finds_the_file_changed_fails_and_the_next_one_fetches_the_new_version(
    mounts: Mounts, server: FaultServer
) -> None:
    old, new = seeded_bytes(3 * MiB, seed=209), seeded_bytes(3 * MiB + 17, seed=210)
    server.put("/v.bin", old)
    m = mounts.mount([server.url("/v.bin")])
    assert pread_random(m.path / "v.bin", 0, 1000) == old[:1000]
    server.change("/v.bin", new)
    first = run_rangefs("prefetch", m.path / "v.bin")  # its first fetch learns of the change
    assert_one_line_error(first, "v.bin", "If-Range")
    assert files_of(m)["v.bin"]["state"] in ("stale", "error")  # a switch in the background may be done
    second = run_rangefs("prefetch", m.path / "v.bin")  # moves to the new version first
    assert second.returncode == 0, second.stderr
    status = files_of(m)["v.bin"]
    assert status["size"] == len(new) and status["complete"]
    assert (m.path / "v.bin").read_bytes() == new


class _FakeFile:
    """What ControlServer._prefetch looks at of a CachedFile (hashable, as CachedFile is)."""

    def __init__(self) -> None:
        self.size = 1
        self.bitmap = None
        self.data = type("Data", (), {"fd": -1})()
        self.remote = type("Remote", (), {"if_range": None})()

    def cached_bytes(self) -> int:
        return 0


class _FakeConn:
    async def send(self, data: bytes) -> int:
        await trio.lowlevel.checkpoint()
        return len(data)


def _server() -> Any:
    from pathlib import Path
    from types import SimpleNamespace

    from rangefs.control import ControlServer

    cache = SimpleNamespace(config=SimpleNamespace(cache_dir=Path("/nonexistent"), max_bytes=None))
    return ControlServer(cache, None, "/m")  # type: ignore[arg-type]


def test_a_prefetch_of_many_files_runs_a_few_at_a_time(monkeypatch: Any) -> None:
    """Each job opens its cache files and revalidates: a directory of many files must not open them all at once."""
    from rangefs import control

    running, peak = 0, 0

    async def fake_run(self: control.Prefetch) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(1.0)
        running -= 1
        self.done.set()

    monkeypatch.setattr(control.Prefetch, "run", fake_run)
    server = _server()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server._nursery = nursery
            files = [(f"f{i}", _FakeFile()) for i in range(20)]
            await server._prefetch(_FakeConn(), files, True)

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    assert peak == control._MAX_PREFETCH_FILES


def test_a_failed_accept_does_not_stop_the_control_channel() -> None:
    """accept() failing (no descriptor left) must not end the server's task, which would end the mount."""
    import errno

    server = _server()
    calls = 0

    class FailingSocket:
        async def accept(self) -> Any:
            nonlocal calls
            calls += 1
            if calls <= 2:
                raise OSError(errno.EMFILE, "Too many open files")
            await trio.sleep_forever()

    server._sock = FailingSocket()

    async def run() -> None:
        with trio.move_on_after(10):
            await server.serve()

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    assert calls == 3


def test_prefetch_requests_leave_a_slot_free_for_reads() -> None:
    """With two slots, a prefetch holds one: a read arriving meanwhile starts at once, and the
    prefetch's next request waits for its own share, not for the read."""
    slots = Slots(2)
    started: dict[str, float] = {}

    async def hold(name: str, urgent: bool, background: bool, seconds: float) -> None:
        BACKGROUND.set(background)
        async with slots.hold(urgent):
            started[name] = trio.current_time()
            await trio.sleep(seconds)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold, "prefetch-1", False, True, 10.0)
            nursery.start_soon(hold, "prefetch-2", False, True, 10.0)
            await trio.sleep(1.0)
            nursery.start_soon(hold, "read", True, False, 1.0)

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    assert started["read"] == 1.0  # at once: one slot was left free
    assert sorted((started["prefetch-1"], started["prefetch-2"])) == [0.0, 10.0]  # one waited for the other
    assert slots.used == 0


class _FakeCachedFile:
    """What a Prefetch job uses of its CachedFile; ``ensure`` records the priority it runs at."""

    def __init__(self, saves_complete: bool) -> None:
        from types import SimpleNamespace

        self.identity = SimpleNamespace(url="http://h/f", nblocks=5)
        self.generation = 1
        self.cache = SimpleNamespace(config=SimpleNamespace(max_request_blocks=2, max_connections=2))
        self.journal = SimpleNamespace(persisted=None)
        self.saves_complete = saves_complete
        self.ensured: list[tuple[int, int, bool]] = []

    async def revalidate(self) -> bool:
        return False

    async def acquire(self) -> None:
        pass

    async def release(self) -> None:
        pass

    async def ensure(self, first: int, stop: int, generation: int) -> None:
        await trio.lowlevel.checkpoint()
        self.ensured.append((first, stop, BACKGROUND.get()))

    async def checkpoint(self) -> None:
        complete = self.saves_complete
        self.journal.persisted = type("Saved", (), {"complete": lambda self: complete})()


def test_a_prefetch_job_fetches_every_chunk_in_the_background_and_checks_the_save() -> None:
    from rangefs.control import Prefetch

    outside: list[bool] = []

    async def run(file: _FakeCachedFile) -> Prefetch:
        job = Prefetch(file)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job.run)
        outside.append(BACKGROUND.get())  # the mark stays in the job's task
        return job

    saved = _FakeCachedFile(saves_complete=True)
    job = trio.run(run, saved)
    assert job.done.is_set() and job.error is None
    assert sorted(saved.ensured) == [(0, 2, True), (2, 4, True), (4, 5, True)]
    unsaved = _FakeCachedFile(saves_complete=False)
    job = trio.run(run, unsaved)
    assert job.error is not None and "not all of it could be saved" in job.error
    assert outside == [False, False]


def test_paths_in_a_request_walk_each_directory_once_however_deep() -> None:
    """A request's paths are the client's to choose: thousands naming the root must not walk the
    tree thousands of times on the trio thread, and a deep tree must not hit the recursion limit."""
    from types import SimpleNamespace

    from rangefs.control import ControlServer
    from rangefs.tree import ROOT_INODE

    looked = 0

    class Nodes(dict):  # type: ignore[type-arg]
        def __getitem__(self, key: Any) -> Any:
            nonlocal looked
            looked += 1
            return super().__getitem__(key)

    depth = 3000
    nodes = Nodes()
    for level in range(depth):
        inode = ROOT_INODE + level
        nodes[inode] = SimpleNamespace(cached=None, children={b"d": inode + 1, b"f": 100_000 + level})
        nodes[100_000 + level] = SimpleNamespace(cached=f"file {level}", children=None)
    nodes[ROOT_INODE + depth] = SimpleNamespace(cached=None, children={})
    server = ControlServer(SimpleNamespace(config=SimpleNamespace(cache_dir="/nonexistent")),  # type: ignore[arg-type]
                           SimpleNamespace(nodes=nodes), "/m")  # type: ignore[arg-type]
    found = server._files([""] * 5000 + ["d/f", "./d/d/"])
    assert len(found) == depth
    assert found[-1] == ("f", "file 0") and found[-2] == ("d/f", "file 1")  # in path order, as the tree sorts
    assert looked <= len(nodes) + 10
