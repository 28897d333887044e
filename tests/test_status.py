"""`rangefs status` and `rangefs cache clear` through real mounts, and the control channel's
permissions: before and after reads, after a remount, without a mount, the JSON shape, URLs
redacted, open files skipped, another user refused, bad input."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from test_cli_errors import assert_one_line_error

from rangefs.control import socket_name

from util import Mount, Mounts, Server, run_rangefs, seeded_bytes, wait_until

MiB = 1024 * 1024
NOBODY = 65534
# Another user cannot run the venv's interpreter (under /root); the raw clients need only the
# standard library.
SYSTEM_PYTHON = "/usr/bin/python3"


def status_json(*args: str | os.PathLike[str]) -> dict[str, Any]:
    done = run_rangefs("status", *args, "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    check_shape(report)
    return report


def check_shape(report: dict[str, Any]) -> None:
    """Exactly the keys and types the issue asks for (more keys would be fine; there are none)."""
    assert set(report) == {"mountpoint", "cache_dir", "cache", "files"}
    assert report["mountpoint"] is None or isinstance(report["mountpoint"], str)
    assert isinstance(report["cache_dir"], str)
    assert set(report["cache"]) == {"allocated_bytes", "max_bytes", "min_free_bytes"}
    assert type(report["cache"]["allocated_bytes"]) is int
    assert report["cache"]["max_bytes"] is None or type(report["cache"]["max_bytes"]) is int
    assert type(report["cache"]["min_free_bytes"]) is int
    assert isinstance(report["files"], list)
    for f in report["files"]:
        assert set(f) == {"path", "url", "size", "cached_bytes", "complete", "state", "error"}
        assert isinstance(f["path"], str)
        assert isinstance(f["url"], str) and isinstance(f["state"], str)
        assert type(f["size"]) is int and type(f["cached_bytes"]) is int and type(f["complete"]) is bool
        assert f["error"] is None or isinstance(f["error"], str)
        assert f["state"] in ("complete", "partial", "fetching", "stale", "error")


def by_path(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for f in report["files"]}


def by_url(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["url"]: f for f in report["files"]}


def test_status_before_and_after_reads_after_a_remount_and_without_a_mount(mounts: Mounts, nginx: Server) -> None:
    a, b = seeded_bytes(3 * MiB + 5, seed=190), seeded_bytes(MiB, seed=191)
    url_a, url_b = nginx.put("status/a.bin", a), nginx.put("status/b.bin", b)
    m = mounts.mount([url_a, f"{url_b} sub/b.bin"], "--cache-max-size", "100M")
    before = status_json(m.path)
    assert before["mountpoint"] == str(m.path) and before["cache_dir"] == str(m.cache_dir)
    assert before["cache"]["max_bytes"] == 100 * MiB
    files = by_path(before)
    assert set(files) == {"a.bin", "sub/b.bin"}
    assert files["a.bin"] == {"path": "a.bin", "url": url_a, "size": len(a), "cached_bytes": 0,
                              "complete": False, "state": "partial", "error": None}

    assert (m.path / "a.bin").read_bytes() == a
    with open(m.path / "sub" / "b.bin", "rb") as f:
        assert f.read(1000) == b[:1000]
    after = by_path(status_json(m.path))
    assert after["a.bin"]["cached_bytes"] == len(a) and after["a.bin"]["complete"]
    assert after["a.bin"]["state"] == "complete"
    assert 0 < after["sub/b.bin"]["cached_bytes"] < len(b) and after["sub/b.bin"]["state"] == "partial"
    table = run_rangefs("status", m.path)
    assert table.returncode == 0, table.stderr
    assert "a.bin" in table.stdout and "complete" in table.stdout and "2 files" in table.stdout

    assert m.unmount().returncode == 0
    offline = status_json("--cache-dir", m.cache_dir)  # no mount: the state files, as saved
    assert offline["mountpoint"] is None and offline["cache"]["max_bytes"] is None
    files = by_url(offline)
    assert files[url_a]["cached_bytes"] == len(a) and files[url_a]["state"] == "complete"
    assert files[url_a]["path"] == "a.bin"  # the name its URL gives: the list's paths are not on disk
    assert files[url_b]["cached_bytes"] == after["sub/b.bin"]["cached_bytes"]
    du = subprocess.run(["du", "-s", "--block-size=1", str(m.cache_dir)], capture_output=True, text=True, check=True)
    assert offline["cache"]["allocated_bytes"] == int(du.stdout.split()[0]) >= len(a)

    mounts.remount(m)
    again = by_path(status_json(m.path))
    assert again["a.bin"]["cached_bytes"] == len(a) and again["a.bin"]["state"] == "complete"
    assert again["sub/b.bin"]["cached_bytes"] == after["sub/b.bin"]["cached_bytes"]


def test_status_without_a_mount_changes_nothing_in_the_cache_directory(mounts: Mounts, nginx: Server) -> None:
    url = nginx.put("status/c.bin", seeded_bytes(MiB, seed=192))
    m = mounts.mount([url])
    (m.path / "c.bin").read_bytes()
    assert m.unmount().returncode == 0
    # Names rangefs did not make: a mount removes them when it opens them; a status must not.
    (m.cache_dir / "files" / f"{'1' * 32}.state").symlink_to("/etc/hostname")
    os.mkfifo(m.cache_dir / "files" / f"{'2' * 32}.state")

    def snapshot() -> dict[str, tuple[int, int, int]]:
        return {str(p): (p.lstat().st_mtime_ns, p.lstat().st_size, p.lstat().st_ino) for p in m.cache_dir.rglob("*")}

    before = snapshot()
    report = status_json("--cache-dir", m.cache_dir)
    assert run_rangefs("status", "--cache-dir", m.cache_dir).returncode == 0
    assert snapshot() == before
    states = sorted((f["state"], f["complete"]) for f in report["files"])
    assert states == [("complete", True), ("error", False), ("error", False)]


def test_status_shows_urls_without_credentials_or_secret_query_values(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(100_000, seed=193)
    nginx.put("status/secret.bin", data)
    url = f"http://user:hunter2@127.0.0.1:{nginx.nginx.port}/status/secret.bin?token=s3cr3t&x=1"
    m = mounts.mount([url])
    assert (m.path / "secret.bin").read_bytes() == data
    outputs = [run_rangefs("status", m.path), run_rangefs("status", m.path, "--json")]
    assert m.unmount().returncode == 0
    outputs += [run_rangefs("status", "--cache-dir", m.cache_dir),
                run_rangefs("status", "--cache-dir", m.cache_dir, "--json")]
    for done in outputs:
        assert done.returncode == 0, done.stderr
        assert "hunter2" not in done.stdout and "s3cr3t" not in done.stdout and "user:" not in done.stdout
    shown = json.loads(outputs[1].stdout)["files"][0]["url"]
    assert shown == f"http://***@127.0.0.1:{nginx.nginx.port}/status/secret.bin?token=***&x=***"


def test_a_failed_fetch_shows_as_error_with_its_last_error(mounts: Mounts, nginx: Server) -> None:
    url = nginx.put("status/gone.bin", seeded_bytes(MiB, seed=194))
    m = mounts.mount([url], "--retries", "0")
    (nginx.www / "status" / "gone.bin").unlink()  # the server now answers 404
    with pytest.raises(OSError), open(m.path / "gone.bin", "rb") as f:
        f.read(4096)
    files = status_json(m.path)["files"]
    assert files[0]["state"] == "error" and files[0]["error"] is not None and "404" in files[0]["error"]


# -- cache clear ----------------------------------------------------------------------------


def test_cache_clear_through_the_daemon_skips_open_files(mounts: Mounts, nginx: Server) -> None:
    a, b = seeded_bytes(2 * MiB, seed=195), seeded_bytes(2 * MiB, seed=196)
    m = mounts.mount([nginx.put("clear/a.bin", a), nginx.put("clear/b.bin", b)])
    assert (m.path / "a.bin").read_bytes() == a
    held = open(m.path / "b.bin", "rb")
    try:
        assert held.read() == b
        done = run_rangefs("cache", "clear", m.path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[1:] == ["skipped b.bin: open"], done.stdout
        files = by_path(status_json(m.path))
        assert files["a.bin"]["cached_bytes"] == 0 and files["b.bin"]["cached_bytes"] == len(b)
        assert not (m.cache_dir / "files" / f"{files_key(m, 'a.bin')}.state").exists()
    finally:
        held.close()
    drop_page_cache(m.path / "a.bin")
    mark = nginx.mark()
    assert (m.path / "a.bin").read_bytes() == a  # fetched again, whole
    assert nginx.bytes_sent("clear/a.bin", since=mark) == len(a)
    done = run_rangefs("cache", "clear", m.path / "b.bin")
    assert done.returncode == 0 and "cleared 1 file" in done.stdout, done.stdout + done.stderr
    assert by_path(status_json(m.path))["b.bin"]["cached_bytes"] == 0


def drop_page_cache(path: Path) -> None:
    """Have the kernel forget the mounted file's pages, so that reads reach the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def files_key(m: Mount, name: str) -> str:
    from rangefs.cache import cache_key

    for line in m.url_list.read_text().splitlines():
        if line.split()[0].endswith(name):
            return cache_key(line.split()[0])
    raise AssertionError(name)


