"""Probe a URL, fetch byte ranges, retry: what rangefs asks of HTTP servers.

Imports httpx, rangefs.http11 and rangefs.netconfig (the other modules that import httpx); raises
rangefs.errors exceptions, never httpx ones. Probes go through httpx (redirects); range GETs
through the lean client of rangefs.http11 unless the URL goes through a proxy. Every ranged GET
carries ``If-Range`` with the file's validator and ``Accept-Encoding: identity`` (ranges count
bytes of the encoded body), and every answer passes the checks of rangefs.remote before a byte
of it is handed on.

A hostile or failing server is bounded: every attempt is cut when fewer than
``low_speed_limit`` bytes per second arrive over ``low_speed_time`` seconds (a trickle never
trips the read timeout, which only measures gaps), and attempts that each break off early are
held to the same limit together (rangefs.limits); a certificate that fails verification
ends the request at once with its reason; an https URL is not followed to http unless
``allow_insecure_redirect``; the URL's credentials, and the headers the user gives
(rangefs.auth), go only to the listed URL's own origin. TLS trust, client certificates and
proxies come from rangefs.netconfig, the same for both clients.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import httpcore._async.http11 as httpcore_http11
import httpx
import trio

from rangefs.auth import Headers, NetrcLogin, netrc_authorization
from rangefs.errors import BadResponse, HostUnreachable, OriginError, RemoteChanged, RemoteUnreachable
from rangefs.http11 import DEFAULT_PORTS, RangeClient, UnsupportedResponse
from rangefs.limits import LowSpeed, Pace, PerOrigin
from rangefs.netconfig import proxy_map, tls_context
from rangefs.redact import redact_url
from rangefs.remote import (
    Answer,
    RemoteFile,
    Retry,
    check_range_answer,
    raise_for_status,
    refuse_encoding,
    same_version,
    status_line,
    total_from_content_range,
)

log = logging.getLogger(__name__)

# Our own log lines carry redacted URLs; httpx's INFO lines would carry them in full.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

# httpcore reads the socket 64 KiB at a time; multi-MiB range bodies cost several times the CPU
# of 1 MiB reads (measured: docs/experiments.md, 'Socket read size'). The attribute is httpcore's own knob.
_SOCKET_READ_SIZE = 1024 * 1024
if hasattr(httpcore_http11.AsyncHTTP11Connection, "READ_NUM_BYTES"):
    httpcore_http11.AsyncHTTP11Connection.READ_NUM_BYTES = _SOCKET_READ_SIZE

_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes \*/(\d+)$")
_HEAD_REFUSED = {403, 405, 501}  # answers that may mean "no HEAD here" rather than "no file"

Sink = Callable[[int, bytes], Awaitable[None]]
_T = TypeVar("_T")


@dataclass(frozen=True)
class OriginConfig:
    """Bounds on the HTTP side; every wait and every retry loop is finite."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # per read of a body, not per request
    retries: int = 5  # attempts after the first without progress
    retry_max_delay: float = 10.0  # cap of one backoff sleep (a server's Retry-After may ask up to 60 s)
    retry_time: float = 120.0  # seconds of retrying without progress, from the first failure, at most
    max_connections: int = 16  # idle connections kept; callers bound those in use (rangefs.fetcher per origin)
    lean_ranges: bool = True  # range GETs through rangefs.http11 (httpx when False, or behind a proxy)
    # An attempt that gets fewer than low_speed_limit bytes/s over low_speed_time seconds (its
    # head included) is cut and retried, like curl's --speed-limit; so are the attempts of one
    # fetch that each break off sooner (see Pace); 0 in either turns it off.
    # The time outlasts connect_timeout, so a connect that times out says so.
    low_speed_limit: int = 1024
    low_speed_time: float = 15.0
    allow_insecure_redirect: bool = False  # follow https -> http redirects
    # The user's (rangefs.auth): secrets, so out of repr; sent to the listed URL's origin only.
    headers: Headers = field(default=(), repr=False)  # --header, on every URL
    netrc: tuple[NetrcLogin, ...] = field(default=(), repr=False)  # --netrc / --netrc-file logins
    ca_bundle: str | None = None  # trust these CAs instead of the default store
    client_cert: str | None = None  # PEM certificate (and key, unless client_key)
    client_key: str | None = None
    proxy: str | None = field(default=None, repr=False)  # --proxy: may hold user:password


