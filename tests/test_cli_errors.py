"""Bad input: one clear line on stderr naming the input, a non-zero exit, nothing mounted, no traceback."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from util import Mounts, Server, alive, fstype, run_rangefs, wait_until


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> str:
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("rangefs: ")
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _mount_fails(mounts: Mounts, lines: list[str], *args: str) -> str:
    m = mounts.mount(lines, *args, check=False)
    assert m.result is not None
    assert not m.mounted()
    return m.result.stderr


def test_missing_url_list(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    done = run_rangefs("mount", tmp_path / "nope.txt", tmp_path / "mnt", "--cache-dir", tmp_path / "c")
    assert_one_line_error(done, "nope.txt", "No such file")


def test_url_list_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    done = run_rangefs("mount", tmp_path, tmp_path / "mnt", "--cache-dir", tmp_path / "c")
    assert_one_line_error(done, str(tmp_path), "Is a directory")


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        (["# ok", "http://127.0.0.1/a.bin", "not a url"], ["line 3"]),
        (["ftp://127.0.0.1/a.bin"], ["line 1", "ftp"]),
        (["http://127.0.0.1/a.bin x/y.bin", "http://127.0.0.1/b.bin x/y.bin"], ["line 2", "x/y.bin", "line 1"]),
        (["http://127.0.0.1/a.bin ../escape.bin"], ["line 1", ".."]),
        (["http://127.0.0.1/dir/"], ["line 1", "name"]),
    ],
    ids=["malformed", "scheme", "duplicate", "dotdot", "no-name"],
)
def test_bad_url_list_lines(tmp_path: Path, lines: list[str], words: list[str]) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
    done = run_rangefs("mount", tmp_path / "urls.txt", tmp_path / "mnt", "--cache-dir", tmp_path / "c")
    assert_one_line_error(done, "urls.txt", *words)


def test_mountpoint_missing_or_not_a_directory(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    url_list = mounts.write_list([nginx.put("errors/a.txt", b"a")])
    done = run_rangefs("mount", url_list, tmp_path / "absent", "--cache-dir", tmp_path / "c")
    assert_one_line_error(done, "absent", "does not exist")
    (tmp_path / "file").write_text("")
    done = run_rangefs("mount", url_list, tmp_path / "file", "--cache-dir", tmp_path / "c")
    assert_one_line_error(done, "file", "not a directory")


def test_mountpoint_already_mounted(mounts: Mounts, nginx: Server) -> None:
    m = mounts.mount([nginx.put("errors/b.txt", b"b")])
    done = run_rangefs("mount", m.url_list, m.path, "--cache-dir", m.cache_dir)
    assert_one_line_error(done, str(m.path), "already mounted")
    assert (m.path / "b.txt").read_bytes() == b"b"  # the first mount is untouched


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs: unwritable even for root."""
    path = tmp_path / "ro"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, timeout=30)


def test_unwritable_cache_directory(mounts: Mounts, nginx: Server, read_only_dir: Path) -> None:
    stderr = _mount_fails(mounts, [nginx.put("errors/c.txt", b"c")], "--cache-dir", str(read_only_dir / "cache"))
    assert_one_line_error(subprocess.CompletedProcess([], 1, "", stderr), "cache", "Read-only file system")


def test_cache_directory_under_a_file(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    stderr = _mount_fails(mounts, [nginx.put("errors/d.txt", b"d")], "--cache-dir", str(tmp_path / "plain/cache"))
    assert_one_line_error(subprocess.CompletedProcess([], 1, "", stderr), "plain/cache", "not writable")


def test_url_answering_404_fails_the_mount_naming_it(mounts: Mounts, nginx: Server) -> None:
    lines = [nginx.put("errors/e.txt", b"e"), nginx.url("errors/missing.bin")]
    stderr = _mount_fails(mounts, lines)
    assert_one_line_error(
        subprocess.CompletedProcess([], 1, "", stderr), "line 2", "errors/missing.bin", "404"
    )


def test_skip_unavailable_mounts_the_rest_and_warns(mounts: Mounts, nginx: Server) -> None:
    lines = [nginx.put("errors/f.txt", b"f"), nginx.url("errors/missing.bin"), "http://127.0.0.1:1/closed.bin"]
    m = mounts.mount(lines, "--skip-unavailable", "--retries", "1")
    assert m.result is not None
    warnings = m.result.stderr.splitlines()
    assert len(warnings) == 2 and all(w.startswith("rangefs: warning: ") for w in warnings)
    assert "line 2" in warnings[0] and "404" in warnings[0]
    assert "line 3" in warnings[1] and "cannot connect" in warnings[1]
    assert os.listdir(m.path) == ["f.txt"]


def test_unreachable_url_fails_the_mount_naming_it(mounts: Mounts) -> None:
    stderr = _mount_fails(mounts, ["http://127.0.0.1:1/closed.bin"], "--retries", "1")
    assert_one_line_error(subprocess.CompletedProcess([], 1, "", stderr), "line 1", "127.0.0.1:1", "cannot connect")


def test_credentials_never_appear_in_errors(mounts: Mounts, nginx: Server) -> None:
    url = nginx.url("errors/secret.bin").replace("http://", "http://alice:hunter2@") + "?token=hunter3&id=7"
    stderr = _mount_fails(mounts, [url])
    line = assert_one_line_error(subprocess.CompletedProcess([], 1, "", stderr), "404", "token=***&id=***")
    assert "hunter2" not in line and "hunter3" not in line
    log = (mounts.tmp / "cache" / "rangefs.log").read_text()
    assert "hunter2" not in log and "hunter3" not in log


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--block-size", "3000"], ["block size", "3000"]),
        (["--checkpoint-interval", "-1"], ["-1"]),
        (["--retries", "many"], ["many"]),
        (["--low-speed-limit", "fast"], ["--low-speed-limit", "fast"]),
        (["--low-speed-time", "-3"], ["--low-speed-time", "-3"]),
        (["--no-such-option"], ["--no-such-option"]),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], words: list[str]) -> None:
    (tmp_path / "urls.txt").write_text("http://127.0.0.1/a\n")
    done = run_rangefs("mount", tmp_path / "urls.txt", tmp_path, *args)
    assert_one_line_error(done, *words)


def test_unmount_of_something_else(tmp_path: Path) -> None:
    assert_one_line_error(run_rangefs("unmount", tmp_path), str(tmp_path), "not a rangefs mount")


def test_failed_mount_leaves_no_daemon(mounts: Mounts) -> None:
    _mount_fails(mounts, ["http://127.0.0.1:1/closed.bin"], "--retries", "0")
    assert _rangefs_daemons(str(mounts.made[-1].path)) == set()


def test_stale_mount_is_reported(mounts: Mounts, nginx: Server) -> None:
    m = mounts.mount([nginx.put("errors/g.txt", b"g")])
    pid = m.pid()
    os.kill(pid, 9)
    assert wait_until(lambda: not alive(pid), timeout=10)
    assert fstype(m.path) == "fuse.rangefs"  # still in the mount table, its daemon gone
    done = run_rangefs("mount", m.url_list, m.path, "--cache-dir", m.cache_dir)
    assert_one_line_error(done, str(m.path), "stale", "rangefs unmount")
    assert run_rangefs("unmount", m.path).returncode == 0
    assert fstype(m.path) is None


def _rangefs_daemons(mountpoint: str) -> set[int]:
    """Live rangefs processes whose command line names ``mountpoint``."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"rangefs\0mount" in cmdline and mountpoint.encode() in cmdline and alive(int(entry)):
                found.add(int(entry))
    return found
