"""Cache limits and eviction (rangefs.evict): the limit held during reads larger than it, LRU
order, what is never evicted, and a cache left consistent by a kill -9 in the middle of eviction."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from fakeorigin import FakeOrigin
from procs import alive, children

from rangefs import state
from rangefs.bitmap import Bitmap
from rangefs.cache import Cache, CacheConfig, CachedFile
from rangefs.evict import CHUNK_BYTES, Lru, Reading, allocated_bytes, evictable, order, punch, untracked_chunks
from rangefs.fetcher import Fetcher
from rangefs.origin import Origin

from util import Mounts, Server, seeded_bytes, wait_until

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024


def big_bytes(size: int, seed: int) -> bytes:
    """``size`` seeded random bytes (randbytes takes at most 256 MiB at once)."""
    piece = 64 * MiB
    return b"".join(seeded_bytes(min(piece, size - at), seed * 1000 + at // piece) for at in range(0, size, piece))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


class Sampler:
    """The largest allocated size of a cache directory seen every ~50 ms, from a thread."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, allocated_bytes(self.cache_dir))
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def cached_bytes(path: Path) -> int:
    return int(os.getxattr(path, "user.rangefs.cached_bytes"))


def recorded_blocks_correct(cache_dir: Path, originals: dict[str, bytes]) -> int:
    """Check every block the state files on disk record against the original bytes (by URL):
    the number of blocks checked. A recorded block that reads otherwise fails the test."""
    checked = 0
    files = cache_dir / "files"
    for state_path in files.glob("*.state"):
        saved = state.read(state_path)
        data = originals[saved.identity.url]
        block = saved.identity.block_size
        with open(state_path.with_suffix(".data"), "rb") as f:
            for first, stop in saved.bitmap.runs():
                f.seek(first * block)
                got = f.read(min(stop * block, len(data)) - first * block)
                assert got == data[first * block : first * block + len(got)], \
                    f"recorded blocks {first}..{stop} of {saved.identity.url} are wrong on disk"
                checked += stop - first
    return checked


# -- pure parts -----------------------------------------------------------------------------


def test_lru_orders_chunks_by_last_use_and_forgets_the_oldest_past_its_bound() -> None:
    lru = Lru(entries=4)
    lru.touch("a", 0, 2, 1.0)
    lru.touch("b", 0, 1, 2.0)
    lru.touch("a", 0, 1, 3.0)  # a's chunk 0 used again: now the newest
    assert [(key, chunk) for _, key, chunk in lru.oldest()] == [("a", 1), ("b", 0), ("a", 0)]
    lru.touch("c", 0, 2, 4.0)  # five entries for four places: the oldest goes
    assert len(lru) == 4
    assert ("a", 1) not in {(key, chunk) for _, key, chunk in lru.oldest()}
    assert lru.tracked("a") == {0}


def test_order_puts_chunks_cached_before_the_mount_first_by_persisted_use() -> None:
    lru = Lru()
    lru.touch("new", 0, 1, 100.0)
    units = order(lru, {"old": 10.0, "older": 5.0, "new": 99.5}, started=50.0)
    assert [(u.key, u.chunk) for u in units] == [("older", None), ("old", None), ("new", None), ("new", 0)]


def test_chunk_selection_skips_busy_and_absent_blocks() -> None:
    present = Bitmap(10)
    for block in (0, 1, 2, 3, 5, 6):
        present.add(block)
    busy = {2, 6}
    assert evictable(range(0, 8), present, busy.__contains__) == [0, 1, 3, 5]


def test_untracked_chunks_are_those_cached_not_tracked_in_file_order_up_to_a_limit() -> None:
    present = Bitmap(40)
    for block in (*range(0, 3), *range(9, 21), 39):
        present.add(block)
    # chunks of 4 blocks: present in 0, 2, 3, 4, 5, 9; 3 is tracked
    assert untracked_chunks(present, 4, {3}, 10) == [0, 2, 4, 5, 9]
    assert untracked_chunks(present, 4, {3}, 2) == [0, 2]