def test_cache_clear_without_a_mount_and_refused_while_one_uses_the_directory(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(2 * MiB, seed=197)
    m = mounts.mount([nginx.put("clear/c.bin", data)])
    assert (m.path / "c.bin").read_bytes() == data
    refused = run_rangefs("cache", "clear", "--cache-dir", m.cache_dir)
    assert_one_line_error(refused, str(m.cache_dir), "used by a mount")
    assert by_path(status_json(m.path))["c.bin"]["cached_bytes"] == len(data)
    assert m.unmount().returncode == 0
    link = m.cache_dir.with_name("cache-link")  # a mount follows a link to its cache directory; so does a clear
    link.symlink_to(m.cache_dir)
    done = run_rangefs("cache", "clear", "--cache-dir", link)
    assert done.returncode == 0 and "cleared 1 file" in done.stdout, done.stdout + done.stderr
    assert status_json("--cache-dir", m.cache_dir)["files"] == []
    assert not list((m.cache_dir / "files").glob("*.data"))
    mounts.remount(m)  # the directory was cleared, not broken
    mark = nginx.mark()
    assert (m.path / "c.bin").read_bytes() == data
    assert nginx.bytes_sent("clear/c.bin", since=mark) == len(data)


# -- the control channel's permissions ------------------------------------------------------


def test_the_control_socket_is_0600_and_refuses_another_user(mounts: Mounts, nginx: Server) -> None:
    m = mounts.mount([nginx.put("ctl/a.bin", b"x" * 1000)])
    sock = m.cache_dir / socket_name(m.pid())
    st = sock.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    # Open the way to the socket for the test only, so that the daemon's own check is what refuses.
    os.chmod(m.cache_dir, 0o711)
    os.chmod(sock, 0o666)

    def as_nobody() -> None:
        os.chdir(m.cache_dir)  # a relative name: the tmp dirs above are closed to others
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    # The refusal comes before any request is read.
    client = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
              "print(s.makefile().readline(), end='')")
    done = subprocess.run([SYSTEM_PYTHON, "-c", client, sock.name], preexec_fn=as_nobody, capture_output=True,
                          text=True, timeout=30)
    os.chmod(m.cache_dir, 0o700)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply == {"ok": False, "error": "permission denied: only the mount's owner or root may use its "
                                           "control channel"}


