"""Headers and secrets through real mounts: --header, --header @FILE, the URL list's header.NAME=,
--netrc-file; a secret read from a file never shows in ps, the log (-v), xattrs, errors or the
cache's files; the user's headers never follow a redirect to another origin."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from faultserver import FaultServer

from rangefs.urllist import parse_url_list

from nginx import AUTH_LOGIN, AUTH_TOKEN
from util import Mount, Mounts, Server, children, run_rangefs, seeded_bytes

DATA = seeded_bytes(3 * 1024 * 1024 + 17, 20)
SECRET = AUTH_TOKEN


def _leaks(m: Mount, secret: str) -> list[str]:
    """Where ``secret`` shows while ``m`` is mounted: argv and environment of the daemon and its
    helper, the log, the cache directory's files, the files' xattrs."""
    found = []
    needle = secret.encode()
    for pid in (m.pid(), *children(m.pid())):
        for what in ("cmdline", "environ"):
            if needle in Path(f"/proc/{pid}/{what}").read_bytes():
                found.append(f"/proc/{pid}/{what}")
    for root, _, names in os.walk(m.cache_dir):
        for name in names:
            path = Path(root, name)
            if not path.is_file():  # the control socket: nothing to read
                continue
            if needle in path.read_bytes():
                found.append(str(path))
    for root, _, names in os.walk(m.path):
        for name in names:
            path = Path(root, name)
            for attr in os.listxattr(path):
                if needle in os.getxattr(path, attr):
                    found.append(f"{path} xattr {attr}")
    return found


def _read_and_check(m: Mount, name: str = "f.bin") -> None:
    assert (m.path / name).read_bytes() == DATA


def test_without_the_header_the_auth_location_refuses_the_mount(mounts: Mounts, nginx: Server) -> None:
    nginx.put("h/f.bin", DATA)
    m = mounts.mount([nginx.url("auth/h/f.bin")], check=False)
    assert m.result is not None and m.result.returncode != 0
    assert "401" in m.result.stderr and "Traceback" not in m.result.stderr


def test_a_header_from_a_file_reaches_probes_and_ranges_and_shows_nowhere(
    mounts: Mounts, nginx: Server, tmp_path: Path
) -> None:
    nginx.put("h/f.bin", DATA)
    headers = tmp_path / "headers"
    headers.write_text(f"# the token\nAuthorization: Bearer {SECRET}\r\n\nX-Extra: yes\n")
    mark = nginx.mark()
    m = mounts.mount([nginx.url("auth/h/f.bin")], "-v", "--header", f"@{headers}")
    _read_and_check(m)
    served = [r for r in nginx.nginx.requests(mark) if r.path.startswith("/auth/")]
    assert {r.method for r in served} == {"HEAD", "GET"} and all(r.status in (200, 206) for r in served)
    assert any(r.range for r in served)  # range GETs carried it too (else 401 and no data)
    assert _leaks(m, SECRET) == []


def test_a_header_given_per_entry_is_percent_decoded_and_shows_nowhere(mounts: Mounts, nginx: Server) -> None:
    nginx.put("h/f.bin", DATA)
    nginx.put("h/g.bin", DATA)
    m = mounts.mount([f"{nginx.url('auth/h/f.bin')} header.Authorization=Bearer%20{SECRET}",
                      f"{nginx.url('h/g.bin')}"], "-v")
    _read_and_check(m)
    _read_and_check(m, "g.bin")
    assert _leaks(m, SECRET) == []
    # the state files keep the URL without the entry's options
    states = b"".join(p.read_bytes() for p in m.cache_dir.rglob("*.state"))
    assert b"auth/h/f.bin" in states


def test_netrc_logs_in_with_basic_auth_and_shows_nowhere(mounts: Mounts, nginx: Server, tmp_path: Path) -> None:
    nginx.put("h/f.bin", DATA)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine elsewhere.example login x password y\nmachine 127.0.0.1\n"
                     f"  login {AUTH_LOGIN}\n  password {SECRET}\n")
    m = mounts.mount([nginx.url("auth/h/f.bin")], "-v", "--netrc-file", str(netrc))
    _read_and_check(m)
    assert _leaks(m, SECRET) == []
    basic = base64.b64encode(f"{AUTH_LOGIN}:{SECRET}".encode())
    assert _leaks(m, basic.decode()) == []


def test_netrc_without_a_file_name_reads_the_homes(
    mounts: Mounts, nginx: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nginx.put("h/f.bin", DATA)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text(f"default login {AUTH_LOGIN} password {SECRET}\n")
    monkeypatch.setenv("HOME", str(home))
    m = mounts.mount([nginx.url("auth/h/f.bin")], "--netrc")
    _read_and_check(m)


def test_the_users_headers_do_not_follow_a_redirect_to_another_origin(mounts: Mounts, nginx: Server) -> None:
    with FaultServer() as listed, FaultServer() as other:
        other.put("/f.bin", DATA)
        listed.put("/f.bin", b"", redirect=(302, other.url("/f.bin")))
        secret_names = ("authorization", "cookie", "x-entry", "x-global")
        m = mounts.mount(
            [f"{listed.url('/f.bin')} header.X-Entry=entry-{SECRET}"],
            "--header", f"Authorization: Bearer {SECRET}", "--header", "Cookie: session=1",
            "--header", "X-Global: 1",
        )
        _read_and_check(m)
        first = listed.requests
        assert first and all(r.header("Authorization") == f"Bearer {SECRET}" for r in first)
        assert all(r.header("X-Entry") == f"entry-{SECRET}" for r in first)
        moved = other.requests
        assert {r.method for r in moved} >= {"HEAD", "GET"}
        for record in moved:
            sent = {name.lower() for name in record.headers}
            assert not sent & set(secret_names), f"{record.method} {record.path} carried {sent & set(secret_names)}"


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("X-Bad Name: 1", "invalid header name"),
        ("NoColon", "expected 'Name: value'"),
        ("Range: bytes=0-1", "set by rangefs itself"),
        ("X-A: 1\r\nX-B: 2", "holds a line break"),
    ],
)
def test_a_bad_header_argument_is_one_line(argument: str, expected: str, tmp_path: Path) -> None:
    done = run_rangefs("mount", tmp_path / "urls", tmp_path, "--header", argument)
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr


def test_a_bad_headers_file_names_the_file_and_line_and_never_the_value(tmp_path: Path) -> None:
    headers = tmp_path / "headers"
    headers.write_bytes(f"Authorization: Bearer {SECRET}\nX-Token: a\x01{SECRET}\n".encode())
    done = run_rangefs("mount", tmp_path / "urls", tmp_path, "--header", f"@{headers}")
    assert done.returncode != 0 and done.stderr.count("\n") == 1
    assert f"headers file '{headers}' line 2" in done.stderr and "X-Token" in done.stderr
    assert SECRET not in done.stderr
    missing = run_rangefs("mount", tmp_path / "urls", tmp_path, "--header", f"@{tmp_path / 'nope'}")
    assert missing.returncode != 0 and "cannot read headers file" in missing.stderr


def test_a_bad_netrc_names_the_file_and_line_and_never_a_token(tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine a login b password c\nmachine\n")
    done = run_rangefs("mount", tmp_path / "urls", tmp_path, "--netrc-file", netrc)
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and f"'{netrc}' line" in done.stderr
    netrc.write_text(f"machine a login b password c {SECRET}\n")
    done = run_rangefs("mount", tmp_path / "urls", tmp_path, "--netrc-file", netrc)
    assert done.returncode != 0 and SECRET not in done.stderr and "Traceback" not in done.stderr


def test_url_list_header_options() -> None:
    entries = parse_url_list(f"http://h/a header.X-Token=a%20b%25{SECRET} grow=yes\n")
    assert entries[0].headers == (("x-token", f"a b%{SECRET}"),) and entries[0].option("grow") == "yes"
    assert SECRET not in repr(entries[0])
    for line, reason in [
        (f"http://h/a header.X-Token=a%0D%0A{SECRET}", "line break"),
        ("http://h/a header.Bad(Name=1", "invalid header name"),
        ("http://h/a header.Host=x", "set by rangefs itself"),
        ("http://h/a header.X=1 header.x=2", "given twice"),
        ("http://h/a header.X=%C3%A9", "non-ASCII"),
    ]:
        with pytest.raises(Exception) as caught:
            parse_url_list(line + "\n", "urls")
        assert "urls line 1" in str(caught.value) and reason in str(caught.value), str(caught.value)
        assert SECRET not in str(caught.value)


def test_headers_for_a_url_and_for_what_its_probe_found() -> None:
    from rangefs.auth import NetrcLogin
    from rangefs.origin import Origin, OriginConfig
    from rangefs.remote import RemoteFile

    logins = (NetrcLogin("h", "me", "pw"), NetrcLogin(None, "any", "one"))
    origin = Origin(OriginConfig(headers=(("X-A", "1"),), netrc=logins))
    origin.entry_headers["http://h/a"] = (("X-E", "2"),)
    basic = "Basic " + base64.b64encode(b"me:pw").decode()
    assert origin.headers_for("http://h/a") == (("X-A", "1"), ("Authorization", basic), ("X-E", "2"))
    assert origin.headers_for("http://u:p@h/b") == (("X-A", "1"),)  # the URL's own user info wins over netrc
    default = "Basic " + base64.b64encode(b"any:one").decode()
    assert origin.headers_for("http://other/b") == (("X-A", "1"), ("Authorization", default))
    same = origin.with_user_headers("http://h/a", RemoteFile("http://h:80/moved", 1, None, None))
    assert same.headers == origin.headers_for("http://h/a")
    assert origin.with_user_headers("http://h/a", RemoteFile("https://h/a", 1, None, None)).headers == ()
    assert SECRET not in repr(OriginConfig(headers=(("A", SECRET),), proxy=f"http://u:{SECRET}@p:1"))
    # An Authorization given outright goes before netrc's login, as in curl.
    origin.entry_headers["http://h/c"] = (("authorization", "Bearer t"),)
    assert origin.headers_for("http://h/c") == (("X-A", "1"), ("authorization", "Bearer t"))


def test_the_lean_client_sends_one_authorization() -> None:
    import httpx

    from rangefs.http11 import _request_headers

    lines = _request_headers(httpx.URL("http://u:p@h/x"), {"Authorization": "Bearer t"})
    assert [value for name, value in lines if name == "Authorization"] == ["Bearer t"]


def test_the_proxy_map_follows_curls_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from rangefs.netconfig import proxy_map

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert proxy_map(None) == {}
    monkeypatch.setenv("HTTPS_PROXY", "http://p:1")
    monkeypatch.setenv("no_proxy", "a.example")
    assert proxy_map(None) == {"https://": "http://p:1", "all://*a.example": None}
    assert proxy_map("http://q:2") == {"all://": "http://q:2", "all://*a.example": None}
    monkeypatch.setenv("no_proxy", "*")
    assert proxy_map("http://q:2") == {} and proxy_map(None) == {}


def test_a_secret_in_a_malformed_line_is_never_shown() -> None:
    """An unencoded space in an entry's header value, or a headers-file line without its colon,
    leaves the secret where a field or a name is expected: errors name the place, not the text."""
    from rangefs.auth import parse_header_line
    from rangefs.errors import RangefsError
    from rangefs.urllist import parse_url_list

    secret = "s3cr3t-token-9f"
    for text in (f"http://h/a a.bin header.authorization=Bearer {secret}\n",
                 f"http://h/a a.bin header.x-token=a b{secret}\n"):
        with pytest.raises(RangefsError) as line_error:
            parse_url_list(text, "urls.txt")
        assert secret not in str(line_error.value) and "line 1" in str(line_error.value)
    for line in (f"Authorization Bearer {secret}:x", f"X-{secret} Token: 1"):
        with pytest.raises(RangefsError) as header_error:
            parse_header_line(line, "headers.txt line 1")
        assert secret not in str(header_error.value)


def test_a_proxy_for_https_only_is_decided_per_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    """http://h and https://h share a host: with only HTTPS_PROXY set, the first one asked about
    must not decide for the other (the https ranges would skip the proxy)."""
    import httpx
    import trio

    from rangefs.origin import Origin

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")

    async def main() -> None:
        async with Origin() as origin:
            assert origin._is_direct(httpx.URL("http://h.example/a"))
            assert not origin._is_direct(httpx.URL("https://h.example/a"))

    trio.run(main)
