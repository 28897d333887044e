"""Start-up and shutdown stay bounded whatever the servers do: dead hosts, stuck fetches, a
mount command that dies, readers that go away while their reads wait on the network."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultserver import FaultServer, RequestRecord

from util import RANGEFS, Mounts, Server, alive, children, fstype, run_rangefs, seeded_bytes, wait_until

MiB = 1 << 20


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
    assert f"{m.url_list} line 1: " in error and f"127.0.0.1:{port}" in error
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
    server.put("/stuck.bin", seeded_bytes(4 * MiB, seed=62), hang=True)
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
    assert not alive(daemon) and not any(alive(pid) for pid in helpers)
    assert all(r.closed_at is not None for r in gets(server, "/stuck.bin")), "a stuck fetch was left open"
