"""Real mounts against slow and hostile origins: trickles, busy hosts, bad certificates, redirects, secrets.

Each test reads through a real rangefs mount (the CLI, a daemon, the kernel) from FaultServer,
nginx or a small server made here, and checks what the reader got and what the servers saw.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from faultserver import FaultServer
from tlsproxy import TlsProxy, self_signed_certificate

from rangefs.errors import BadResponse, RemoteUnreachable
from rangefs.origin import Origin, OriginConfig, RemoteFile

from util import Mounts, Server, seeded_bytes, wait_until

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20
# One FUSE read of 4 KiB at offset 0, no kernel readahead: one fetch, so its failure is one EIO.
READ_ONE_PAGE = (
    "import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
    "os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM); os.pread(fd, 4096, 0)"
)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


@pytest.fixture
def tls(server: FaultServer, certificate: tuple[Path, Path]) -> Iterator[TlsProxy]:
    """https://127.0.0.1:PORT in front of the fault server, with a self-signed certificate."""
    with TlsProxy(server.port, *certificate) as proxy:
        yield proxy


def one_line_error(m_result: subprocess.CompletedProcess[str] | None) -> str:
    assert m_result is not None and m_result.returncode != 0
    lines = m_result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rangefs: "), m_result.stderr
    return lines[0]


