"""Reload through a real mount: `rangefs reload` and SIGHUP read the URL list again; new entries
appear, removed ones disappear also from the kernel's dentry cache, a handle open on a removed
file reads on, and a bad list is refused with its line while the mount keeps its files."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from nginx import AUTH_TOKEN
from util import Mounts, Server, run_rangefs, seeded_bytes, wait_until

KiB = 1024


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.timeout(120)
def test_reload_adds_and_removes_entries_and_an_open_handle_reads_on(mounts: Mounts, nginx: Server) -> None:
    data = {name: seeded_bytes(300 * KiB + i, seed=200 + i) for i, name in enumerate("abc")}
    urls = {name: nginx.put(f"reload/{name}.bin", body) for name, body in data.items()}
    m = mounts.mount([f"{urls['a']} a", f"{urls['b']} dir/b"])
    assert (m.path / "dir" / "b").stat().st_size == len(data["b"])  # the kernel now holds the name
    with open(m.path / "dir" / "b", "rb") as held:
        assert held.read(1000) == data["b"][:1000]
        m.url_list.write_text(f"{urls['a']} a\n{urls['c']} c\n")
        done = run_rangefs("reload", m.path)
        assert done.returncode == 0, done.stderr
        assert "1 added, 1 removed" in done.stdout
        assert _files(m.path) == ["a", "c"]
        assert not (m.path / "dir" / "b").exists()  # gone from the dentry cache too
        assert not (m.path / "dir").exists()  # left empty: gone
        assert (m.path / "c").read_bytes() == data["c"]  # probed at its first lookup
        assert (m.path / "a").read_bytes() == data["a"]
        assert held.read() == data["b"][1000:]  # the open handle reads on
        time.sleep(1.5)  # past the attributes' timeout: the kernel asks the daemon again
        assert os.fstat(held.fileno()).st_size == len(data["b"])
    assert m.mounted()
    m.url_list.write_text(f"{urls['c']} a\n")  # the same path, another URL: another file
    done = run_rangefs("reload", m.path)
    assert done.returncode == 0 and "1 added, 2 removed" in done.stdout
    assert (m.path / "a").read_bytes() == data["c"]


@pytest.mark.timeout(120)
def test_a_bad_list_is_refused_with_its_line_and_the_mount_keeps_its_files(mounts: Mounts, nginx: Server) -> None:
    url = nginx.put("reload/keep.bin", b"kept")
    m = mounts.mount([f"{url} keep"])
    m.url_list.write_text(f"{url} keep\nftp://example.com/x other\n")
    done = run_rangefs("reload", m.path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "line 2" in done.stderr and "Traceback" not in done.stderr
    assert _files(m.path) == ["keep"]
    assert (m.path / "keep").read_bytes() == b"kept"
    assert "reload refused" in (m.cache_dir / "rangefs.log").read_text()
    m.url_list.write_text(f"{url} again\n")  # a good list afterwards is taken
    assert run_rangefs("reload", m.path).returncode == 0
    assert _files(m.path) == ["again"]


@pytest.mark.timeout(120)
def test_sighup_reloads_the_list_and_the_daemon_serves_on(mounts: Mounts, nginx: Server) -> None:
    first = nginx.put("reload/one.bin", b"one")
    second = nginx.put("reload/two.bin", b"two")
    m = mounts.mount([f"{first} one"])
    pid = m.pid()
    m.url_list.write_text(f"{first} one\n{second} two\n")
    os.kill(pid, signal.SIGHUP)
    assert wait_until(lambda: (m.path / "two").exists(), timeout=10)
    assert (m.path / "two").read_bytes() == b"two"
    assert m.mounted() and m.pid() == pid


def test_reload_of_something_not_a_rangefs_mount_is_one_line(tmp_path: Path) -> None:
    done = run_rangefs("reload", tmp_path)
    assert done.returncode == 1 and "not a rangefs mount" in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.timeout(120)
def test_a_removed_url_found_missing_by_a_later_probe_is_enoent(mounts: Mounts, nginx: Server) -> None:
    url = nginx.put("reload/here.bin", b"here")
    m = mounts.mount([f"{url} here"])
    m.url_list.write_text(f"{url} here\n{nginx.url('reload/never.bin')} never\n")
    assert run_rangefs("reload", m.path).returncode == 0
    with pytest.raises(FileNotFoundError) as caught:
        (m.path / "never").stat()
    assert caught.value.errno == errno.ENOENT
    assert _files(m.path) == ["here"]  # left out of the listing
    assert "never.bin answered 404" in (m.cache_dir / "rangefs.log").read_text()


@pytest.mark.timeout(120)
def test_a_reload_that_changes_an_entrys_headers_sends_the_new_ones(mounts: Mounts, nginx: Server) -> None:
    """The same URL with another header.Authorization: the file's next range GETs carry it (the
    cached file outlives the entry, and its saved answer held the old headers)."""
    body = seeded_bytes(2 * 1024 * KiB, seed=230)
    nginx.put("reload/auth.bin", body)
    url = nginx.url("auth/reload/auth.bin")
    good, bad = (quote(f"Bearer {token}") for token in (AUTH_TOKEN, "wrong"))
    m = mounts.mount([f"{url} auth.bin header.Authorization={good}"], "--retries", "0")
    with open(m.path / "auth.bin", "rb") as f:
        assert f.read(64 * KiB) == body[: 64 * KiB]
    m.url_list.write_text(f"{url} auth.bin header.Authorization={bad}\n")
    assert run_rangefs("reload", m.path).returncode == 0
    with open(m.path / "auth.bin", "rb") as f, pytest.raises(OSError) as refused:
        f.seek(1024 * KiB)
        f.read(64 * KiB)  # not cached: fetched with the wrong token, which nginx refuses
    assert refused.value.errno in (errno.EIO, errno.EACCES)
    m.url_list.write_text(f"{url} auth.bin header.Authorization={good}\n")
    assert run_rangefs("reload", m.path).returncode == 0
    with open(m.path / "auth.bin", "rb") as f:
        f.seek(1024 * KiB)
        assert f.read(64 * KiB) == body[1024 * KiB : 1088 * KiB]
