"""Fixtures: a real nginx on 127.0.0.1 and real rangefs mounts, always torn down by pid.

Tests that use these fixtures are marked ``mount``. They need /dev/fuse and fusermount3; when
either is missing they FAIL loudly (a machine without FUSE cannot vouch for rangefs), never skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from faultserver import FaultServer

from nginx import Nginx
from proxy import ThrottleProxy
from util import Mounts, Server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "mounts" in item.fixturenames or "nginx" in item.fixturenames:
            item.add_marker(pytest.mark.mount)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mount: needs FUSE and nginx (real mounts)")


@pytest.fixture(scope="session")
def fuse_available() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: the real-mount tests cannot run on this machine")
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is missing: run `make deps`")


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("nginx")
    www = root / "www"
    www.mkdir()
    with Nginx(root / "conf", www, slow_rate="2m") as server:
        yield Server(server, www)


@pytest.fixture(scope="session")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4 s test video with sound, its index at the end (no +faststart), made with ffmpeg."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    command = [
        "ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=duration=4:size=320x240:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=4", "-c:v", "mpeg4", "-q:v", "5",
        "-c:a", "aac", "-shortest", str(path),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return path


@pytest.fixture
def server() -> Iterator[FaultServer]:
    """The project's misbehaving HTTP server on 127.0.0.1 (a file's ``change`` makes a new ETag)."""
    with FaultServer() as fault_server:
        yield fault_server


@pytest.fixture
def throttled(nginx: Server) -> Iterator[Callable[[float], ThrottleProxy]]:
    """Factory of proxies in front of nginx that serve at most ``rate`` bytes/s per connection."""
    proxies: list[ThrottleProxy] = []

    def make(rate: float) -> ThrottleProxy:
        proxies.append(ThrottleProxy(nginx.nginx.port, rate).__enter__())
        return proxies[-1]

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.stop()


@pytest.fixture
def mounts(tmp_path: Path, fuse_available: None, nginx: Server) -> Iterator[Mounts]:
    factory = Mounts(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()