def read_one_page(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", READ_ONE_PAGE, str(path)], stderr=subprocess.PIPE, text=True)


def xattrs(path: Path) -> str:
    """Every extended attribute of ``path`` with its value, as ``getfattr -d`` shows them."""
    return "".join(f"{name}={os.getxattr(path, name)!r}\n" for name in os.listxattr(path))


# -- redaction --------------------------------------------------------------------------------


def test_every_query_value_is_redacted_whatever_its_name(mounts: Mounts, nginx: Server) -> None:
    url = nginx.put("redact/r.bin", b"redacted\n") + "?code=SECRET1&Policy=SECRET2&p=SECRET3"
    down = "http://127.0.0.1:1/gone.bin?code=SECRET4&p=SECRET5"
    m = mounts.mount([url, down], "-v", "--skip-unavailable", "--retries", "0")

    assert (m.path / "r.bin").read_bytes() == b"redacted\n"
    shown = xattrs(m.path / "r.bin")
    assert "code=***&Policy=***&p=***" in shown
    assert m.unmount().returncode == 0
    assert m.result is not None
    everything = shown + m.result.stderr + (m.cache_dir / "rangefs.log").read_text()
    everything += "".join(p.read_text(errors="replace") for p in (m.cache_dir / "files").glob("*.state"))
    assert "gone.bin?code=***&p=***" in everything  # the unusable URL was reported...
    for secret in ("SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET5"):
        assert secret not in everything  # ...and no value of any URL


# -- slow servers -------------------------------------------------------------------------------


def test_a_trickle_is_cut_by_the_low_speed_limit_and_retried_a_bounded_number_of_times(
    server: FaultServer, mounts: Mounts
) -> None:
    server.put("/trickle.bin", seeded_bytes(256 * 1024, seed=161), rate=1)
    m = mounts.mount([server.url("/trickle.bin")], "--low-speed-time", "1", "--retries", "1")

    started = time.monotonic()
    reader = read_one_page(m.path / "trickle.bin")
    try:
        _, stderr = reader.communicate(timeout=20)  # without the limit, the read lasts 64 Ki seconds
    finally:
        reader.kill()
    assert reader.returncode != 0 and "Errno 5" in stderr, stderr
    assert time.monotonic() - started < 10
    gets = [r for r in server.requests if r.method == "GET"]
    # 1 + --retries attempts per fetch, though each made progress; the kernel may ask twice
    assert len(gets) in (2, 4) and all(r.body_bytes_sent > 0 for r in gets), gets
    assert "too slow: 1 B/s over 1 s (gave up after 2 attempts)" in (m.cache_dir / "rangefs.log").read_text()


def test_a_probe_whose_answer_does_not_come_is_cut_by_the_low_speed_limit(server: FaultServer) -> None:
    server.put("/late.bin", b"x" * 1000, delay=5)  # within --read-timeout, which measures only gaps

    async def probe() -> None:
        async with Origin(OriginConfig(retries=1, low_speed_time=1)) as origin:
            await origin.probe(server.url("/late.bin"))

    started = time.monotonic()
    with pytest.raises(RemoteUnreachable, match=r"too slow: 0 B/s over 1 s \(gave up after 2 attempts\)"):
        trio.run(probe)
    assert time.monotonic() - started < 4


def test_probes_of_one_origin_share_a_bounded_number_of_connections(server: FaultServer) -> None:
    for i in range(24):
        server.put(f"/p{i}.bin", b"p" * 100, delay=0.5)

    async def probe_all() -> None:
        async with Origin(OriginConfig(max_connections=6)) as origin, trio.open_nursery() as nursery:
            for i in range(24):
                nursery.start_soon(origin.probe, server.url(f"/p{i}.bin"))

    trio.run(probe_all)
    assert len(server.requests) == 24
    assert len({r.connection for r in server.requests}) == 6  # kept connections, reused in turn


def test_a_trickling_host_leaves_other_hosts_their_connections(
    server: FaultServer, mounts: Mounts, nginx: Server
) -> None:
    slow = [server.url(f"/slow{i}.bin") for i in range(10)]
    for i in range(10):
        server.put(f"/slow{i}.bin", seeded_bytes(256 * 1024, seed=170 + i), rate=1)
    data = seeded_bytes(3 * MiB, seed=169)
    fast = nginx.put("hostile/fast.bin", data)
    m = mounts.mount([*slow, fast], "--low-speed-time", "3", "--retries", "1")

    readers = [read_one_page(m.path / f"slow{i}.bin") for i in range(10)]
    try:
        # every connection the trickling host may have is taken (more readers than that wait)
        assert wait_until(lambda: len([r for r in server.requests if r.method == "GET"]) >= 8, timeout=10)
        started = time.monotonic()
        assert (m.path / "fast.bin").read_bytes() == data
        assert time.monotonic() - started < 3  # with one limit for all hosts: >= 6 s, until a slot frees
        assert all(reader.poll() is None for reader in readers)  # the trickles still held their slots
        for reader in readers:  # then each ends by the low-speed limit: 2 attempts of 3 s
            _, stderr = reader.communicate(timeout=45)
            assert reader.returncode != 0 and "Errno 5" in stderr, stderr
    finally:
        for reader in readers:
            reader.kill()
            reader.wait()


# -- TLS and redirects ----------------------------------------------------------------------------


def test_a_certificate_that_fails_verification_fails_the_mount_at_once(
    server: FaultServer, tls: TlsProxy, mounts: Mounts
) -> None:
    server.put("/x.bin", b"x" * 1000)
    started = time.monotonic()
    m = mounts.mount([tls.url("/x.bin")], check=False)

    line = one_line_error(m.result)
    assert "line 1" in line and "/x.bin" in line
    assert "certificate verify failed: self-signed certificate" in line
    assert tls.connections == 1  # no retry: another attempt meets the same certificate
    assert not server.requests
    assert time.monotonic() - started < 10


def test_range_gets_stop_at_a_certificate_failure_too(server: FaultServer, tls: TlsProxy) -> None:
    server.put("/x.bin", b"x" * 1000)

    async def fetch() -> None:
        async def sink(offset: int, chunk: bytes) -> None:
            raise AssertionError("no byte may come through a refused certificate")

        async with Origin(OriginConfig(retries=3)) as origin:  # range GETs take the lean client
            await origin.fetch(RemoteFile(tls.url("/x.bin"), 1000, None, None), 0, 1000, sink)

    with pytest.raises(BadResponse, match="certificate verify failed: self-signed certificate"):
        trio.run(fetch)
    assert tls.connections == 1


def test_https_reads_trust_the_certificates_ssl_cert_file_names(
    server: FaultServer, tls: TlsProxy, certificate: tuple[Path, Path], mounts: Mounts,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    data = seeded_bytes(2 * MiB + 5, seed=185)
    server.put("/secure.bin", data)
    m = mounts.mount([tls.url("/secure.bin")])

    assert (m.path / "secure.bin").read_bytes() == data  # range GETs: the lean client, same trust
    ranged = [r for r in server.requests if r.method == "GET"]
    assert ranged and all(r.status == 206 for r in ranged)


def test_an_https_url_redirected_to_http_is_refused_unless_allowed(
    server: FaultServer, tls: TlsProxy, certificate: tuple[Path, Path], mounts: Mounts,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # both clients trust what it names
    data = seeded_bytes(1 * MiB + 9, seed=181)
    server.put("/real.bin", data)
    server.put("/link.bin?code=SECRET", b"", redirect=(302, server.url("/real.bin")))
    url = tls.url("/link.bin?code=SECRET")
    m = mounts.mount([url], check=False)

    line = one_line_error(m.result)
    assert "/link.bin?code=***" in line and "redirected from https to http" in line
    assert "--allow-insecure-redirect" in line and "SECRET" not in line
    # nothing was asked in the clear (the lean client's HEAD, then httpx's, which meets the redirect)
    assert [r.path for r in server.requests] == ["/link.bin?code=SECRET"] * 2

    allowed = mounts.mount([url], "--allow-insecure-redirect")
    assert (allowed.path / "link.bin").read_bytes() == data


def test_credentials_follow_a_redirect_on_the_same_origin_and_only_there(server: FaultServer, mounts: Mounts) -> None:
    auth = "Basic " + base64.b64encode(b"alice:hunter2").decode()
    data, other_data = seeded_bytes(2 * MiB + 3, seed=191), seeded_bytes(1 * MiB + 1, seed=192)
    server.put("/real.bin", data, require_auth=auth)
    # an absolute Location, as most servers send (httpx's join keeps the user info of a relative one)
    server.put("/link.bin", b"", redirect=(302, server.url("/real.bin")), require_auth=auth)
    with FaultServer() as other:
        other.put("/away.bin", other_data)
        server.put("/away.bin", b"", redirect=(302, other.url("/away.bin")), require_auth=auth)
        listed = [server.url(path).replace("http://", "http://alice:hunter2@") for path in ("/link.bin", "/away.bin")]
        m = mounts.mount(listed)

        assert (m.path / "link.bin").read_bytes() == data
        assert (m.path / "away.bin").read_bytes() == other_data
        ranged = [r for r in server.requests if r.path == "/real.bin" and r.method == "GET"]
        assert ranged and all(r.status == 206 and r.header("Authorization") == auth for r in ranged)
        assert all(r.status != 401 for r in server.requests)
        assert other.requests and all(r.header("Authorization") is None for r in other.requests)
