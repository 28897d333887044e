"""A list of 10,000 URLs through a real mount: the mount returns before every URL is probed,
``ls -l`` of the whole tree answers from the probes (waited for where needed), and a remount
lists the tree from the catalog without a request at mount time. Times are printed, not
asserted (they go in the benchmark)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from util import Mounts, Server, wait_until

COUNT = 10_000
PER_DIR = 100


def _big_tree(nginx: Server) -> list[str]:
    """10,000 small files on the server (made once per session), and their list lines."""
    root = nginx.www / "big"
    lines = []
    for i in range(COUNT):
        rel = f"big/d{i // PER_DIR:03d}/f{i:05d}"
        path = nginx.www / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(str(i).encode() * 3)
        lines.append(f"{nginx.url(rel)} d{i // PER_DIR:03d}/f{i:05d}")
    assert root.is_dir()
    return lines


def _ls(path: Path) -> tuple[float, list[str]]:
    started = time.monotonic()
    done = subprocess.run(["ls", "-lR", str(path)], capture_output=True, text=True, timeout=120, check=True)
    return time.monotonic() - started, done.stdout.splitlines()


def _heads(nginx: Server, since: int) -> int:
    return sum(1 for r in nginx.nginx.requests(since) if r.path.startswith(("/big/", "/mid/"))
               and r.method in ("HEAD", "GET"))


@pytest.mark.timeout(300)
def test_a_list_of_10000_urls_mounts_before_its_probes_end_and_remounts_from_the_catalog(
    mounts: Mounts, nginx: Server
) -> None:
    lines = _big_tree(nginx)
    mark = nginx.mark()
    started = time.monotonic()
    m = mounts.mount(lines)
    mounted = time.monotonic() - started
    probed_at_mount = _heads(nginx, mark)
    # The last directory's files are the last in the list: a listing waits for their probes.
    last = subprocess.run(["ls", "-l", str(m.path / "d099")], capture_output=True, text=True, timeout=60, check=True)
    assert [line.split()[4] for line in last.stdout.splitlines()[1:]] == ["12"] * PER_DIR  # "99xx" * 3
    seconds, listing = _ls(m.path)
    print(f"\nfirst mount of {COUNT} URLs: {mounted:.2f}s ({probed_at_mount} probed when it returned); "
          f"ls -lR: {seconds:.2f}s")
    assert probed_at_mount < COUNT  # the mount did not wait for every probe
    sizes = [line.split()[4] for line in listing if line.startswith("-")]
    assert len(sizes) == COUNT
    assert sizes.count("3") == 10  # the files "0".."9", three digits each
    catalog = json.loads((m.cache_dir / "catalog.json").read_text())
    assert len(catalog["files"]) == COUNT
    assert all(len(key) == 32 for key in catalog["files"])  # keys are hashes of the URLs
    assert m.unmount().returncode == 0

    mark = nginx.mark()
    started = time.monotonic()
    mounts.remount(m)
    remounted = time.monotonic() - started
    probed_at_remount = _heads(nginx, mark)
    seconds, listing = _ls(m.path)
    print(f"remount: {remounted:.2f}s ({probed_at_remount} requests at mount); ls -lR: {seconds:.2f}s")
    assert probed_at_remount == 0
    assert _heads(nginx, mark) == 0  # the listing too came from the catalog
    assert len([line for line in listing if line.startswith("-")]) == COUNT
    assert (m.path / "d042" / "f04242").read_bytes() == b"4242" * 3


def test_the_catalog_keeps_no_secret_and_reads_back_what_it_saved(tmp_path: Path) -> None:
    from rangefs import safefs
    from rangefs.catalog import Catalog
    from rangefs.remote import RemoteFile

    safefs.open_cache_dir(tmp_path)
    catalog = Catalog(tmp_path)
    listed = "https://user:SECRET1@example.com/a.bin?token=SECRET2"
    catalog.put(listed, RemoteFile(listed, 10, '"e"', "Tue, 01 Dec 2026 00:00:00 GMT"))
    moved = "https://example.com/b.bin"
    catalog.put(moved, RemoteFile("https://cdn.example.com/b.bin?sig=SECRET3", 20, None, None))  # not saved
    plain = "https://example.com/c.bin"
    catalog.put(plain, RemoteFile("https://cdn.example.com/c.bin", 30, None, None, accept_ranges=False))
    catalog.save()
    text = (tmp_path / "catalog.json").read_text()
    assert "SECRET" not in text
    again = Catalog(tmp_path)
    again.load()
    known = again.get(listed)
    assert known is not None and known.remote == RemoteFile(listed, 10, '"e"', "Tue, 01 Dec 2026 00:00:00 GMT")
    assert again.get(moved) is None  # probed again at every mount instead
    other = again.get(plain)
    assert other is not None and other.remote == RemoteFile("https://cdn.example.com/c.bin", 30, None, None, False)
    (tmp_path / "catalog.json").write_text("{not json")
    broken = Catalog(tmp_path)
    broken.load()  # a damaged catalog counts as empty
    assert broken.get(listed) is None


@pytest.mark.timeout(120)
def test_a_remount_from_the_catalog_revalidates_at_open_once_the_interval_since_the_probe_passed(
    mounts: Mounts, nginx: Server
) -> None:
    count = 300  # more than the mount probes itself: the catalog answers at remount
    urls = [nginx.put(f"mid/f{i}", f"old {i}".encode()) for i in range(count)]
    m = mounts.mount([f"{url} f{i}" for i, url in enumerate(urls)], "--revalidate-interval", "2")
    assert wait_until(lambda: len(json.loads((m.cache_dir / "catalog.json").read_text())["files"]) == count,
                      timeout=60)
    assert (m.path / "f7").read_bytes() == b"old 7"  # now cached
    assert m.unmount().returncode == 0
    nginx.put("mid/f7", b"new 7!")
    os.utime(nginx.www / "mid/f7", (1, 1))  # another Last-Modified, hence ETag
    time.sleep(2.5)  # the interval since the probe has passed
    mark = nginx.mark()
    mounts.remount(m, "--revalidate-interval", "2")
    assert _heads(nginx, mark) == 0  # nothing asked at mount
    assert (m.path / "f7").read_bytes() == b"new 7!"  # the open asked, as the interval says