class _Progressed(Retry):
    """An attempt failed after making progress: retry at once, forgiving the failures without
    progress; the ``kept`` failures (slow windows of the read, see Pace) still count."""

    def __init__(self, kept: int) -> None:
        super().__init__("progress made", delay=0)
        self.kept = kept


class _InsecureRedirect(Exception):
    """An https URL redirected to http (raised by the response hook, before the redirect is followed)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


class Origin:
    """An HTTP client for probing and fetching ranges; use as ``async with Origin(cfg) as origin``."""

    def __init__(self, config: OriginConfig | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``transport`` replaces the network, for tests (``httpx.MockTransport``)."""
        self.config = config or OriginConfig()
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._lean: RangeClient | None = None
        self._httpx_only: set[bytes] = set()  # servers whose answers the lean client cannot read
        # per origin (scheme too: a proxy may be set for https only): reached without a proxy
        self._direct: dict[tuple[str, str, int | None], bool] = {}
        # Per listed URL: its URL-list entry's headers (rangefs.urllist's header.NAME=), set by the mount.
        self.entry_headers: dict[str, Headers] = {}
        probes = self.config.max_connections  # per origin: httpx has no cap of its own here
        self._probes = PerOrigin(lambda: trio.CapacityLimiter(probes))

    async def __aenter__(self) -> Origin:
        cfg = self.config
        timeout = httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout, pool=None)
        # No cap on connections in use: one cap over all hosts would let a slow host hold
        # what another needs. Callers bound them (rangefs.fetcher per origin, the mount's probes).
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=cfg.max_connections)
        # One trust store and client certificate for both clients (--ca-bundle, else httpx's: certifi,
        # or SSL_CERT_FILE / SSL_CERT_DIR when set).
        tls = tls_context(cfg.ca_bundle, cfg.client_cert, cfg.client_key)
        mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
        if self._transport is None:  # a test transport replaces the network, proxies included
            for pattern, proxy in proxy_map(cfg.proxy).items():
                mounts[pattern] = None if proxy is None else httpx.AsyncHTTPTransport(verify=tls, limits=limits,
                                                                                       proxy=proxy)
        self._client = httpx.AsyncClient(
            timeout=timeout,
            limits=limits,
            verify=tls,
            follow_redirects=True,
            max_redirects=10,
            headers={"Accept-Encoding": "identity", "User-Agent": "rangefs"},
            transport=self._transport,
            mounts=mounts,
            trust_env=False,  # proxies and trust are set above, from the same variables
            event_hooks={"request": [_user_headers], "response": [self._check_redirect]},
        )
        # Range GETs take the lean client unless a test transport is in the way (or, per URL, a proxy).
        if cfg.lean_ranges and self._transport is None:
            self._lean = RangeClient(cfg.connect_timeout, cfg.read_timeout, max_idle=cfg.max_connections, tls=tls)
        return self

    def headers_for(self, url: str) -> Headers:
        """The user's headers for a listed URL: --header, then netrc's login, then the entry's own.
        As in curl, an Authorization the user gives outright goes before netrc's login."""
        given = self.config.headers + self.entry_headers.get(url, ())
        if any(name.lower() == "authorization" for name, _ in given):
            return given
        return self.config.headers + netrc_authorization(url, self.config.netrc) + self.entry_headers.get(url, ())

    def with_user_headers(self, listed: str, remote: RemoteFile) -> RemoteFile:
        """``remote`` (of the listed URL ``listed``, e.g. read back from the cache directory, where
        headers are never saved) with the user's headers its range GETs need: those of
        ``headers_for(listed)`` when ``remote.url`` is on the listed URL's origin, else none."""
        return dataclasses.replace(remote, headers=_user_headers_for(listed, remote.url, self.headers_for(listed)))

    def _is_direct(self, url: httpx.URL) -> bool:
        """Whether httpx reaches ``url`` without a proxy (then the lean client may take its ranges)."""
        key = _origin_key(url)
        found = self._direct.get(key)
        if found is None:
            # httpx's own choice among its mounts: the proxy map of rangefs.netconfig
            found = self._direct[key] = self.client._transport_for_url(url) is self.client._transport
        return found

    async def _check_redirect(self, resp: httpx.Response) -> None:
        """Refuse to follow an https URL to http (its bytes and cookies would travel in the clear)."""
        if self.config.allow_insecure_redirect or not resp.has_redirect_location or resp.url.scheme != "https":
            return
        target = resp.url.join(resp.headers["Location"])
        if target.scheme == "http":
            raise _InsecureRedirect(str(target))

    @contextmanager
    def _low_speed(self) -> Iterator[LowSpeed]:
        """Run an attempt under the low-speed limit; raises a counting Retry when it is too slow."""
        guard = LowSpeed(self.config.low_speed_limit, self.config.low_speed_time)
        with guard.scope:
            yield guard
        if guard.scope.cancelled_caught:
            raise Retry(guard.describe(), counts=True)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._lean is not None:
            await self._lean.aclose()
            self._lean = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("Origin used outside 'async with'")
        return self._client

    async def probe(self, url: str) -> RemoteFile:
        """Learn size and validator with HEAD, or a ``bytes=0-0`` GET where HEAD is refused.

        Raises:
            RemoteNotFound, RemoteUnreachable, BadResponse.
        """
        async with self._probes.of(origin_of(url)):
            return await self._with_retries(url, lambda: self._probe_once(url))

    async def _probe_once(self, url: str) -> RemoteFile:
        with self._low_speed():
            return await self._probe_unguarded(url)
        raise AssertionError("unreachable")  # _low_speed raises when it cut the attempt short

    async def _probe_unguarded(self, url: str) -> RemoteFile:
        user = self.headers_for(url)
        lean = await self._lean_head(url, user)
        resp: Answer = lean if lean is not None else await self.client.head(url, extensions=_extensions(url, user))
        raise_for_status(url, resp)
        size = resp.headers.get("Content-Length")
        if resp.status_code in _HEAD_REFUSED or not size or not size.isdigit():
            return await self._probe_by_get(url)
        if not 200 <= resp.status_code < 300:
            raise BadResponse(f"{redact_url(url)}: HEAD answered {status_line(resp)}")
        refuse_encoding(url, resp)
        ranges = resp.headers.get("Accept-Ranges", "bytes") != "none"
        if lean is not None:  # not redirected: ranges go to the listed URL
            return RemoteFile(url, int(size), resp.headers.get("ETag"), resp.headers.get("Last-Modified"), ranges,
                              headers=_user_headers_for(url, url, user))
        assert isinstance(resp, httpx.Response)
        return _remote_from(url, resp, int(size), ranges, user)

    async def _lean_head(self, url: str, user: Headers) -> Answer | None:
        """The HEAD through the lean client, where it can take it (no proxy); None for a redirect
        (httpx follows those, with its rules for credentials and the user's headers). An httpx
        HEAD costs several times the CPU, which a list of thousands of URLs pays once per URL
        (docs/internals.md, 'Big lists')."""
        target = httpx.URL(url)
        if self._lean is None or target.netloc in self._httpx_only or not self._is_direct(target):
            return None
        headers = {"Accept-Encoding": "identity", "User-Agent": "rangefs", **dict(user)}  # a user's User-Agent wins
        try:
            async with self._lean.get(url, headers, "HEAD") as resp:
                async for _ in resp.aiter_raw():
                    pass  # a HEAD answer has no body: this only marks it complete, to keep the connection
        except UnsupportedResponse:  # a head that names a chunked body: httpx's to read
            return None
        return None if 300 <= resp.status_code < 400 else resp

    async def _probe_by_get(self, url: str) -> RemoteFile:
        extensions = _extensions(url, self.headers_for(url))
        async with self.client.stream("GET", url, headers={"Range": "bytes=0-0"}, extensions=extensions) as resp:
            raise_for_status(url, resp)
            refuse_encoding(url, resp)
            if resp.status_code == 206:
                size = total_from_content_range(url, resp)
                return _remote_from(url, resp, size, True, self.headers_for(url))
            if resp.status_code == 416:
                match = _CONTENT_RANGE_UNSATISFIED.match(resp.headers.get("Content-Range", ""))
                if match and match.group(1) == "0":
                    return _remote_from(url, resp, 0, True, self.headers_for(url))
            length = resp.headers.get("Content-Length", "")
            if resp.status_code == 200 and length.isdigit():
                return _remote_from(url, resp, int(length), False, self.headers_for(url))
            raise BadResponse(f"{redact_url(url)}: cannot learn the size (GET answered {status_line(resp)})")

    async def fetch(self, remote: RemoteFile, start: int, stop: int, sink: Sink) -> None:
        """Deliver bytes ``start <= i < stop`` of ``remote`` to ``sink(offset, chunk)``, in order.

        A failed attempt resumes from the last byte delivered, so a server that cuts every
        response short still delivers the whole range; attempts that make no progress are
        bounded by ``config.retries``, and so are those that make progress but together stay
        under the low-speed limit (see ``_resuming``).

        Raises:
            RemoteChanged: the server no longer has this version (200 to If-Range, 416, other size).
            RemoteNotFound, RemoteUnreachable, BadResponse.
        """
        once = functools.partial(self._fetch_once, remote, stop=stop)
        await self._resuming(remote, start, stop, once, sink, "resuming")

    async def stream(self, remote: RemoteFile, sink: Sink) -> None:
        """Deliver the whole of ``remote`` to ``sink(offset, chunk)`` in order, from a plain GET.

        For servers that ignore Range: a retry starts the body again from byte 0 and hands on
        only what lies past the bytes already delivered, so attempts that make progress do not
        count against ``config.retries`` unless together they stay under the low-speed limit.

        Raises:
            RemoteChanged: the answer is of another version (validator or size).
            RemoteNotFound, RemoteUnreachable, BadResponse.
        """
        once = functools.partial(self._stream_once, remote)
        await self._resuming(remote, 0, remote.size, once, sink, "streaming again from the start")

    async def _resuming(
        self,
        remote: RemoteFile,
        start: int,
        stop: int,
        once: Callable[[int, Sink], Awaitable[None]],
        sink: Sink,
        how: str,
    ) -> None:
        """Run ``once(position, sink)`` until bytes up to ``stop`` are delivered.

        An attempt that made progress is retried at once and does not count against
        ``config.retries``, unless the attempts of the current window (Pace) stay under the
        low-speed limit: then it counts, and every slow window keeps counting until one brings
        enough, so a trickle by reconnection ends like a slow attempt.
        """
        position = start
        pace = Pace(self.config.low_speed_limit, self.config.low_speed_time, start)

        async def advance(offset: int, chunk: bytes) -> None:
            nonlocal position
            await sink(offset, chunk)
            position = offset + len(chunk)

        async def attempt() -> None:
            before = position
            try:
                await once(position, advance)
            except (Retry, httpx.TransportError) as exc:
                if position == before:
                    raise
                if isinstance(exc, Retry) and exc.counts:
                    pace.cut(position)
                    raise
                log.info("%s: %s at byte %d; %s", redact_url(remote.url), _describe(exc), position, how)
                slow = pace.judge(position)
                if slow is not None:
                    raise Retry(slow, counts=True) from None
                raise _Progressed(pace.slow) from None

        while position < stop:
            await self._with_retries(remote.url, attempt)

    async def _stream_once(self, remote: RemoteFile, skip: int, sink: Sink) -> None:
        received = 0
        with self._low_speed() as speed:
            extensions = _extensions(remote.url, remote.headers)
            async with self.client.stream("GET", remote.url, extensions=extensions) as resp:
                raise_for_status(remote.url, resp)
                if resp.status_code != 200:
                    raise BadResponse(f"{redact_url(remote.url)}: answered {status_line(resp)} to a GET")
                length = resp.headers.get("Content-Length")
                if not same_version(remote, resp) or (length is not None and length != str(remote.size)):
                    raise RemoteChanged(f"{redact_url(remote.url)}: the file is not the version being read")
                refuse_encoding(remote.url, resp)
                async for chunk in resp.aiter_raw():
                    speed.feed(len(chunk))
                    end = received + len(chunk)
                    if end > skip:
                        piece = chunk[max(0, skip - received) : remote.size - received]
                        if piece:
                            await sink(max(skip, received), piece)
                    received = end
        if received < remote.size:
            raise Retry(f"body ended at byte {received}, expected {remote.size}")

    async def _fetch_once(self, remote: RemoteFile, start: int, sink: Sink, *, stop: int) -> None:
        # Ranges count bytes of the encoded body: ask for none (httpx adds these for its requests;
        # the lean client sends only what it is given).
        headers = {"Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity", "User-Agent": "rangefs"}
        if remote.if_range:
            headers["If-Range"] = remote.if_range
        position = start
        with self._low_speed() as speed:
            async with self._get(remote.url, headers, remote.headers) as resp:
                check_range_answer(remote, resp, start, stop)
                async for chunk in resp.aiter_raw():
                    speed.feed(len(chunk))
                    if position >= stop:
                        return  # more than the range: keep what was asked, close the connection
                    chunk = chunk[: stop - position]
                    await sink(position, chunk)
                    position += len(chunk)
                # Reading on to the end of the body (not returning at its last byte) lets httpcore
                # see the response complete and keep the connection; returning early would cost a
                # new connection, and TCP slow start, per request.
        if position < stop:
            raise Retry(f"body ended at byte {position}, expected {stop}")

    @asynccontextmanager
    async def _get(self, url: str, headers: dict[str, str], user: Headers) -> AsyncIterator[Answer]:
        """A streamed GET: through the lean client when it can take it, else through httpx.

        ``user``: the user's headers for ``url`` (RemoteFile.headers, already limited to its origin);
        neither client follows a redirect of a range GET to another origin with them.
        """
        target = httpx.URL(url)
        origin = target.netloc
        if self._lean is not None and origin not in self._httpx_only and self._is_direct(target):
            try:
                async with self._lean.get(url, {**headers, **dict(user)}) as resp:  # a user's User-Agent wins
                    yield resp
                return
            except UnsupportedResponse:  # raised before the response is handed out
                log.info("%s: the server frames range bodies in chunks; using httpx for it", redact_url(url))
                self._httpx_only.add(origin)
        async with self.client.stream("GET", url, headers=headers, extensions=_extensions(url, user)) as resp:
            yield resp

    async def _with_retries(self, url: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
        failures, since = 0, 0.0
        while True:
            try:
                return await attempt()
            except (httpx.UnsupportedProtocol, httpx.TooManyRedirects, httpx.InvalidURL, UnicodeError) as exc:
                raise BadResponse(f"{redact_url(url)}: {_describe(exc)}") from None
            except _InsecureRedirect as exc:
                raise BadResponse(
                    f"{redact_url(url)}: redirected from https to http ({redact_url(exc.target)}); "
                    "refused unless --allow-insecure-redirect"
                ) from None
            except httpx.TransportError as exc:
                refused = _certificate_failure(exc)
                if refused is not None:  # another attempt would meet the same certificate
                    raise BadResponse(f"{redact_url(url)}: {refused}") from None
                error: Retry = Retry(_describe(exc))
                error.no_connection = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            except Retry as exc:
                error = exc
            except httpx.HTTPError as exc:
                raise BadResponse(f"{redact_url(url)}: {_describe(exc)}") from None
            if isinstance(error, _Progressed):
                failures = error.kept
                continue
            failures += 1
            if failures == 1:
                since = time.monotonic()  # the retry time counts from the first failure without progress
            unreachable = HostUnreachable if error.no_connection else RemoteUnreachable
            if failures > self.config.retries:
                raise unreachable(f"{redact_url(url)}: {error} (gave up after {failures} attempts)")
            delay = error.delay if error.delay is not None else self._backoff(failures)
            if time.monotonic() + delay - since > self.config.retry_time:
                raise unreachable(
                    f"{redact_url(url)}: {error} (gave up: retrying would pass {self.config.retry_time:g}s)"
                )
            log.info("%s: %s; retry %d in %.2fs", redact_url(url), error, failures, delay)
            await trio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        """Full-jitter exponential backoff: uniform in [0, min(cap, 0.1 s * 2^failures)]."""
        return random.uniform(0, min(self.config.retry_max_delay, 0.1 * 2**failures))


def _certificate_failure(exc: BaseException) -> str | None:
    """Why the server's certificate was refused, when that is what ``exc`` comes from (its causes)."""
    seen: BaseException | None = exc
    for _ in range(10):  # httpx, httpcore and anyio/trio wrap it a few levels deep
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {seen.verify_message or seen.reason}"
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: BaseException) -> str:
    """An exception as one line; httpx messages may embed the URL, so keep only the class for those."""
    if isinstance(exc, Retry):
        return str(exc)
    if isinstance(exc, UnicodeError):
        return _TRANSPORT_WORDS["UnicodeError"]  # its message quotes the host
    words = _TRANSPORT_WORDS.get(type(exc).__name__, type(exc).__name__)
    detail = str(exc)
    if detail and "://" not in detail and "@" not in detail and len(detail) < 200:
        return f"{words} ({detail})"
    return words


