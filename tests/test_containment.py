"""Nothing outside the cache directory: planted links are never followed, the cache is private.

The daemon runs as root. A symbolic link or hard link planted in the cache directory must not
make it write, truncate or serve a file elsewhere: such a name is removed (never its target) and
that URL's cache starts afresh; ``files/`` as a link, or a cache directory someone else owns or
may write, fails the mount with one line.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from rangefs import safefs, state
from rangefs.bitmap import Bitmap
from rangefs.cache import cache_key
from rangefs.errors import CacheError

from util import Mount, Mounts, Server, seeded_bytes

MiB = 1 << 20
VICTIM = b"a file outside the cache that rangefs must never change\n"


def _read(m: Mount, name: str, count_mib: int | None = None) -> bytes:
    args = ["dd", f"if={m.path / name}", "bs=1M", "status=none"] + ([f"count={count_mib}"] if count_mib else [])
    done = subprocess.run(args, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _unmount(m: Mount) -> None:
    done = m.unmount()
    assert done.returncode == 0, done.stderr


def _one_line_refusal(m: Mount, *words: str) -> None:
    assert m.result is not None and m.result.returncode != 0
    assert not m.mounted()
    lines = m.result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rangefs: "), m.result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("planted", ["data", "xxh", "state", "log"])
def test_a_planted_symlink_in_the_cache_is_never_followed(
    mounts: Mounts, nginx: Server, tmp_path: Path, planted: str
) -> None:
    data = seeded_bytes(4 * MiB + 777, seed=160)
    url = nginx.put(f"contain/{planted}.bin", data)
    name = f"{planted}.bin"
    m = mounts.mount([url])
    assert _read(m, name, count_mib=1) == data[:MiB]  # a cache whose state is trusted at the next mount
    _unmount(m)

    files = m.cache_dir / "files"
    link = m.cache_dir / "rangefs.log" if planted == "log" else files / f"{cache_key(url)}.{planted}"
    victim = tmp_path / "victim"
    if planted in ("data", "state"):
        os.rename(link, victim)  # the real file, moved out: followed, it would be read and written on
    else:
        victim.write_bytes(VICTIM)
    before = victim.read_bytes()
    link.unlink(missing_ok=True)
    link.symlink_to(victim)

    mounts.remount(m)
    assert _read(m, name) == data
    _unmount(m)
    assert victim.read_bytes() == before
    assert not link.is_symlink() and stat.S_ISREG(link.lstat().st_mode)
    assert m.result is not None
    assert "removed it" in m.result.stderr + (m.cache_dir / "rangefs.log").read_text()


def test_a_planted_hard_link_in_the_cache_is_replaced(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    data = seeded_bytes(2 * MiB, seed=161)
    url = nginx.put("contain/hard.bin", data)
    m = mounts.mount([url])
    assert _read(m, "hard.bin", count_mib=1) == data[:MiB]
    _unmount(m)
    sums = m.cache_dir / "files" / f"{cache_key(url)}.xxh"
    victim = m.cache_dir / "victim"  # a hard link needs the same filesystem
    victim.write_bytes(VICTIM)
    sums.unlink()
    os.link(victim, sums)
    mounts.remount(m)
    assert _read(m, "hard.bin") == data
    _unmount(m)
    assert victim.read_bytes() == VICTIM


def test_a_link_planted_while_mounted_does_not_redirect_fetches(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    """The fetch helper writes through the daemon's descriptor, never by the file's name."""
    data = seeded_bytes(24 * MiB, seed=166)
    url = nginx.put("contain/live.bin", data)
    m = mounts.mount([url], "--no-passthrough")
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    with open(m.path / "live.bin", "rb", buffering=0) as f:
        assert f.read(4096) == data[:4096]  # the daemon has its cache file open now
        link = m.cache_dir / "files" / f"{cache_key(url)}.data"
        link.unlink()
        link.symlink_to(victim)
        rest = b"".join(iter(lambda: f.read(MiB), b""))  # runs of MiBs: fetched by the helper
    assert data[:4096] + rest == data
    _unmount(m)
    assert victim.read_bytes() == VICTIM


def test_files_dir_as_a_symlink_is_refused(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    cache.mkdir(mode=0o700)
    elsewhere.mkdir()
    (cache / "files").symlink_to(elsewhere)
    m = mounts.mount([nginx.put("contain/files.bin", b"x" * 100)], cache_dir=cache, check=False)
    _one_line_refusal(m, str(cache), "files", "symbolic link")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("how", ["foreign-owner", "world-writable", "group-writable"])
def test_a_cache_dir_others_could_plant_links_in_is_refused(mounts: Mounts, nginx: Server, tmp_path: Path,
                                                           how: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if how == "foreign-owner":
        os.chown(cache, 65534, 65534)
    else:
        os.chmod(cache, 0o777 if how == "world-writable" else 0o770)
    m = mounts.mount([nginx.put("contain/owner.bin", b"x" * 100)], cache_dir=cache, check=False)
    _one_line_refusal(m, str(cache), "uid 65534" if how == "foreign-owner" else "written by other users")
    assert not (cache / "files").exists()


def test_a_log_file_given_as_a_symlink_is_refused(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    victim, log = tmp_path / "victim", tmp_path / "my.log"
    victim.write_bytes(VICTIM)
    log.symlink_to(victim)
    m = mounts.mount([nginx.put("contain/log.bin", b"x" * 100)], "--log-file", str(log), check=False)
    _one_line_refusal(m, str(log))
    assert victim.read_bytes() == VICTIM


def test_a_log_file_given_as_a_hard_link_is_refused(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    victim, log = tmp_path / "victim", tmp_path / "my.log"
    victim.write_bytes(VICTIM)
    os.link(victim, log)
    m = mounts.mount([nginx.put("contain/hardlog.bin", b"x" * 100)], "--log-file", str(log), check=False)
    _one_line_refusal(m, str(log))
    assert victim.read_bytes() == VICTIM


def test_the_cache_and_its_log_are_private(mounts: Mounts, nginx: Server) -> None:
    os.umask(0o022)  # what a shell usually has: the modes must not depend on it
    data = seeded_bytes(MiB, seed=162)
    m = mounts.mount([nginx.put("contain/modes.bin", data)])
    assert _read(m, "modes.bin") == data
    _unmount(m)
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in [m.cache_dir, *m.cache_dir.rglob("*")]}
    assert modes.pop("cache") == 0o700 and modes.pop("files") == 0o700
    assert modes and set(modes.values()) == {0o600}, modes


# -- the module itself, without a mount ------------------------------------------------------


def test_open_replaces_a_symlink_and_leaves_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    cache = tmp_path / "cache"
    safefs.open_cache_dir(cache)
    for suffix in ("data", "xxh", "state"):
        path = cache / "files" / f"k.{suffix}"
        path.symlink_to(victim)
        fd = safefs.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, b"ours")
        os.close(fd)
        assert not path.is_symlink() and path.read_bytes() == b"ours"
    assert victim.read_bytes() == VICTIM


def test_reads_never_follow_a_symlink_or_wait_on_a_fifo(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    cache = tmp_path / "cache"
    safefs.open_cache_dir(cache)
    link, fifo = cache / "files" / "k.state", cache / "files" / "k.xxh"
    link.symlink_to(victim)
    os.mkfifo(fifo)
    for path in (link, fifo):
        with pytest.raises(FileNotFoundError):
            safefs.read_bytes(path)
        assert not os.path.lexists(path)
        with pytest.raises(FileNotFoundError):
            state.load(path)


def test_state_save_never_writes_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    cache = tmp_path / "cache"
    safefs.open_cache_dir(cache)
    path = cache / "files" / "k.state"
    path.symlink_to(victim)
    identity = state.Identity("k", "http://h/f", 10, '"e"', None, 4)
    state.save(path, identity, Bitmap(identity.nblocks))
    assert state.load(path)[0] == identity
    assert victim.read_bytes() == VICTIM
    assert [p.name for p in path.parent.iterdir()] == ["k.state"]  # no temp file left


def test_temp_names_cannot_be_guessed() -> None:
    path = Path("/cache/files/k.state")
    names = {safefs.temp_path(path).name for _ in range(100)}
    assert len(names) == 100 and all(name.startswith("k.state.tmp") for name in names)


def test_files_dir_opened_without_open_cache_dir_is_not_followed(tmp_path: Path) -> None:
    """The fetch helper has no descriptor of the cache: it still never follows ``files/``."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "files").symlink_to(elsewhere)
    with pytest.raises(OSError):
        safefs.open(tmp_path / "files" / "k.data", os.O_WRONLY | os.O_CREAT)
    assert list(elsewhere.iterdir()) == []


def test_open_cache_dir_refuses_what_others_may_write(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chmod(cache, 0o757)
    with pytest.raises(CacheError, match="0757"):
        safefs.open_cache_dir(cache)
    os.chmod(cache, 0o700)
    (cache / "files").mkdir(mode=0o700)
    os.chown(cache / "files", 65534, 65534)
    with pytest.raises(CacheError, match="uid 65534"):
        safefs.open_cache_dir(cache)


def test_temp_files_a_crash_left_are_removed_once_old(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    safefs.open_cache_dir(cache)
    files = cache / "files"
    old = [safefs.temp_path(files / "k.state"), files / "k.state.tmp4242", files / "k.data-new"]
    young = safefs.temp_path(files / "j.state")
    kept = [files / "k.data", files / "k.state", files / "k.xxh", young]
    for path in old + kept:
        path.write_bytes(b"x")
    for path in old:
        os.utime(path, (1, 1))
    os.utime(files / "k.data", (1, 1))
    assert safefs.remove_stale_temps(files, 3600) == len(old)
    assert sorted(files.iterdir()) == sorted(kept)
