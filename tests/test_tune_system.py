"""System-wide settings change only with --tune-system; reads are byte-exact either way.

``fs.pipe-max-size`` is one value for the whole machine: these tests set it low and put it
back. fusectl is checked in a mount namespace of the test's own, where it is unmounted first,
so no other mount on the machine loses it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rangefs import kernel

from util import RANGEFS, Mounts, Server, end_process, seeded_bytes

MiB = 1 << 20
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")
LOW = 1024 * 1024  # the kernel's default: too small for a spliced reply of 1 MiB


@pytest.fixture
def low_pipe_max_size() -> Iterator[None]:
    original = PIPE_MAX_SIZE.read_text()
    PIPE_MAX_SIZE.write_text(f"{LOW}\n")
    try:
        yield
    finally:
        PIPE_MAX_SIZE.write_text(original)


def _read_cold_then_warm(path: Path) -> tuple[bytes, bytes]:
    """The file read twice, the second time after its pages left the page cache of the mount
    (the daemon answers again, from its cache file, which is then in the page cache)."""
    cold = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return cold, path.read_bytes()


@pytest.mark.usefixtures("low_pipe_max_size")
def test_without_tune_system_pipe_max_size_stays_and_replies_are_copied(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(8 * MiB + 4321, seed=163)
    m = mounts.mount([nginx.put("tune/copied.bin", data)], "--no-passthrough")
    assert _read_cold_then_warm(m.path / "copied.bin") == (data, data)
    assert m.unmount().returncode == 0
    log = (m.cache_dir / "rangefs.log").read_text()
    # The value is the machine's: a rangefs from before --tune-system, mounted by another test
    # meanwhile, raises it too. What this daemon did is in its log: it never wrote the value, and
    # it spliced no reply through a pipe it was not allowed.
    assert "raised fs.pipe-max-size" not in log
    assert "replies to reads are copied" in log or int(PIPE_MAX_SIZE.read_text()) > LOW


@pytest.mark.usefixtures("low_pipe_max_size")
def test_tune_system_raises_pipe_max_size_and_replies_are_spliced(mounts: Mounts, nginx: Server) -> None:
    data = seeded_bytes(8 * MiB + 4321, seed=164)
    m = mounts.mount([nginx.put("tune/spliced.bin", data)], "--no-passthrough", "--tune-system")
    assert _read_cold_then_warm(m.path / "spliced.bin") == (data, data)
    assert m.unmount().returncode == 0
    log = (m.cache_dir / "rangefs.log").read_text()
    assert "replies to reads are spliced" in log  # raised by us, or by another process meanwhile
    assert int(PIPE_MAX_SIZE.read_text()) == 2 * MiB


_IN_NAMESPACE = """
set -e
umount /sys/fs/fuse/connections 2>/dev/null || true
if grep -q ' - fusectl ' /proc/self/mountinfo; then echo "fusectl still mounted" >&2; exit 3; fi
trap 'fusermount3 -u -z "$MNT" 2>/dev/null || true' EXIT
"$@"
grep " $MNT " /proc/self/mountinfo | grep -o 'rangefs:[0-9]*' | cut -d: -f2 > "$OUT.pid"
cat "$MNT/f.bin" > "$OUT.copy"
(grep -c ' - fusectl ' /proc/self/mountinfo || true) > "$OUT.fusectl"
"$PY" -m rangefs unmount "$MNT"
"""


@pytest.mark.parametrize("tune", [False, True], ids=["default", "tune-system"])
def test_fusectl_is_mounted_only_with_tune_system(mounts: Mounts, nginx: Server, tmp_path: Path, tune: bool) -> None:
    data = seeded_bytes(3 * MiB, seed=165)
    url_list = mounts.write_list([f"{nginx.put('tune/f.bin', data)} f.bin"])
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    command = [*RANGEFS, "mount", str(url_list), str(mnt), "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OUT": str(out), "MNT": str(mnt), "PY": sys.executable}
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", _IN_NAMESPACE, "ns", *command,
             *(["--tune-system"] if tune else [])],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert done.returncode == 0, done.stderr
        assert Path(f"{out}.copy").read_bytes() == data
        assert Path(f"{out}.fusectl").read_text().strip() == ("1" if tune else "0")
    finally:
        pid_file = Path(f"{out}.pid")
        if pid_file.exists() and pid_file.read_text().strip():
            end_process(int(pid_file.read_text()))


@pytest.mark.parametrize("tune", [False, True], ids=["default", "tune-system"])
def test_pipe_max_size_is_written_only_with_tune_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        tune: bool) -> None:
    """The same decision without the machine's value, which other tests may change meanwhile."""
    limit = tmp_path / "pipe-max-size"
    limit.write_text(f"{LOW}\n")

    def refused(fd: int, command: int, arg: int = 0) -> int:
        raise PermissionError(errno.EPERM, "Operation not permitted")  # no CAP_SYS_RESOURCE

    monkeypatch.setattr(kernel, "_PIPE_MAX_SIZE", limit)
    monkeypatch.setattr(kernel.fcntl, "fcntl", refused)
    assert kernel.allow_splice_pipes(tune) is tune
    assert int(limit.read_text()) == (2 * MiB if tune else LOW)