def test_reading_holds_ranges_until_the_read_returns() -> None:
    reading = Reading()
    with reading.hold(10, 20):
        assert reading.overlaps(19, 30)
        assert reading.overlaps(0, 11)
        assert not reading.overlaps(20, 30)
        with reading.hold(40, 41):
            assert reading.overlaps(40, 41)
        assert not reading.overlaps(40, 41)
    assert not reading.overlaps(0, 100)


def test_allocated_bytes_counts_like_du_and_never_follows_a_link(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "files").mkdir(parents=True)
    (cache / "files" / "a.data").write_bytes(b"x" * MiB)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"y" * (8 * MiB))
    (cache / "files" / "link").symlink_to(outside)
    (cache / "files" / "filelink").symlink_to(outside / "big")
    du = int(subprocess.run(["du", "-s", "-B1", str(cache)], capture_output=True, text=True,
                            check=True).stdout.split()[0])
    assert allocated_bytes(cache) == du
    assert allocated_bytes(cache) < 2 * MiB


def test_punch_frees_the_range_and_keeps_the_size(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(8 * MiB))
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        punch(fd, 2 * MiB, 4 * MiB)
        assert os.fstat(fd).st_size == 8 * MiB
        assert os.fstat(fd).st_blocks * 512 <= before * 512 - 4 * MiB
        assert os.pread(fd, 4 * MiB, 2 * MiB) == bytes(4 * MiB)
    finally:
        os.close(fd)


# -- through real mounts ----------------------------------------------------------------------


def test_a_file_five_times_the_limit_streams_with_the_cache_under_it(mounts: Mounts, nginx: Server) -> None:
    data = big_bytes(512 * MiB, seed=1901)
    url = nginx.put("evict/big.bin", data)
    m = mounts.mount([url], "--cache-max-size", "100M")
    with Sampler(m.cache_dir) as sampler:
        assert sha256_of(m.path / "big.bin") == hashlib.sha256(data).hexdigest()
    assert sampler.peak <= 132 * MiB, f"the cache reached {sampler.peak / MiB:.1f} MiB"
    assert allocated_bytes(m.cache_dir) <= 100 * MiB + 32 * MiB
    assert 0 < cached_bytes(m.path / "big.bin") <= 100 * MiB
    assert m.unmount().returncode == 0
    # Evicted ranges come back from the server, byte-exact, after a remount.
    mounts.remount(m, "--cache-max-size", "100M")
    assert sha256_of(m.path / "big.bin") == hashlib.sha256(data).hexdigest()
    assert recorded_blocks_correct(m.cache_dir, {url: data}) > 0