_TRANSPORT_WORDS = {
    "ConnectError": "cannot connect",
    "ConnectTimeout": "connect timed out",
    "ReadTimeout": "read timed out",
    "WriteTimeout": "write timed out",
    "PoolTimeout": "no free connection",
    "ReadError": "connection lost while reading",
    "WriteError": "connection lost while writing",
    "RemoteProtocolError": "server broke the HTTP protocol",
    "UnsupportedProtocol": "redirected to an unsupported scheme",
    "TooManyRedirects": "too many redirects",
    "InvalidURL": "not a usable URL",
    "ProxyError": "the proxy refused or failed",
    "UnicodeError": "not a usable host name",
}


def _user_headers_for(listed: str, final: str | httpx.URL, user: Headers) -> Headers:
    """The user's headers for the listed URL go to its own origin only: none after a redirect elsewhere."""
    return user if _origin_key(httpx.URL(listed)) == _origin_key(httpx.URL(final)) else ()


def _remote_from(listed: str, resp: httpx.Response, size: int, accept_ranges: bool, user: Headers) -> RemoteFile:
    return RemoteFile(
        url=_with_credentials(listed, resp.url),
        size=size,
        etag=resp.headers.get("ETag"),
        last_modified=resp.headers.get("Last-Modified"),
        accept_ranges=accept_ranges,
        headers=_user_headers_for(listed, resp.url, user),
    )