def test_with_allow_other_another_user_reads_but_cannot_prefetch_or_clear(
    mounts: Mounts, nginx: Server, tmp_path: Path
) -> None:
    data = seeded_bytes(100_000, seed=198)
    url = nginx.put("ctl/o.bin", data)
    open_dir = Path(tempfile.mkdtemp(prefix="rangefs-other-", dir="/tmp"))
    try:
        os.chmod(open_dir, 0o755)
        mountpoint = open_dir / "mnt"
        mountpoint.mkdir()
        url_list = mounts.write_list([url], "other.txt")
        done = run_rangefs("mount", url_list, mountpoint, "--cache-dir", tmp_path / "cache", "--allow-other")
        assert done.returncode == 0, done.stderr
        mounts.made.append(Mount(mountpoint, tmp_path / "cache", url_list))
        mounts.remount_tracked(mounts.made[-1])

        def as_nobody() -> None:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)

        read = subprocess.run(["cat", str(mountpoint / "o.bin")], capture_output=True, timeout=30,
                              preexec_fn=as_nobody)
        assert read.returncode == 0 and read.stdout == data
        # What the CLI does: the root names the cache directory, where the socket is out of reach.
        client = ("import os,socket,sys; d=os.getxattr(sys.argv[1], 'user.rangefs.cache_dir').decode(); "
                  "s=socket.socket(socket.AF_UNIX)\ntry: s.connect(os.path.join(d, sys.argv[2]))\n"
                  "except OSError as e: print(e.errno)")
        pid = mounts.made[-1].pid()
        done = subprocess.run([SYSTEM_PYTHON, "-c", client, str(mountpoint), socket_name(pid)], capture_output=True,
                              text=True, timeout=30, preexec_fn=as_nobody)
        assert done.stdout.strip() == str(errno.EACCES), done.stdout + done.stderr
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(open_dir / "mnt")], capture_output=True, timeout=30)
        (open_dir / "mnt").rmdir()
        open_dir.rmdir()