def test_a_limit_smaller_than_the_prefetch_window_still_streams_every_byte(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(96 * MiB, seed=1905)
    url = nginx.put("evict/tiny.bin", data)
    m = mounts.mount([url], "--cache-max-size", "4M")
    mark = nginx.mark()
    with Sampler(m.cache_dir) as sampler:
        assert sha256_of(m.path / "tiny.bin") == hashlib.sha256(data).hexdigest()
    # Over the limit: what is in flight (the prefetch window, 32 MiB, in requests of 16 MiB that
    # stay claimed until they end); prefetches wait while eviction lags behind (Evictor.full).
    assert sampler.peak <= 4 * MiB + 32 * MiB, f"the cache reached {sampler.peak / MiB:.1f} MiB"
    # Prefetched blocks may go before they are read, and come again: bounded, not a loop.
    sent = nginx.bytes_sent("evict/tiny.bin", since=mark)
    assert sent < 4 * len(data), f"{sent / MiB:.0f} MiB fetched for a {len(data) / MiB:.0f} MiB file"


def test_the_least_recently_read_file_goes_first(mounts: Mounts, nginx: Server) -> None:
    files = {name: seeded_bytes(24 * MiB, seed=1910 + i) for i, name in enumerate("abc")}
    urls = [nginx.put(f"evict/lru-{name}.bin", data) for name, data in files.items()]
    # No passthrough: a file read through it is never evicted, whatever its last use.
    m = mounts.mount(urls, "--cache-max-size", "100M", "--no-passthrough")

    def read(name: str) -> None:
        with open(m.path / f"lru-{name}.bin", "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the reads must reach the daemon
            assert f.read() == files[name]

    read("a")
    read("b")
    time.sleep(1.1)  # use times a clock tick apart
    read("a")
    assert cached_bytes(m.path / "lru-b.bin") == 24 * MiB
    read("c")  # past what the limit leaves (the limit less room for fetches in flight): B goes first
    assert wait_until(lambda: cached_bytes(m.path / "lru-b.bin") < 24 * MiB, timeout=20)  # a round ran
    assert allocated_bytes(m.cache_dir) <= 100 * MiB
    assert cached_bytes(m.path / "lru-a.bin") == 24 * MiB, "the most recently read file lost data"
    assert cached_bytes(m.path / "lru-c.bin") == 24 * MiB
    assert cached_bytes(m.path / "lru-b.bin") < 24 * MiB


def test_a_passthrough_file_is_never_evicted_even_once_only_a_mapping_reads_it(mounts: Mounts, nginx: Server) -> None:
    kept = seeded_bytes(48 * MiB, seed=1920)
    other = seeded_bytes(160 * MiB, seed=1921)
    url_kept, url_other = nginx.put("evict/pt.bin", kept), nginx.put("evict/pt-other.bin", other)
    m = mounts.mount([url_kept, url_other], "--cache-max-size", "100M")
    assert (m.path / "pt.bin").read_bytes() == kept  # complete, checked; its last close flushes it
    assert wait_until(lambda: int(os.getxattr(m.path / "pt.bin", "user.rangefs.saved_bytes")) == len(kept))
    f = open(m.path / "pt.bin", "rb")
    try:
        if int(os.getxattr(m.path / "pt.bin", "user.rangefs.passthrough_handles")) < 1:
            pytest.fail("no passthrough on this kernel: the guarantee cannot be shown here")
        mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    finally:
        f.close()
    try:
        # The file is closed; the mapping still reads the data file itself (this kernel counts its
        # handle until munmap; the next test covers a kernel that does not).
        assert sha256_of(m.path / "pt-other.bin") == hashlib.sha256(other).hexdigest()
        assert cached_bytes(m.path / "pt-other.bin") < len(other)  # eviction ran
        assert cached_bytes(m.path / "pt.bin") == len(kept)
        mapping.madvise(mmap.MADV_DONTNEED)  # the next touch reads the data file again
        assert mapping[:] == kept
    finally:
        mapping.close()


def test_a_kill_9_in_the_middle_of_eviction_leaves_every_recorded_block_correct(
    mounts: Mounts, nginx: Server
) -> None:
    data = big_bytes(400 * MiB, seed=1930)
    url = nginx.put("evict/kill.bin", data)
    m = mounts.mount([url], "--cache-max-size", "40M")
    processes = [m.pid(), *children(m.pid())]
    reader = subprocess.Popen(["dd", f"if={m.path / 'kill.bin'}", "of=/dev/null", "bs=1M"],
                              stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: nginx.bytes_sent("evict/kill.bin") >= 150 * MiB, timeout=120)
        for pid in processes:
            os.kill(pid, signal.SIGKILL)
        for pid in processes:
            assert wait_until(lambda pid=pid: not alive(pid), timeout=10)
    finally:
        reader.kill()
        reader.wait(timeout=30)
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True, timeout=30)
    assert recorded_blocks_correct(m.cache_dir, {url: data}) > 0
    mounts.remount(m, "--cache-max-size", "40M")
    assert sha256_of(m.path / "kill.bin") == hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def small_tmpfs(mounts: Mounts, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` for the cache; the mounts are cleaned up before it is unmounted."""
    where = mounts.tmp / "floor"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True, timeout=30)
    try:
        yield where
    finally:
        mounts.cleanup()
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def test_the_free_space_floor_holds_on_a_small_filesystem(mounts: Mounts, nginx: Server) -> None:
    data = big_bytes(300 * MiB, seed=1940)
    url = nginx.put("evict/floor.bin", data)
    with small_tmpfs(mounts, "200M") as fs_dir:
        m = mounts.mount([url], "--cache-min-free", "120M", cache_dir=fs_dir / "cache")
        low = [10**12]

        def sample() -> None:
            while not done.is_set():
                st = os.statvfs(fs_dir)
                low[0] = min(low[0], st.f_bavail * st.f_frsize)
                time.sleep(0.05)

        done = threading.Event()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            assert sha256_of(m.path / "floor.bin") == hashlib.sha256(data).hexdigest()
        finally:
            done.set()
            sampler.join(timeout=10)
        assert low[0] >= 120 * MiB - 32 * MiB, f"free space fell to {low[0] / MiB:.1f} MiB"
        assert wait_until(lambda: os.statvfs(fs_dir).f_bavail * os.statvfs(fs_dir).f_frsize >= 120 * MiB,
                          timeout=10)


# -- against an in-memory origin: what is evicted, and in which order ---------------------------

BLOCK = 64 * 1024
PER_CHUNK = CHUNK_BYTES // BLOCK
DATA = os.urandom(4 * CHUNK_BYTES + 1234)  # four whole chunks and a short one
URL = "http://origin.test/e.bin"


def with_file(tmp_path: Path, body: Callable[[Cache, CachedFile, FakeOrigin], Awaitable[None]]) -> None:
    """Run ``body`` against an opened CachedFile of DATA that has been read whole once."""
    fake = FakeOrigin(DATA)

    async def run() -> None:
        Cache.prepare(tmp_path)
        async with Origin(transport=fake.transport()) as origin:
            cache = Cache(CacheConfig(tmp_path, block_size=BLOCK), Fetcher(origin, BLOCK))
            cached = cache.file(URL, await origin.probe(URL))
            await cached.acquire()
            try:
                assert bytes(await cached.read(0, len(DATA))) == DATA
                await body(cache, cached, fake)
            finally:
                await cached.release()

    trio.run(run)


def recorded(cached: CachedFile) -> Bitmap:
    return state.read(cached.state_path).bitmap


@pytest.fixture
def punched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, Bitmap]]:
    """Every hole punched: ``(offset, length, the state on disk at that moment)``, taken just before."""
    import rangefs.evict as evict_module

    holes: list[tuple[int, int, Bitmap]] = []
    real = evict_module.punch

    def spy(fd: int, offset: int, length: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}")).with_suffix(".state")
        holes.append((offset, length, state.read(path).bitmap))
        real(fd, offset, length)

    monkeypatch.setattr(evict_module, "punch", spy)
    return holes


def test_the_state_on_disk_no_longer_records_a_block_when_its_hole_is_punched(
    tmp_path: Path, punched: list[tuple[int, int, Bitmap]]
) -> None:
    async def body(cache: Cache, cached: CachedFile, fake: FakeOrigin) -> None:
        await cached.checkpoint()
        assert len(recorded(cached)) == cached.identity.nblocks
        assert await cache.evictor.evict(2 * CHUNK_BYTES) >= 2 * CHUNK_BYTES
        assert punched
        for offset, length, on_disk in punched:
            blocks = range(offset // BLOCK, -(-(offset + length) // BLOCK))
            assert not any(b in on_disk for b in blocks), "a punched block was still recorded"
        fetched = len(fake.requests)
        assert bytes(await cached.read(0, len(DATA))) == DATA  # the evicted ranges come back
        assert len(fake.requests) > fetched

    with_file(tmp_path, body)


def test_blocks_being_read_in_flight_or_passed_through_are_never_evicted(
    tmp_path: Path, punched: list[tuple[int, int, Bitmap]]
) -> None:
    async def body(cache: Cache, cached: CachedFile, fake: FakeOrigin) -> None:
        claimed = cached.flights.claim(list(range(PER_CHUNK, 2 * PER_CHUNK)), cached.generation)
        with cached.reading.hold(0, 1):  # a read of chunk 0 in progress
            await cache.evictor.evict(len(DATA))
        for flight in claimed:
            cached.flights.finish(flight, None)
        bitmap = cached.open_bitmap()
        assert all(b in bitmap for b in range(0, 2 * PER_CHUNK)), "a block read or in flight was evicted"
        assert not any(b in bitmap for b in range(2 * PER_CHUNK, cached.identity.nblocks))
        holes = {offset // CHUNK_BYTES for offset, _, _ in punched}
        assert holes.isdisjoint({0, 1})
        assert bytes(await cached.read(0, len(DATA))) == DATA
        cached.passthrough_opened()
        try:
            assert await cache.evictor.evict(len(DATA)) == 0
        finally:
            cached.passthrough_closed()
        # Its handles are closed, but a mapping made through one may still read the data file.
        assert await cache.evictor.evict(len(DATA)) == 0
        assert cached.cached_bytes() == len(DATA)

    with_file(tmp_path, body)


def test_a_read_past_its_check_keeps_its_blocks_until_it_returns(tmp_path: Path) -> None:
    """A read whose blocks are present goes on to read them from the data file: an eviction
    meanwhile must not punch them under it."""

    async def body(cache: Cache, cached: CachedFile, fake: FakeOrigin) -> None:
        reading, evicted = trio.Event(), trio.Event()
        real = cached.data.pread

        async def slow_pread(size: int, offset: int) -> bytes | bytearray:
            reading.set()
            await evicted.wait()
            return await real(size, offset)

        cached.data.pread = slow_pread  # type: ignore[method-assign]
        got: list[bytes] = []

        async def read() -> None:
            got.append(bytes(await cached.read(CHUNK_BYTES, CHUNK_BYTES)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await reading.wait()
            await cache.evictor.evict(len(DATA))
            evicted.set()
        cached.data.pread = real  # type: ignore[method-assign]
        assert got == [DATA[CHUNK_BYTES : 2 * CHUNK_BYTES]]
        assert cached.cached_bytes() < len(DATA)  # the other chunks went

    with_file(tmp_path, body)


def test_a_closed_file_is_evicted_state_first_and_removed_whole_when_nothing_is_left(
    tmp_path: Path, punched: list[tuple[int, int, Bitmap]]
) -> None:
    fake = FakeOrigin(DATA)

    async def run() -> None:
        Cache.prepare(tmp_path)
        async with Origin(transport=fake.transport()) as origin:
            cache = Cache(CacheConfig(tmp_path, block_size=BLOCK), Fetcher(origin, BLOCK))
            cached = cache.file(URL, await origin.probe(URL))
            await cached.acquire()
            assert bytes(await cached.read(0, len(DATA))) == DATA
            await cached.release()  # closed: evicted from its files on disk, under their flock
            assert cached.data.fd < 0
            held = os.open(cached.data_path, os.O_RDONLY)  # as another rangefs process holds it
            try:
                fcntl.flock(held, fcntl.LOCK_EX)
                assert await cache.evictor.evict(len(DATA)) == 0
            finally:
                os.close(held)
            assert await cache.evictor.evict(CHUNK_BYTES) >= CHUNK_BYTES
            assert punched
            for offset, length, on_disk in punched:
                assert not any(b in on_disk for b in range(offset // BLOCK, -(-(offset + length) // BLOCK)))
            assert 0 < cached.cached_bytes() < len(DATA)  # read again from the state file
            await cache.evictor.evict(len(DATA))
            assert not list((tmp_path / "files").iterdir()), "a file with nothing left is removed whole"
            await cached.acquire()
            try:
                assert bytes(await cached.read(0, len(DATA))) == DATA
            finally:
                await cached.release()

    trio.run(run)


def test_a_closed_file_once_passed_through_is_not_evicted(tmp_path: Path) -> None:
    fake = FakeOrigin(DATA)

    async def run() -> None:
        Cache.prepare(tmp_path)
        async with Origin(transport=fake.transport()) as origin:
            cache = Cache(CacheConfig(tmp_path, block_size=BLOCK), Fetcher(origin, BLOCK))
            cached = cache.file(URL, await origin.probe(URL))
            await cached.acquire()
            assert bytes(await cached.read(0, len(DATA))) == DATA
            cached.passthrough_opened()  # a mapping made through it may outlive every handle
            cached.passthrough_closed()
            await cached.release()
            assert await cache.evictor.evict(len(DATA)) == 0
            assert cached.cached_bytes() == len(DATA)

    trio.run(run)


def test_planted_links_and_stray_files_are_handled_without_touching_anything_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious" * 100_000)
    cache_dir = tmp_path / "cache"
    Cache.prepare(cache_dir)
    files = cache_dir / "files"
    (files / ("a" * 32 + ".data")).symlink_to(outside)  # a planted link as a data file
    (files / ("a" * 32 + ".state")).symlink_to(outside)
    (files / ("b" * 32 + ".state")).write_bytes(b"a state whose data file was removed")

    async def run() -> None:
        async with Origin(transport=FakeOrigin(DATA).transport()) as origin:
            cache = Cache(CacheConfig(cache_dir, block_size=BLOCK), Fetcher(origin, BLOCK))
            await cache.evictor.evict(10 * MiB)

    trio.run(run)
    assert outside.read_bytes() == b"precious" * 100_000
    assert not list(files.iterdir())


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC, errno.EOPNOTSUPP])
def test_a_failing_punch_is_logged_once_and_every_read_stays_correct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, err: int
) -> None:
    import rangefs.evict as evict_module

    def failing(fd: int, offset: int, length: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(evict_module, "punch", failing)

    async def body(cache: Cache, cached: CachedFile, fake: FakeOrigin) -> None:
        for _ in range(3):
            assert await cache.evictor.evict(CHUNK_BYTES) == 0
            assert bytes(await cached.read(0, len(DATA))) == DATA

    with_file(tmp_path, body)
    warnings = [r for r in caplog.records if "cannot free cache space" in r.getMessage()]
    assert len(warnings) == 1


def test_after_a_remount_files_go_in_the_order_of_their_persisted_last_use(tmp_path: Path) -> None:
    fake = FakeOrigin(DATA)
    url_old, url_new = "http://origin.test/old.bin", "http://origin.test/new.bin"

    async def run() -> None:
        Cache.prepare(tmp_path)
        async with Origin(transport=fake.transport()) as origin:
            first = Cache(CacheConfig(tmp_path, block_size=BLOCK), Fetcher(origin, BLOCK))
            for url in (url_old, url_new):
                cached = first.file(url, await origin.probe(url))
                await cached.acquire()
                assert bytes(await cached.read(0, len(DATA))) == DATA
                await cached.release()
            now = time.time()
            for url, age in ((url_old, 1000), (url_new, 10)):
                cached = first.file(url, await origin.probe(url))
                for path in (cached.data_path, cached.state_path):
                    os.utime(path, (now - age, now - age))
            # A new mount: nothing tracked in memory; the files' mtimes order them.
            second = Cache(CacheConfig(tmp_path, block_size=BLOCK), Fetcher(origin, BLOCK))
            old = second.file(url_old, await origin.probe(url_old))
            new = second.file(url_new, await origin.probe(url_new))
            assert await second.evictor.evict(CHUNK_BYTES) >= CHUNK_BYTES
            assert old.cached_bytes() < len(DATA)
            assert new.cached_bytes() == len(DATA)

    trio.run(run)


def test_a_read_moves_the_files_persisted_last_use_forward(tmp_path: Path) -> None:
    async def body(cache: Cache, cached: CachedFile, fake: FakeOrigin) -> None:
        long_ago = time.time() - 10_000
        os.utime(cached.state_path, (long_ago, long_ago))
        cache.evictor._used_keys[cached.key] = time.time() - 60  # read a minute ago, not yet persisted
        await cache.evictor._touch_used()
        assert os.stat(cached.state_path).st_mtime > time.time() - 10

    with_file(tmp_path, body)
