"""End to end: a real rangefs mount of files served by a real nginx, read with real tools."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rangefs import state
from rangefs.cache import DEFAULT_BLOCK_SIZE, cache_key
from rangefs.mount import daemon_pid

from proxy import ThrottleProxy
from util import RANGEFS, Mount, Mounts, Server, alive, children, fstype, run_rangefs, seeded_bytes, wait_until

BLOCK = DEFAULT_BLOCK_SIZE
MiB = 1 << 20


def gets(server: Server, rel: str, since: int) -> list[object]:
    return [r for r in server.nginx.requests(since) if r.method == "GET" and r.path == "/" + rel]


def sh(*args: str | os.PathLike[str], input: bytes | None = None) -> bytes:
    done = subprocess.run([str(a) for a in args], capture_output=True, input=input, timeout=60)
    assert done.returncode == 0, f"{args[0]} failed: {done.stderr.decode(errors='replace')}"
    return done.stdout


def test_ls_stat_cp_cat_dd_sha256sum_give_the_servers_bytes(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    big = seeded_bytes(3 * MiB + 12345, seed=1)
    small = b"hello, rangefs\n"
    lines = [nginx.put("basic/big.bin", big), nginx.put("basic/small.txt", small)]
    m = mounts.mount(lines)

    listing = sh("ls", "-l", m.path).decode()
    assert "big.bin" in listing and "small.txt" in listing and "-r--r--r--" in listing
    st = os.stat(m.path / "big.bin")
    assert st.st_size == len(big)
    assert int(st.st_mtime) == int(os.stat(nginx.www / "basic/big.bin").st_mtime)  # from Last-Modified

    sh("cp", m.path / "big.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == big
    assert sh("cat", m.path / "small.txt") == small
    assert sh("sha256sum", m.path / "big.bin").split()[0].decode() == hashlib.sha256(big).hexdigest()
    part = sh("dd", f"if={m.path / 'big.bin'}", "bs=4096", "skip=300", "count=7", "status=none")
    assert part == big[300 * 4096 : 307 * 4096]


def test_tail_fetches_one_block_near_the_end(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(16 * MiB + 5000, seed=2)  # the last 1000 bytes lie in one block
    m = mounts.mount([nginx.put("tail/big.bin", data)])
    mark = nginx.mark()

    assert sh("tail", "-c", "1000", m.path / "big.bin") == data[-1000:]

    requests = gets(nginx, "tail/big.bin", mark)
    assert len(requests) == 1
    assert nginx.bytes_sent("tail/big.bin", since=mark) <= BLOCK


def test_random_preads_match_the_source(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(5 * MiB + 3, seed=3)
    m = mounts.mount([nginx.put("random/r.bin", data)])
    rng = random.Random(3)
    fd = os.open(m.path / "r.bin", os.O_RDONLY)
    try:
        for _ in range(300):
            offset = rng.randrange(0, len(data) + 100)
            size = rng.choice([1, 17, 4096, 65536, 300_000, 1_100_000])
            assert os.pread(fd, size, offset) == data[offset : offset + size], (offset, size)
    finally:
        os.close(fd)


def test_concurrent_readers_fetch_each_block_once(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(12 * MiB, seed=4)
    m = mounts.mount([nginx.put("concurrent/c.bin", data)])
    mark = nginx.mark()
    results: dict[int, bytes] = {}

    def read_all(index: int) -> None:
        fd = os.open(m.path / "c.bin", os.O_RDONLY)
        try:
            chunks, offset = [], 0
            step = [65536, 131072, 1 << 20, 4096][index]
            while chunk := os.pread(fd, step, offset):
                chunks.append(chunk)
                offset += len(chunk)
            results[index] = b"".join(chunks)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=read_all, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(result == data for result in results.values())
    assert nginx.bytes_sent("concurrent/c.bin", since=mark) == len(data)


def test_empty_file(mounts: Mounts, nginx: Server) -> None:
    m = mounts.mount([nginx.put("empty/e.bin", b"")])
    mark = nginx.mark()
    assert os.stat(m.path / "e.bin").st_size == 0
    assert sh("cat", m.path / "e.bin") == b""
    assert "e.bin" in sh("ls", "-ls", m.path).decode()  # stat after an open, with a cache state
    assert gets(nginx, "empty/e.bin", mark) == []
    assert m.unmount().returncode == 0
    mounts.remount(m)
    assert os.stat(m.path / "e.bin").st_size == 0 and sh("cat", m.path / "e.bin") == b""


def test_unicode_names_and_subdirectories(mounts: Mounts, nginx: Server) -> None:
    one = seeded_bytes(70_000, seed=5)
    two = seeded_bytes(300_000, seed=6)
    lines = [
        "# names: derived from the URL, and given explicitly with subdirectories",
        nginx.put("names/café déjà.bin", one),
        f"{nginx.put('names/plain.bin', two)}  deep/er/данные%20файл.bin",
    ]
    m = mounts.mount(lines)
    assert sorted(os.listdir(m.path)) == ["café déjà.bin", "deep"]
    assert os.listdir(m.path / "deep" / "er") == ["данные файл.bin"]
    assert (m.path / "café déjà.bin").read_bytes() == one
    assert (m.path / "deep/er/данные файл.bin").read_bytes() == two
    assert os.path.isdir(m.path / "deep") and not os.access(m.path / "deep", os.W_OK)


def test_remount_serves_cached_blocks_without_fetching(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    data = seeded_bytes(6 * MiB + 5, seed=7)
    m = mounts.mount([nginx.put("remount/r.bin", data)])
    sh("cp", m.path / "r.bin", tmp_path / "first.bin")
    assert m.unmount().returncode == 0
    assert not m.mounted()

    mark = nginx.mark()
    mounts.remount(m)
    sh("cp", m.path / "r.bin", tmp_path / "second.bin")
    assert (tmp_path / "second.bin").read_bytes() == data
    assert gets(nginx, "remount/r.bin", mark) == []  # only the revalidation HEAD
    assert nginx.bytes_sent("remount/r.bin", since=mark) == 0


def test_changed_file_is_not_served_from_the_old_cache(mounts: Mounts, nginx: Server) -> None:
    old = seeded_bytes(2 * MiB, seed=8)
    m = mounts.mount([nginx.put("changed/c.bin", old)])
    assert (m.path / "c.bin").read_bytes() == old
    assert m.unmount().returncode == 0

    new = seeded_bytes(2 * MiB + 100, seed=9)
    nginx.put("changed/c.bin", new)
    os.utime(nginx.www / "changed/c.bin", (1, 1))  # a different Last-Modified, hence ETag, even within a second
    mounts.remount(m)
    assert os.stat(m.path / "c.bin").st_size == len(new)
    assert (m.path / "c.bin").read_bytes() == new


def test_kill_9_mid_copy_then_resume_fetches_only_what_was_missing(
    mounts: Mounts, nginx: Server, tmp_path: Path, throttled: Callable[[float], ThrottleProxy]
) -> None:
    data = seeded_bytes(24 * MiB, seed=10)
    nginx.put("crash/k.bin", data)
    proxy = throttled(MiB)  # per connection: the copy takes seconds
    url = f"http://127.0.0.1:{proxy.port}/crash/k.bin"
    interval = 0.25
    margin = 4 * interval  # for a checkpoint to come round and finish (fdatasync), also on a slow disk
    # One connection: the copy goes at the proxy's pace (parallel ranges would multiply it).
    m = mounts.mount([url], "--checkpoint-interval", str(interval), "--max-connections", "1")
    state_path = m.cache_dir / "files" / f"{cache_key(url)}.state"
    first = tmp_path / "first.bin"
    copy = subprocess.Popen(["cp", str(m.path / "k.bin"), str(first)])
    progress: list[tuple[float, int]] = []  # (when, bytes cp had written)

    def copied(at_least: int) -> bool:
        progress.append((time.monotonic(), first.stat().st_size if first.exists() else 0))
        return progress[-1][1] >= at_least

    try:
        assert wait_until(lambda: copied(MiB), timeout=30, interval=0.02)
        wait_until(lambda: copied(len(data)), timeout=margin + 0.25, interval=0.02)  # record, then kill
        os.kill(m.pid(), signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(lambda: not alive(m.pid()), timeout=10)
    finally:
        copy.kill()
        copy.wait(timeout=30)
    saved = state.load(state_path)[1]
    persisted = len(saved) * BLOCK
    assert persisted < len(data), "the copy finished before the kill; nothing to resume"
    # What cp had written by some moment had reached the cache before it; a checkpoint interval
    # later (plus the checkpoint's own time) every block of it must have been durable. (Bounding
    # by a rate instead assumed how many fetches run at once through the throttle.)
    durable_by_then = max((size for when, size in progress if when <= killed - margin), default=0)
    assert durable_by_then >= MiB, "killed too early to tell"
    assert all(block in saved for block in range(durable_by_then // BLOCK))

    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True, timeout=30)
    mark = nginx.mark()
    mounts.remount(m)
    sh("cp", m.path / "k.bin", tmp_path / "second.bin")
    assert (tmp_path / "second.bin").read_bytes() == data
    assert nginx.bytes_sent("crash/k.bin", since=mark) == len(data) - persisted


def test_a_fetch_process_killed_mid_fetch_costs_the_reader_nothing(
    mounts: Mounts, nginx: Server, tmp_path: Path, throttled: Callable[[float], ThrottleProxy]
) -> None:
    data = seeded_bytes(12 * MiB, seed=43)
    nginx.put("crash/h.bin", data)
    proxy = throttled(4 * MiB)  # the copy takes seconds: the helper's prefetches are in flight
    m = mounts.mount([f"http://127.0.0.1:{proxy.port}/crash/h.bin"], "--max-connections", "1")  # at the proxy's pace
    out = tmp_path / "h.bin"
    copy = subprocess.Popen(["cp", str(m.path / "h.bin"), str(out)], stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: out.exists() and out.stat().st_size >= 2 * MiB, timeout=30)
        helper = children(m.pid())
        assert len(helper) == 1
        os.kill(helper[0], signal.SIGKILL)
        assert copy.wait(timeout=60) == 0, copy.stderr.read() if copy.stderr else ""
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait(timeout=30)
    assert out.read_bytes() == data
    mounts.pids.update(children(m.pid()))
    assert "fetch process exited" in (m.cache_dir / "rangefs.log").read_text()


def test_repeated_kill_9_at_seeded_moments_never_leaves_a_wrong_block(
    mounts: Mounts, nginx: Server, tmp_path: Path, throttled: Callable[[float], ThrottleProxy]
) -> None:
    data = seeded_bytes(6 * MiB, seed=12)
    nginx.put("crash/r.bin", data)
    proxy = throttled(1 * MiB)
    url = f"http://127.0.0.1:{proxy.port}/crash/r.bin"
    # One connection: the copy goes at the proxy's pace (parallel ranges would multiply it), so the
    # kills land mid-copy.
    interval = ("--checkpoint-interval", "0.3", "--max-connections", "1")
    m = mounts.mount([url], *interval)
    files = m.cache_dir / "files" / cache_key(url)
    rng = random.Random(2026)
    persisted = 0
    for round_ in range(4):
        copy = subprocess.Popen(["cat", str(m.path / "r.bin")], stdout=subprocess.DEVNULL)
        try:
            time.sleep(rng.uniform(0.2, 1.0))
            os.kill(m.pid(), signal.SIGKILL)
            assert wait_until(lambda: not alive(m.pid()), timeout=10)
        finally:
            copy.kill()
            copy.wait(timeout=30)
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True, timeout=30)
        # Every block the state file claims holds the server's bytes, and progress only grows.
        _, bitmap = state.load(files.with_suffix(".state"))
        cached = files.with_suffix(".data").read_bytes()
        for block in (b for b in range(bitmap.nblocks) if b in bitmap):
            piece = slice(block * BLOCK, (block + 1) * BLOCK)
            assert cached[piece] == data[piece], f"round {round_}: block {block} is wrong"
        assert len(bitmap) >= persisted, f"round {round_}: saved progress went back"
        persisted = len(bitmap)
        mounts.remount(m, *interval)
    assert 0 < persisted * BLOCK < len(data), "the kills did not land mid-copy"
    mark = nginx.mark()
    assert (m.path / "r.bin").read_bytes() == data
    assert nginx.bytes_sent("crash/r.bin", since=mark) == len(data) - persisted * BLOCK  # nothing twice


def test_a_full_cache_disk_still_serves_every_byte_and_claims_only_what_it_wrote(
    mounts: Mounts, nginx: Server, tmp_path: Path
) -> None:
    data = seeded_bytes(6 * MiB + 1234, seed=14)
    url = nginx.put("full/f.bin", data)
    with mounts.small_disk() as small:  # a 2 MiB tmpfs holds the cache: it fills up a third of the way in
        log = tmp_path / "rangefs.log"
        m = mounts.mount([url], "--log-file", str(log), cache_dir=small / "cache")
        mark = nginx.mark()
        assert (m.path / "f.bin").read_bytes() == data
        assert (m.path / "f.bin").read_bytes() == data  # again, with the cache still full
        assert nginx.bytes_sent("full/f.bin", since=mark) >= len(data)
        assert m.unmount().returncode == 0
        assert log.read_text().count("the cache cannot be written") == 1  # one warning, not one per read
        files = small / "cache" / "files" / cache_key(url)
        _, bitmap = state.load(files.with_suffix(".state"))
        cached = files.with_suffix(".data").read_bytes()
        assert 0 < len(bitmap) < bitmap.nblocks, "the disk did not fill up mid-file"
        for block in (b for b in range(bitmap.nblocks) if b in bitmap):
            piece = slice(block * BLOCK, (block + 1) * BLOCK)
            assert cached[piece] == data[piece], f"block {block} claimed but wrong"


def test_a_block_overwritten_behind_the_daemons_back_is_fetched_again(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(10 * BLOCK + 99, seed=15)
    url = nginx.put("rot/r.bin", data)
    m = mounts.mount([url])
    assert (m.path / "r.bin").read_bytes() == data
    assert m.unmount().returncode == 0
    files = m.cache_dir / "files" / cache_key(url)
    with open(files.with_suffix(".data"), "r+b") as f:  # bit rot, or another program
        f.seek(3 * BLOCK + 1000)
        f.write(b"\0garbage\0")
    mark = nginx.mark()
    mounts.remount(m)
    assert (m.path / "r.bin").read_bytes() == data
    assert nginx.bytes_sent("rot/r.bin", since=mark) == BLOCK  # that block only
    assert "failed their checksum" in (m.cache_dir / "rangefs.log").read_text()


def test_lost_checksums_mean_no_block_is_trusted(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(5 * BLOCK, seed=16)
    url = nginx.put("rot/s.bin", data)
    m = mounts.mount([url])
    assert (m.path / "s.bin").read_bytes() == data
    assert m.unmount().returncode == 0
    (m.cache_dir / "files" / f"{cache_key(url)}.xxh").unlink()
    mark = nginx.mark()
    mounts.remount(m)
    assert (m.path / "s.bin").read_bytes() == data
    assert nginx.bytes_sent("rot/s.bin", since=mark) == len(data)


def _persisted_blocks(path: Path) -> int:
    try:
        return len(state.load(path)[1])
    except (FileNotFoundError, state.StateCorrupt):
        return 0


def test_kill_9_of_the_daemon_leaves_no_fetch_process(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(BLOCK * 3, seed=41)
    m = mounts.mount([nginx.put("orphan.bin", data)])
    assert (m.path / "orphan.bin").read_bytes() == data
    daemon = m.pid()
    helpers = children(daemon)
    assert len(helpers) == 1, helpers
    os.kill(daemon, signal.SIGKILL)
    assert wait_until(lambda: not alive(helpers[0]), timeout=10), "the fetch process outlived its daemon"


def test_a_killed_fetch_process_is_replaced_and_reads_go_on(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(8 * MiB + 77, seed=42)  # large enough for prefetches, which the helper makes
    m = mounts.mount([nginx.put("replaced.bin", data)])
    first = children(m.pid())
    assert len(first) == 1, first
    os.kill(first[0], signal.SIGKILL)
    # The next reads wait for the replacement instead of failing.
    assert (m.path / "replaced.bin").read_bytes() == data
    assert wait_until(lambda: len(children(m.pid())) == 1 and children(m.pid()) != first, timeout=10)
    mounts.pids.update(children(m.pid()))
    assert "fetch process exited" in (m.cache_dir / "rangefs.log").read_text()
    assert m.unmount().returncode == 0


def test_writes_and_namespace_changes_answer_erofs(mounts: Mounts, nginx: Server) -> None:
    m = mounts.mount([nginx.put("ro/f.txt", b"read only\n")])
    f = m.path / "f.txt"
    attempts = [
        lambda: os.open(f, os.O_WRONLY),
        lambda: os.open(f, os.O_RDWR),
        lambda: os.open(m.path / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.truncate(f, 0),
        lambda: os.mkdir(m.path / "d"),
        lambda: os.unlink(f),
        lambda: os.rename(f, m.path / "g.txt"),
        lambda: os.symlink("f.txt", m.path / "link"),
        lambda: os.chmod(f, 0o600),
        lambda: os.setxattr(f, "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert f.read_bytes() == b"read only\n"


def test_head_refused_falls_back_to_a_range_get(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(1 * MiB + 1, seed=11)
    nginx.put("nohead-src/n.bin", data)
    m = mounts.mount([nginx.url("nohead/nohead-src/n.bin")])
    assert os.stat(m.path / "n.bin").st_size == len(data)
    assert (m.path / "n.bin").read_bytes() == data


def test_ffprobe_reads_the_video(mounts: Mounts, nginx: Server, video: Path) -> None:
    url = nginx.put("video/clip.mp4", video.read_bytes())
    m = mounts.mount([url])
    probe = ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json"]
    local = sh(*probe, video)
    mounted = sh(*probe, m.path / "clip.mp4")
    assert mounted.replace(str(m.path / "clip.mp4").encode(), b"X") == local.replace(str(video).encode(), b"X")


def test_credentials_never_reach_xattrs_or_the_log(mounts: Mounts, nginx: Server) -> None:
    url = nginx.put("secret/s.bin", b"secret\n").replace("http://", "http://alice:hunter2@") + "?token=hunter3"
    m = mounts.mount([url, "http://127.0.0.1:1/nope.bin?sig=hunter4"], "-v", "--skip-unavailable",
                     "--retries", "0")
    assert (m.path / "s.bin").read_bytes() == b"secret\n"
    shown = os.getxattr(m.path / "s.bin", "user.rangefs.url").decode()
    assert shown.startswith("http://***@127.0.0.1:") and shown.endswith("?token=***")
    assert m.unmount().returncode == 0
    everything = (m.cache_dir / "rangefs.log").read_text() + (m.result.stderr if m.result else "")
    everything += "".join(p.read_text(errors="replace") for p in (m.cache_dir / "files").glob("*.state"))
    assert "127.0.0.1:1" in everything  # the failed URL was reported...
    for secret in ("hunter2", "hunter3", "hunter4"):
        assert secret not in everything  # ...with no secret in it


def test_xattrs_and_du_tell_the_cache_state(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(4 * BLOCK, seed=12)
    url = nginx.put("xattr/x.bin", data)
    m = mounts.mount([url])
    path = m.path / "x.bin"
    assert os.stat(path).st_blocks == 0
    with open(path, "rb") as f:
        f.read(10)
        cached = int(os.getxattr(path, "user.rangefs.cached_bytes"))
    assert os.getxattr(path, "user.rangefs.url") == url.encode()
    assert m.unmount().returncode == 0
    saved = len(state.load(m.cache_dir / "files" / f"{cache_key(url)}.state")[1]) * BLOCK
    assert BLOCK <= cached <= saved  # the block read, and whatever kernel readahead added
    mounts.remount(m)
    assert os.stat(path).st_blocks * 512 == saved  # known from the state file, before any open


# -- shutting down ----------------------------------------------------------------------------


def _assert_clean_exit(m: Mount, pid: int, state_path: Path, blocks: int) -> None:
    assert wait_until(lambda: not alive(pid), timeout=20), "daemon still running"
    assert fstype(m.path) is None
    assert daemon_pid(m.path) is None
    assert len(state.load(state_path)[1]) == blocks


@pytest.mark.parametrize("how", ["rangefs unmount", "fusermount3 -u", "SIGTERM", "SIGINT"])
def test_every_way_of_stopping_unmounts_cleanly_and_saves_state(mounts: Mounts, nginx: Server, how: str) -> None:
    data = seeded_bytes(3 * BLOCK, seed=13)
    name = how.split()[0] + ".bin"
    url = nginx.put(f"stop/{name}", data)
    m = mounts.mount([url], "--checkpoint-interval", "3600")  # no periodic checkpoint can save it
    pid = m.pid()
    state_path = m.cache_dir / "files" / f"{cache_key(url)}.state"
    fd = os.open(m.path / name, os.O_RDONLY)
    try:
        assert os.pread(fd, 10, 0) == data[:10]  # one block fetched
        if how.startswith("SIG"):
            # the file stays open: only the shutdown can save the state
            os.kill(pid, getattr(signal, how))
            _assert_clean_exit(m, pid, state_path, blocks=1)
            return
    finally:
        try:
            os.close(fd)
        except OSError as exc:  # after a signal the mount is gone: the kernel cannot flush
            # ECONNABORTED when the flush was queued before the daemon's last thread closed /dev/fuse
            # (its main thread shows as a zombie while the others still exit).
            assert how.startswith("SIG") and exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    if how == "rangefs unmount":
        done = m.unmount()
        assert done.returncode == 0, done.stderr
        assert not alive(pid)  # the command returns only once the daemon has exited
    else:
        subprocess.run(["fusermount3", "-u", str(m.path)], check=True, timeout=30)
    _assert_clean_exit(m, pid, state_path, blocks=1)


def test_a_mount_point_named_through_a_link_or_dot_dot_mounts_and_unmounts(
    mounts: Mounts, nginx: Server, tmp_path: Path
) -> None:
    """The mount table names the real path: mount and unmount find it however the user wrote it."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    url = nginx.put("named/f.txt", b"named\n")
    m = mounts.mount([url])  # tmp_path/mnt0
    done = run_rangefs("unmount", link / m.path.name)
    assert done.returncode == 0, done.stderr
    assert fstype(m.path) is None
    done = run_rangefs("mount", m.url_list, link / "sub" / ".." / m.path.name, "--cache-dir", m.cache_dir)
    assert done.returncode == 0, done.stderr
    assert fstype(m.path) == "fuse.rangefs"
    mounts.remount_tracked(m)
    assert (m.path / "f.txt").read_bytes() == b"named\n"
    done = run_rangefs("unmount", link / "sub" / ".." / m.path.name)
    assert done.returncode == 0, done.stderr
    assert fstype(m.path) is None


def test_foreground_mount_stops_on_ctrl_c(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    url_list = mounts.write_list([nginx.put("fg/f.txt", b"foreground\n")], "fg.txt")
    mountpoint = tmp_path / "fg"
    mountpoint.mkdir()
    command = [*RANGEFS, "mount", str(url_list), str(mountpoint), "--cache-dir", str(tmp_path / "c"), "-f"]
    daemon = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: fstype(mountpoint) == "fuse.rangefs", timeout=30)
        assert (mountpoint / "f.txt").read_bytes() == b"foreground\n"
        daemon.send_signal(signal.SIGINT)
        assert daemon.wait(timeout=30) == 0
        assert fstype(mountpoint) is None
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        if fstype(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], timeout=30)