_USER_HEADERS = "rangefs.user_headers"  # request extension: (origin, headers); httpx keeps it over redirects


def _extensions(url: str, user: Headers) -> dict[str, object]:
    return {_USER_HEADERS: (_origin_key(httpx.URL(url)), user)} if user else {}


async def _user_headers(request: httpx.Request) -> None:
    """httpx's request hook, run for every request of a redirect chain: the user's headers go on the
    requests to the listed URL's origin and come off the others (httpx copies a request's headers
    to its redirect, and strips only Authorization, and only from some)."""
    given = request.extensions.get(_USER_HEADERS)
    if given is None:
        return
    origin, user = given
    for name, value in user:
        if _origin_key(request.url) == origin:
            request.headers[name] = value
        else:
            request.headers.pop(name, None)


def _with_credentials(listed: str, final: httpx.URL) -> str:
    """The final URL, with the listed URL's user info when both are on the same origin.

    httpx keeps the Authorization header over a same-origin redirect and drops it on another
    origin; range GETs go to the final URL, so it carries the credentials on the same terms.
    """
    source = httpx.URL(listed)
    if not source.userinfo or final.userinfo or _origin_key(source) != _origin_key(final):
        return str(final)
    return str(final.copy_with(userinfo=source.userinfo))


def _origin_key(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme)


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL: what connection limits are counted by. Never raises (a URL
    httpx cannot parse is its own origin: its request fails with the reason anyway)."""
    try:
        scheme, host, port = _origin_key(httpx.URL(url))
    except (httpx.InvalidURL, UnicodeError):
        return url
    return f"{scheme}://{host}:{port}"


__all__ = ["Origin", "OriginConfig", "OriginError", "RemoteFile", "Sink", "origin_of"]
