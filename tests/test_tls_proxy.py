"""TLS and proxies through real mounts: a private CA (--ca-bundle), a server that requires a client
certificate (--client-cert/--client-key), and a forward proxy on loopback that both HTTP clients
(probes through httpx, range GETs) go through: HTTP_PROXY (absolute-form), HTTPS_PROXY (CONNECT,
with proxy credentials), --proxy, and NO_PROXY that keeps requests direct."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fwdproxy import ForwardProxy
from tlsproxy import TlsProxy, private_ca

from util import Mount, Mounts, Server, seeded_bytes

DATA = seeded_bytes(5 * 1024 * 1024 + 3, 21)
PROXY_SECRET = "proxy-pw-7d1e"
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The proxy variables unset (the CLI's subprocesses inherit os.environ)."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return private_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def https(nginx: Server, ca: dict[str, Path]) -> Iterator[TlsProxy]:
    """nginx behind https with the private CA's server certificate, requiring its client certificate."""
    with TlsProxy(nginx.nginx.port, ca["server_cert"], ca["server_key"], client_ca=ca["ca"]) as proxy:
        yield proxy


def _text_under(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())


def _read(m: Mount) -> None:
    assert (m.path / "f.bin").read_bytes() == DATA


def test_a_client_certificate_from_a_private_ca(
    mounts: Mounts, nginx: Server, https: TlsProxy, ca: dict[str, Path], no_proxy_env: pytest.MonkeyPatch
) -> None:
    nginx.put("tls/f.bin", DATA)
    url = https.url("/tls/f.bin")
    tls = ["--ca-bundle", str(ca["ca"]), "--client-cert", str(ca["client_cert"]), "--client-key", str(ca["client_key"])]
    m = mounts.mount([url], *tls)
    _read(m)
    assert https.handshakes >= 2  # the probe (httpx) and the range GETs (the lean client in the helper)

    unknown_ca = mounts.mount([url], "--retries", "0", check=False)
    assert unknown_ca.result is not None and unknown_ca.result.returncode != 0
    assert "certificate verify failed" in unknown_ca.result.stderr

    no_cert = mounts.mount([url], "--retries", "0", "--ca-bundle", str(ca["ca"]), check=False)
    assert no_cert.result is not None and no_cert.result.returncode != 0
    assert "Traceback" not in no_cert.result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ca-bundle", "/nonexistent/ca.pem"], "--ca-bundle '/nonexistent/ca.pem'"),
        (["--client-key", "/x"], "--client-key needs --client-cert"),
        (["--client-cert", "/etc/hostname"], "--client-cert '/etc/hostname'"),
        (["--proxy", "ftp://h:1"], "--proxy: expected"),
        (["--proxy", "http://u:pw@[::1"], "--proxy: not a URL"),
    ],
)
def test_bad_tls_and_proxy_arguments_are_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    from util import run_rangefs

    done = run_rangefs("mount", tmp_path / "urls", tmp_path, *args)
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
    assert "pw" not in done.stderr.replace("--proxy", "")


def test_http_proxy_carries_probes_and_ranges(mounts: Mounts, nginx: Server, no_proxy_env: pytest.MonkeyPatch) -> None:
    nginx.put("px/f.bin", DATA)
    with ForwardProxy() as proxy:
        no_proxy_env.setenv("HTTP_PROXY", proxy.url)
        mark = nginx.mark()
        m = mounts.mount([nginx.url("px/f.bin")])
        _read(m)
        methods = proxy.methods()
        served = [r for r in nginx.nginx.requests(mark) if r.path == "/px/f.bin"]
        assert "HEAD" in methods and "GET" in methods
        assert len(methods) == len(served)  # every request nginx served came through the proxy
        assert all(target.startswith("http://127.0.0.1:") for _, target in proxy.requests)  # absolute-form
        m.unmount()

        # NO_PROXY keeps them direct
        no_proxy_env.setenv("NO_PROXY", "127.0.0.1")
        before = len(proxy.requests)
        direct = mounts.mount([nginx.url("px/f.bin")], cache_dir=mounts.tmp / "cache2")
        _read(direct)
        assert len(proxy.requests) == before


def test_the_proxy_option_replaces_the_variables(
    mounts: Mounts, nginx: Server, no_proxy_env: pytest.MonkeyPatch
) -> None:
    nginx.put("px/f.bin", DATA)
    with ForwardProxy() as proxy, ForwardProxy() as unused:
        no_proxy_env.setenv("HTTP_PROXY", unused.url)
        m = mounts.mount([nginx.url("px/f.bin")], "--proxy", proxy.url)
        _read(m)
        assert {"HEAD", "GET"} <= set(proxy.methods()) and unused.requests == []
        m.unmount()

        # NO_PROXY still holds with --proxy (as curl)
        no_proxy_env.setenv("no_proxy", "example.org,127.0.0.1")
        before = len(proxy.requests)
        direct = mounts.mount([nginx.url("px/f.bin")], "--proxy", proxy.url, cache_dir=mounts.tmp / "cache2")
        _read(direct)
        assert len(proxy.requests) == before and unused.requests == []


def test_https_through_a_connect_tunnel_with_proxy_credentials(
    mounts: Mounts, nginx: Server, ca: dict[str, Path], no_proxy_env: pytest.MonkeyPatch
) -> None:
    nginx.put("tls/f.bin", DATA)
    with (
        TlsProxy(nginx.nginx.port, ca["server_cert"], ca["server_key"]) as https,
        ForwardProxy(credentials=f"user:{PROXY_SECRET}") as proxy,
    ):
        no_proxy_env.setenv("https_proxy", proxy.url)
        m = mounts.mount([https.url("/tls/f.bin")], "-v", "--ca-bundle", str(ca["ca"]))
        _read(m)
        assert proxy.refused == 0 and proxy.requests and set(proxy.methods()) == {"CONNECT"}
        assert https.handshakes == len(proxy.requests)  # every https connection came through the tunnel
        assert PROXY_SECRET.encode() not in _text_under(m.cache_dir)  # the log included
        assert PROXY_SECRET.encode() not in Path(f"/proc/{m.pid()}/cmdline").read_bytes()
    assert os.environ["https_proxy"]  # (the daemon's environment is the user's own, as given)


def test_a_proxy_that_refuses_the_credentials_fails_the_mount_without_showing_them(
    mounts: Mounts, nginx: Server, no_proxy_env: pytest.MonkeyPatch
) -> None:
    nginx.put("px/f.bin", DATA)
    with ForwardProxy(credentials=f"user:{PROXY_SECRET}") as proxy:
        wrong = proxy.url.replace(PROXY_SECRET, "wrong-" + PROXY_SECRET[::-1])
        m = mounts.mount([nginx.url("px/f.bin")], "--retries", "0", "-v", "--proxy", wrong, check=False)
        assert m.result is not None and m.result.returncode != 0 and proxy.refused >= 1
        assert "proxy" in m.result.stderr and "Traceback" not in m.result.stderr, m.result.stderr
        assert PROXY_SECRET[::-1] not in m.result.stderr
        assert PROXY_SECRET[::-1].encode() not in _text_under(m.cache_dir)