# -- bad input ------------------------------------------------------------------------------


def test_bad_input_is_one_line(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    m = mounts.mount([nginx.put("bad/a.bin", b"a" * 1000)])
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_bytes(b"")
    assert_one_line_error(run_rangefs("status", tmp_path / "plain"), "plain", "not in a rangefs mount")
    assert_one_line_error(run_rangefs("status", "--cache-dir", tmp_path / "nope"), "nope", "does not exist")
    assert_one_line_error(run_rangefs("status", "--cache-dir", tmp_path / "file"), "file", "not a directory")
    assert_one_line_error(run_rangefs("prefetch", tmp_path / "plain"), "plain", "not in a rangefs mount")
    assert_one_line_error(run_rangefs("prefetch", m.path / "nope.bin"), "nope.bin")
    assert_one_line_error(run_rangefs("cache", "clear", m.path / "nope.bin"), "nope.bin")
    assert_one_line_error(run_rangefs("cache", "clear", "--cache-dir", tmp_path / "nope"), "nope")
    assert_one_line_error(run_rangefs("status", m.path, "--cache-dir", m.cache_dir), "not both")


def test_a_daemon_killed_leaves_no_socket_that_blocks_the_next_mount(mounts: Mounts, nginx: Server) -> None:
    import signal

    from util import alive, children

    m = mounts.mount([nginx.put("ctl/k.bin", b"k" * 1000)])
    pid = m.pid()
    processes = [pid, *children(pid)]
    for p in processes:
        os.kill(p, signal.SIGKILL)
    assert wait_until(lambda: not any(alive(p) for p in processes), timeout=10)
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=True, timeout=30)
    assert (m.cache_dir / socket_name(pid)).exists()  # left behind by the kill
    mounts.remount(m)
    assert not (m.cache_dir / socket_name(pid)).exists()
    assert status_json(m.path)["files"][0]["size"] == 1000
    assert m.unmount().returncode == 0
    assert not list(m.cache_dir.glob("control-*.sock"))  # removed at unmount


