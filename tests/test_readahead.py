"""The readahead follows its reader: the window grows with the reader's sustained consumption,
and what a reader abandons (it jumped far away, or closed the file) stops being fetched.

The policy (rangefs.prefetch.Readahead) with a fake clock, then real mounts against the test
nginx (its access log gives the ranges asked for and the bytes sent) and the fault server (whose
hanging GETs show when rangefs gives a fetch up). Reads go through ``--direct-io`` mounts, so the
kernel's own readahead neither adds reads nor paces them. Behaviour only: no timing is asserted.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultserver import FaultServer, RequestRecord

from rangefs.prefetch import RATE_INTERVAL, Readahead, ahead

from util import Mounts, Server, seeded_bytes, wait_until

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
INITIAL, MAXIMUM, TOLERANCE = 512 * 1024, 32 * MiB, MiB  # CacheConfig's defaults


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(clock: Clock) -> Readahead:
    return Readahead(INITIAL, MAXIMUM, TOLERANCE, clock=clock)


def read_at_rate(ra: Readahead, clock: Clock, size: int, every: float, total: int, start: int = 0) -> list[int]:
    """Sequential reads of ``size`` bytes, one each ``every`` seconds; the window after each."""
    windows = []
    for offset in range(start, start + total, size):
        ra.advise(offset, size)
        windows.append(ra.window)
        clock.now += every
    return windows


# -- the policy -------------------------------------------------------------------------------


def test_a_slow_readers_window_is_about_a_second_of_its_rate() -> None:
    clock = Clock()
    ra = policy(clock)
    windows = read_at_rate(ra, clock, 256 * 1024, 0.05, 128 * MiB)  # 5 MiB/s for 25 s
    assert max(windows) <= 6 * MiB  # the bytes alone would have allowed the 32 MiB maximum
    assert windows[-1] >= 4 * MiB  # and it is not starved: about one second of its reads


def test_a_fast_readers_window_grows_by_bytes_as_before_to_the_maximum() -> None:
    clock = Clock()
    ra = policy(clock)
    windows = read_at_rate(ra, clock, MiB, 0.001, 80 * MiB)  # 1 GiB/s
    consumed = [(i + 1) * MiB for i in range(len(windows))]
    # The rule by bytes alone, from the second read on (the first starts the stretch).
    assert windows[1:] == [min(MAXIMUM, max(INITIAL, c // 2)) for c in consumed[1:]]
    assert windows[-1] == MAXIMUM


def test_the_window_shrinks_when_the_reader_slows_down_and_grows_back_when_it_speeds_up() -> None:
    clock = Clock()
    ra = policy(clock)
    read_at_rate(ra, clock, MiB, 0.001, 80 * MiB)
    assert ra.window == MAXIMUM
    slow = read_at_rate(ra, clock, 128 * 1024, 0.1, 8 * MiB, start=80 * MiB)  # 1.25 MiB/s
    assert slow[-1] <= 2 * MiB
    fast = read_at_rate(ra, clock, MiB, 0.001, 200 * MiB, start=88 * MiB)
    assert fast[-1] == MAXIMUM


def test_a_pause_then_a_fast_reader_regrows_its_window_within_a_fraction_of_a_second() -> None:
    clock = Clock()
    ra = policy(clock)
    read_at_rate(ra, clock, MiB, 0.001, 80 * MiB)
    clock.now += 30.0  # paused
    windows = read_at_rate(ra, clock, MiB, 0.001, 100 * MiB, start=80 * MiB)  # 0.1 s of reads
    assert windows[0] <= 4 * MiB  # what it read before the pause says nothing of its rate now
    assert windows[-1] == MAXIMUM


def test_a_burst_at_the_start_of_a_stretch_is_bounded_by_bytes_not_rate() -> None:
    clock = Clock()
    ra = policy(clock)
    windows = read_at_rate(ra, clock, MiB, 0.0, 8 * MiB)  # all at once: rate infinite
    assert windows[-1] == 4 * MiB


def test_the_first_burst_of_a_stretch_leaves_its_rate() -> None:
    """A player's first reads after a seek come at once (the decoder's buffer, the kernel's first
    readahead); then it reads at its pace. Over a short stretch that burst counted doubled its rate."""
    clock = Clock()
    ra = policy(clock)
    read_at_rate(ra, clock, 64 * 1024, 0.0, 2 * MiB)  # the burst
    windows = read_at_rate(ra, clock, 64 * 1024, 1 / 16, 2 * MiB, start=2 * MiB)  # then 1 MiB/s for 2 s
    assert windows[-1] <= 1.25 * MiB  # about a second of 1 MiB/s; 2 MiB with the burst counted


def test_a_page_cache_handles_window_counts_from_the_reader_not_from_the_kernels_reads() -> None:
    """The kernel's reads of a page-cache handle run ``lead`` ahead of the reader; the window
    reaches that much less past them."""
    clock = Clock()
    ra = policy(clock)
    ra.lead = MiB
    read_at_rate(ra, clock, 256 * 1024, 0.05, 16 * MiB)  # 5 MiB/s
    end = 16 * MiB + 256 * 1024
    assert ra.advise(16 * MiB, 256 * 1024) == end + ra.window - MiB


def test_a_starving_readers_window_is_all_it_consumed_with_no_rate_bound_nor_lead() -> None:
    """Its rate is the network's: bounded by it, the window of a reader behind connections that
    are each capped would never grow enough to be cut into more of them."""
    clock = Clock()
    ra = policy(clock)
    ra.lead = MiB
    read_at_rate(ra, clock, 256 * 1024, 0.1, 8 * MiB)  # 2.5 MiB/s, the network's pace
    assert ra.window <= 3 * MiB  # not starved: about a second of it
    end = 8 * MiB + 256 * 1024
    assert ra.advise(8 * MiB, 256 * 1024, starved=True) == end + ra.consumed
    assert ra.window == ra.reach == ra.consumed


def test_a_jump_starts_a_new_stretch_without_a_window() -> None:
    clock = Clock()
    ra = policy(clock)
    read_at_rate(ra, clock, MiB, 0.001, 8 * MiB)
    stretch = ra.stretch
    assert ahead(ra, 500 * MiB, 500 * MiB + 4096, 1 << 40) is None
    assert ra.stretch == stretch + 1 and ra.window == 0
    clock.now += RATE_INTERVAL * 2
    assert ahead(ra, 500 * MiB + 4096, 500 * MiB + 8192, 1 << 40) == (500 * MiB + 8192, 500 * MiB + 8192 + INITIAL)


# -- through the mount -------------------------------------------------------------------------


def requested(nginx: Server, rel: str, since: int) -> list[tuple[int, int, int]]:
    """(first byte, bytes asked for, bytes sent) of each ranged GET of ``rel`` since ``since``."""
    out = []
    for r in nginx.nginx.requests(since):
        if r.method == "GET" and r.path == "/" + rel and r.range.startswith("bytes="):
            first, last = (int(x) for x in r.range[len("bytes="):].split("-"))
            out.append((first, last + 1 - first, r.body_bytes))
    return out


def test_a_slow_readers_requests_stay_close_to_what_it_read(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(64 * MiB, seed=181)
    m = mounts.mount([nginx.put("readahead/slow.bin", data)], "--direct-io")
    since = nginx.mark()
    read, size = 32 * MiB, 256 * 1024
    fd = os.open(m.path / "slow.bin", os.O_RDONLY)
    try:
        for offset in range(0, read, size):
            assert os.pread(fd, size, offset) == data[offset : offset + size], f"wrong bytes at {offset}"
            time.sleep(0.05)  # at most 5 MiB/s: a slower machine reads slower still, never faster
    finally:
        os.close(fd)
    asked = sum(length for _, length, _ in requested(nginx, "readahead/slow.bin", since))
    # By bytes alone the window is half of what was read: 16 MiB here. By its rate about 5 MiB.
    assert asked <= read + 8 * MiB, f"asked for {asked / MiB:.1f} MiB to read {read / MiB:.0f} MiB"


def test_a_fast_readers_requests_still_grow_to_the_longest(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(96 * MiB, seed=182)
    m = mounts.mount([nginx.put("readahead/fast.bin", data)], "--direct-io")
    since = nginx.mark()
    with open(m.path / "fast.bin", "rb", buffering=0) as f:
        offset = 0
        while chunk := f.read(MiB):
            assert chunk == data[offset : offset + len(chunk)], f"wrong bytes at {offset}"
            offset += len(chunk)
    assert offset == len(data)
    longest = max(length for _, length, _ in requested(nginx, "readahead/fast.bin", since))
    # Pieces of half the full 32 MiB window, up to the 16 MiB limit, less what is already fetched
    # (15 MiB here, as before the rate bound): the window reached its maximum.
    assert longest >= 15 * MiB, f"the longest request asked for {longest / MiB:.1f} MiB"


def hung(server: FaultServer) -> list[RequestRecord]:
    """The GETs left hanging (not those merely not answered yet)."""
    return [r for r in server.requests if r.method == "GET" and not r.status
            and int((r.header("Range") or "bytes=0-").split("=")[1].split("-")[0]) >= HANG]


HANG = 8 * MiB  # GETs of ranges starting there or later hang until given up; reads below it do not


@contextmanager
def prefetches_hanging(mounts: Mounts, server: FaultServer, name: str, size: int, seed: int) -> Iterator[Jump]:
    """A handle of a --direct-io mount that read sequentially until a prefetch of it hangs; then
    the server answers again (the stuck GETs stay stuck). Closed on exit."""
    data = seeded_bytes(size, seed=seed)
    server.put("/" + name, data, hang_from=HANG)
    m = mounts.mount([server.url("/" + name)], "--direct-io")
    fd = os.open(m.path / name, os.O_RDONLY)
    try:
        for offset in range(0, HANG, 64 * 1024):
            assert os.pread(fd, 64 * 1024, offset) == data[offset : offset + 64 * 1024], f"wrong bytes at {offset}"
            if hung(server):
                break
        assert wait_until(lambda: bool(hung(server)), timeout=10), "no prefetch reached the hanging part"
        stuck = hung(server)
        server.set_faults("/" + name)
        yield Jump(m.path / name, fd, data, stuck)
    finally:
        os.close(fd)


@dataclass
class Jump:
    path: Path
    fd: int
    data: bytes
    stuck: list[RequestRecord]

    def read(self, offset: int) -> None:
        assert os.pread(self.fd, 64 * 1024, offset) == self.data[offset : offset + 64 * 1024], \
            f"wrong bytes at {offset}"

    def given_up(self) -> bool:
        return all(r.closed_at is not None for r in self.stuck)


def test_a_far_jump_gives_up_the_handles_prefetches_at_the_old_place(mounts: Mounts, server: FaultServer) -> None:
    with prefetches_hanging(mounts, server, "far.bin", 128 * MiB, seed=183) as jump:
        jump.read(100 * MiB)  # the file stays open
        assert wait_until(jump.given_up, timeout=10), "the prefetches at the old place still run after the jump"
        jump.read(100 * MiB + 64 * 1024)
        unused = int(os.getxattr(jump.path, "user.rangefs.prefetch_unused_bytes"))
        assert 0 <= unused <= HANG  # only what arrived, ahead of the reader, counts


def test_a_near_jump_keeps_the_prefetches_ahead(mounts: Mounts, server: FaultServer) -> None:
    with prefetches_hanging(mounts, server, "near.bin", 64 * MiB, seed=184) as jump:
        jump.read(20 * MiB)  # a skip past the window: not sequential, but within a full window of it
        time.sleep(1.0)  # a give-up would have reached the server by then (the jump's read did it)
        assert not any(r.closed_at is not None for r in jump.stuck), "a near jump gave up the prefetches ahead"
    assert wait_until(jump.given_up, timeout=10), "the close did not give them up"


def test_a_close_mid_stream_leaves_no_fetch_running_and_counts_what_was_not_read(
    mounts: Mounts, nginx: Server
) -> None:
    data = seeded_bytes(128 * MiB, seed=185)
    nginx.put("readahead/close.bin", data)
    m = mounts.mount([nginx.url("slow/readahead/close.bin") + " close.bin"])  # 4 MB/s per connection
    path = m.path / "close.bin"
    with open(path, "rb") as f:  # through the kernel's page cache and its readahead
        got = f.read(8 * MiB)
        assert len(got) == 8 * MiB and got == data[: len(got)]
    # nginx logs each request at its end: once the log is quiet, what ran at the close has ended.
    assert wait_until(lambda: quiet(nginx, 1.0), timeout=30, interval=0), "fetches still run after the close"
    after = nginx.mark()
    time.sleep(2.0)
    assert not [r for r in nginx.nginx.requests(after) if r.path == "/slow/readahead/close.bin"], \
        "a fetch was asked for after the close"
    sent = nginx.bytes_sent("slow/readahead/close.bin")
    assert sent < 64 * MiB, f"{sent / MiB:.0f} MiB sent for 8 MiB read"
    unused = int(os.getxattr(path, "user.rangefs.prefetch_unused_bytes"))
    assert 0 <= unused <= sent


def quiet(nginx: Server, seconds: float) -> bool:
    """Whether no request ended during the next ``seconds``."""
    before = len(nginx.nginx.requests())
    time.sleep(seconds)
    return len(nginx.nginx.requests()) == before


# -- the kernel's readahead ----------------------------------------------------------------------
# rangefs answers every read the kernel asks for, and the kernel's readahead grows on any
# sequential stretch up to the mount's read_ahead_kb, however slowly the reader reads. These
# tests read through the page cache (no --direct-io) as players and decoders do, in ffmpeg's
# 32 KiB reads, and count what nginx sent.

FFMPEG_READ = 32 * 1024


def read_stretch(fd: int, data: bytes, offset: int, length: int, pause: float = 0.0) -> None:
    os.lseek(fd, offset, os.SEEK_SET)
    for at in range(offset, offset + length, FFMPEG_READ):
        assert os.read(fd, FFMPEG_READ) == data[at : at + FFMPEG_READ], f"wrong bytes at {at}"
        if pause:
            time.sleep(pause)


def sent_after_settling(nginx: Server, rel: str, since: int) -> int:
    assert wait_until(lambda: quiet(nginx, 0.5), timeout=30), "requests still ending 30 s after the reader closed"
    return sum(sent for _, _, sent in requested(nginx, rel, since))


@pytest.fixture(scope="module")
def movie(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """40 s of 6 Mbit/s video with sound, its index at the end (no +faststart), about 30 MB: the
    noise keeps the encoder at its bitrate."""
    path = tmp_path_factory.mktemp("movie") / "movie.mp4"
    command = [
        "ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=duration=40:size=640x360:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=40", "-vf", "noise=alls=30:allf=t",
        "-c:v", "mpeg4", "-b:v", "6M", "-maxrate", "6M", "-bufsize", "4M", "-c:a", "aac", "-shortest", str(path),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return path.read_bytes()


def ffmpeg_read(*args: str) -> int:
    """Run ffmpeg to the null muxer; the bytes it read (rchar, taken after it exited and before it
    is reaped, so every read counts; about 0.2 MB of it is not the movie: /proc, configuration)."""
    proc = subprocess.Popen(["ffmpeg", "-nostdin", "-v", "error", *args, "-f", "null", "-"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        io = dict(line.split(": ") for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines())
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")
    return int(io["rchar"])


def test_a_decoders_seek_fetches_at_most_twice_what_it_read(mounts: Mounts, nginx: Server, movie: bytes) -> None:
    """ffmpeg -ss 20 -t 5 on a cold moov-at-end MP4: the index at the end, then five seconds."""
    m = mounts.mount([nginx.put("readahead/seek.mp4", movie)])
    since = nginx.mark()
    read = ffmpeg_read("-ss", "20", "-i", str(m.path / "seek.mp4"), "-t", "5")
    sent = sent_after_settling(nginx, "readahead/seek.mp4", since)
    # With the kernel's readahead at 16 MiB, 2.6x.
    assert sent <= 2 * read, f"nginx sent {sent / MiB:.1f} MiB for {read / MiB:.1f} MiB read"


def test_a_player_playing_at_three_places_fetches_at_most_twice_what_it_read(
    mounts: Mounts, nginx: Server, movie: bytes
) -> None:
    """ffmpeg -re (at the pace of playback) for two seconds at each of three places, one process
    each, as a player that is told to jump."""
    m = mounts.mount([nginx.put("readahead/play.mp4", movie)])
    since = nginx.mark()
    read = sum(ffmpeg_read("-re", "-ss", str(at), "-i", str(m.path / "play.mp4"), "-t", "2") for at in (5, 30, 15))
    sent = sent_after_settling(nginx, "readahead/play.mp4", since)
    assert sent <= 2 * read, f"nginx sent {sent / MiB:.1f} MiB for {read / MiB:.1f} MiB read"


def test_a_player_jumping_and_playing_fetches_at_most_twice_what_it_read(mounts: Mounts, nginx: Server) -> None:
    """Three places played for two seconds each at 1.6 MB/s, one open, as a player seeks."""
    data = seeded_bytes(128 * MiB, seed=184)
    m = mounts.mount([nginx.put("readahead/player.bin", data)])
    since = nginx.mark()
    fd = os.open(m.path / "player.bin", os.O_RDONLY)
    try:
        for place in (10 * MiB, 70 * MiB, 30 * MiB):
            read_stretch(fd, data, place, 3 * MiB, pause=0.02)
    finally:
        os.close(fd)
    read = 9 * MiB
    sent = sent_after_settling(nginx, "readahead/player.bin", since)
    assert sent <= 2 * read, f"nginx sent {sent / MiB:.1f} MiB for {read / MiB:.0f} MiB read"
