"""A remount with the server down, through a real mount and an nginx of the test's own (so that
it can be stopped and started again on the same port): the mount goes on from the catalog with
one warning for the server, cached bytes are read, missing ones fail with EIO, and reads work
again when the server is back, without a remount. A URL the cache never saw still fails."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from nginx import Nginx
from util import Mounts, run_rangefs, seeded_bytes, wait_until

MiB = 1024 * 1024
FAST = ("--retries", "1", "--retry-time", "2", "--revalidate-interval", "0")


@pytest.fixture
def own_nginx(tmp_path: Path) -> Iterator[tuple[Nginx, Path]]:
    www = tmp_path / "www"
    www.mkdir()
    server = Nginx(tmp_path / "nginx", www)
    (tmp_path / "nginx").mkdir()
    server.start()
    try:
        yield server, www
    finally:
        server.stop()


def _log_since(path: Path, offset: int) -> str:
    return path.read_bytes()[offset:].decode()


@pytest.mark.timeout(180)
def test_a_remount_with_the_server_down_serves_the_cache_and_recovers_without_a_remount(
    mounts: Mounts, own_nginx: tuple[Nginx, Path], tmp_path: Path
) -> None:
    server, www = own_nginx
    data = {name: seeded_bytes(MiB + i, seed=300 + i) for i, name in enumerate(("a", "b", "c"))}
    for name, body in data.items():
        (www / f"{name}.bin").write_bytes(body)
    m = mounts.mount([server.url(f"{name}.bin") for name in data], *FAST)
    assert (m.path / "a.bin").read_bytes() == data["a"]  # cached; b and c are not
    assert (m.path / "c.bin").read_bytes()[:10] == data["c"][:10]
    assert m.unmount().returncode == 0
    port = server.port
    server.stop()

    log = m.cache_dir / "rangefs.log"
    mark = log.stat().st_size
    mounts.remount(m, *FAST)
    assert m.result is not None and m.result.stderr.count("cannot be reached") == 1  # the mount command warns
    assert sorted(p.name for p in m.path.iterdir()) == ["a.bin", "b.bin", "c.bin"]
    assert (m.path / "b.bin").stat().st_size == len(data["b"])
    for _ in range(3):  # each open revalidates (interval 0): the server is down, the cache serves
        assert (m.path / "a.bin").read_bytes() == data["a"]
    with (m.path / "c.bin").open("rb") as partly:
        assert partly.read(10) == data["c"][:10]
    with pytest.raises(OSError) as caught:
        (m.path / "b.bin").read_bytes()
    assert caught.value.errno == errno.EIO
    text = _log_since(log, mark)
    assert text.count("cannot be reached (") == 1, text  # one warning for the server, not one per file
    assert "cannot revalidate" not in text  # nor one per open

    again = Nginx(tmp_path / "nginx", www, port=port)  # the same port: the URLs stay the same
    again.start()
    try:
        assert (m.path / "b.bin").read_bytes() == data["b"]  # no remount needed
        assert wait_until(lambda: (m.path / "c.bin").read_bytes() == data["c"] and "answers again" in
                          _log_since(log, mark), timeout=30)
    finally:
        again.stop()


@pytest.mark.timeout(180)
def test_a_url_the_cache_never_saw_still_fails_a_mount_with_its_server_down(
    mounts: Mounts, own_nginx: tuple[Nginx, Path]
) -> None:
    server, www = own_nginx
    (www / "known.bin").write_bytes(b"known")
    (www / "new.bin").write_bytes(b"new")
    m = mounts.mount([server.url("known.bin")], *FAST)
    assert (m.path / "known.bin").read_bytes() == b"known"
    assert m.unmount().returncode == 0
    server.stop()
    m.url_list.write_text(f"{server.url('known.bin')}\n{server.url('new.bin')}\n")
    done = run_rangefs("mount", m.url_list, m.path, "--cache-dir", m.cache_dir, *FAST)
    assert done.returncode == 1 and "line 2" in done.stderr and not m.mounted()
    mounts.remount(m, *FAST, "--skip-unavailable")
    assert sorted(p.name for p in m.path.iterdir()) == ["known.bin"]
    assert (m.path / "known.bin").read_bytes() == b"known"


@pytest.mark.timeout(180)
def test_a_long_list_remounts_from_the_catalog_with_its_server_down(
    mounts: Mounts, own_nginx: tuple[Nginx, Path], tmp_path: Path
) -> None:
    server, www = own_nginx
    count = 300  # more than the mount probes itself: the catalog answers, nothing is asked
    for i in range(count):
        (www / f"f{i}").write_bytes(f"file {i}".encode())
    m = mounts.mount([f"{server.url(f'f{i}')} f{i}" for i in range(count)], *FAST)
    assert wait_until(lambda: (m.cache_dir / "catalog.json").exists()
                      and (m.cache_dir / "catalog.json").read_text().count('"size"') == count, timeout=60)
    assert (m.path / "f1").read_bytes() == b"file 1"
    assert m.unmount().returncode == 0
    server.stop()

    log = m.cache_dir / "rangefs.log"
    mark = log.stat().st_size
    mounts.remount(m, *FAST)
    assert len(list(m.path.iterdir())) == count
    for _ in range(3):
        assert (m.path / "f1").read_bytes() == b"file 1"
    for name in ("f2", "f3"):
        with pytest.raises(OSError) as caught:
            (m.path / name).read_bytes()
        assert caught.value.errno == errno.EIO
    assert _log_since(log, mark).count("cannot be reached (") == 1