def test_a_second_mount_on_the_same_cache_directory_has_its_own_channel(mounts: Mounts, nginx: Server) -> None:
    url_a, url_b = nginx.put("ctl/s1.bin", b"1" * 1000), nginx.put("ctl/s2.bin", b"2" * 2000)
    first = mounts.mount([url_a])
    second = mounts.mount([url_b], cache_dir=first.cache_dir)
    assert [f["path"] for f in status_json(first.path)["files"]] == ["s1.bin"]
    assert [f["path"] for f in status_json(second.path)["files"]] == ["s2.bin"]
    assert_one_line_error(run_rangefs("cache", "clear", "--cache-dir", first.cache_dir), "used by a mount")


def test_a_cache_path_longer_than_a_socket_address_still_has_a_channel(mounts: Mounts, nginx: Server,
                                                                       tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(str(deep / socket_name(99999))) > 108  # sun_path's limit
    m = mounts.mount([nginx.put("ctl/long.bin", b"l" * 1000)], cache_dir=deep)
    assert status_json(m.path)["cache_dir"] == str(deep)


def test_clear_removes_the_state_before_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the data file cannot be removed, no state is left claiming it (a crash between the two
    leaves data no state claims, never the reverse)."""
    from rangefs import safefs, status
    from rangefs import state as state_file
    from rangefs.bitmap import Bitmap
    from rangefs.datafile import DataFile

    files_dir = tmp_path / "files"
    files_dir.mkdir()
    data = DataFile(files_dir, "k" * 32)
    data.path.write_bytes(b"x" * 4096)
    identity = state_file.Identity("k" * 32, "http://h/x", 4096, '"e"', None, 4096)
    bitmap = Bitmap(1)
    bitmap.add(0)
    state_file.save(data.state_path, identity, bitmap)
    real_unlink = safefs.unlink

    def failing_unlink(path: Path) -> None:
        if path == data.path:
            raise OSError(errno.EIO, "cannot remove")
        real_unlink(path)

    monkeypatch.setattr(safefs, "unlink", failing_unlink)
    with pytest.raises(OSError):
        status.drop_files(files_dir, "k" * 32)
    assert not data.state_path.exists() and not state_file.previous(data.state_path).exists()
    assert data.path.exists()


def ask_raw(m: Mount, request: bytes) -> list[dict[str, Any]]:
    """Send ``request`` as is to the mount's control socket; the daemon's reply lines."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(m.cache_dir / socket_name(m.pid())))
        s.sendall(request)
        replies = s.makefile("rb").read()
    return [json.loads(line) for line in replies.splitlines()]


def test_hostile_requests_get_one_refusal_each_and_the_mount_goes_on(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(100_000, seed=199)
    m = mounts.mount([nginx.put("ctl/h.bin", data)])
    refused = {
        b"[" * 60_000 + b"\n": "not a request",  # deeper than the JSON parser recurses
        b'{"op": "clear", "paths": ["\\ud800"]}\n': "is not a file of the mount",  # no name can hold it
        b'{"op": "prefetch", "paths": ["../../etc/passwd"]}\n': "is not a file of the mount",
        b'{"op": "clear", "paths": "h.bin"}\n': "paths must be a list",
        b'{"op": "nope"}\n': "unknown request",
        b"x" * (65 * 1024): "request longer than",
        b"\xff\xfe\n": "not a request",
    }
    for request, error in refused.items():
        replies = ask_raw(m, request)
        assert len(replies) == 1 and replies[0]["ok"] is False and error in replies[0]["error"], (request[:40], replies)
    assert ask_raw(m, b'{"op": "status"}\n')[0]["ok"] is True
    assert (m.path / "h.bin").read_bytes() == data


def test_a_stopped_daemon_gets_one_line_not_a_hang(mounts: Mounts, nginx: Server) -> None:
    """The commands ask the mount (a stat, the root's xattr) before the socket: a daemon that
    does not answer must not hang them for good (Ctrl-C cannot interrupt a FUSE request)."""
    import signal

    m = mounts.mount([nginx.put("ctl/stop.bin", b"s" * 1000)])
    pid = m.pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        done = run_rangefs("status", m.path, timeout=120)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert_one_line_error(done, str(m.path), "does not answer")
    assert status_json(m.path)["files"][0]["size"] == 1000
