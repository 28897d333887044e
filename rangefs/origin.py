"""Probe a URL, fetch byte ranges, verify answers, retry: what rangefs asks of HTTP servers.

With rangefs.http11 (its lean client for range GETs) the only module that imports httpx; it
raises rangefs.errors exceptions, never httpx ones. Probes go through httpx (redirects);
range GETs through the lean client unless a proxy is configured. Every ranged GET carries
``If-Range`` with the file's validator and ``Accept-Encoding: identity`` (ranges count bytes
of the encoded body), and every 206 is checked against the request before a byte of it is
handed on.

A hostile or failing server is bounded: every attempt is cut when fewer than
``low_speed_limit`` bytes per second arrive over ``low_speed_time`` seconds (a trickle never
trips the read timeout, which only measures gaps), and attempts that each break off early are
held to the same limit together; a certificate that fails verification
ends the request at once with its reason; an https URL is not followed to http unless
``allow_insecure_redirect``; the URL's credentials go only to its own origin.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import re
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Protocol, TypeVar

import httpcore._async.http11 as httpcore_http11
import httpx
import trio

from rangefs.errors import (
    BadResponse,
    HostUnreachable,
    OriginError,
    RangesIgnored,
    RemoteChanged,
    RemoteNotFound,
    RemoteUnreachable,
)
from rangefs.http11 import DEFAULT_PORTS, RangeClient, UnsupportedResponse
from rangefs.redact import redact_url

log = logging.getLogger(__name__)

# Our own log lines carry redacted URLs; httpx's INFO lines would carry them in full.
logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("httpcore").setLevel(logging.WARNING)

# httpcore reads the socket 64 KiB at a time; for multi-MiB range bodies that costs three times
# the CPU of 1 MiB reads (a 1 GiB body: ~230 MB/s vs ~700 MB/s on one core here, measured with
# a bare httpx stream from nginx on loopback). The attribute is httpcore's own knob.
_SOCKET_READ_SIZE = 1024 * 1024
if hasattr(httpcore_http11.AsyncHTTP11Connection, "READ_NUM_BYTES"):
    httpcore_http11.AsyncHTTP11Connection.READ_NUM_BYTES = _SOCKET_READ_SIZE

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")
_CONTENT_RANGE_UNSATISFIED = re.compile(r"bytes \*/(\d+)$")
_HEAD_REFUSED = {403, 405, 501}  # answers that may mean "no HEAD here" rather than "no file"
_MOVES_PER_WINDOW = 8  # see _LowSpeed: an attempt is cut at most an eighth of a window early

Sink = Callable[[int, bytes], Awaitable[None]]


class _Answer(Protocol):
    """What the checks read of a response: httpx.Response, or rangefs.http11.RangeResponse."""

    @property
    def status_code(self) -> int: ...
    @property
    def reason_phrase(self) -> str: ...
    @property
    def headers(self) -> httpx.Headers: ...
    def aiter_raw(self) -> AsyncIterator[bytes]: ...

_T = TypeVar("_T")


@dataclass(frozen=True)
class RemoteFile:
    """One version of a remote file, as the server described it."""

    url: str  # where ranges are fetched from: the final URL after redirects
    size: int
    etag: str | None
    last_modified: str | None
    accept_ranges: bool = True

    @property
    def if_range(self) -> str | None:
        """The validator for If-Range: a strong ETag, else the Last-Modified date (RFC 9110 13.1.5)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    @property
    def mtime_ns(self) -> int | None:
        """Last-Modified as nanoseconds since the epoch, when given and parseable."""
        if not self.last_modified:
            return None
        try:
            return int(parsedate_to_datetime(self.last_modified).timestamp()) * 1_000_000_000
        except (TypeError, ValueError):
            return None


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
    # fetch that each break off sooner (see _Pace); 0 in either turns it off.
    # The time outlasts connect_timeout, so a connect that times out says so.
    low_speed_limit: int = 1024
    low_speed_time: float = 15.0
    allow_insecure_redirect: bool = False  # follow https -> http redirects


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix.

    ``counts``: the failure counts against the retries even when the attempt made progress
    (a trickle makes progress on every attempt, and must still end).
    """

    def __init__(self, reason: str, delay: float | None = None, *, counts: bool = False) -> None:
        super().__init__(reason)
        self.delay = delay
        self.counts = counts
        self.no_connection = False  # no connection could be made: the host, not this URL, fails


class _Progressed(_Retry):
    """An attempt failed after making progress: retry at once, forgiving the failures without
    progress; the ``kept`` failures (slow windows of the read, see _Pace) still count."""

    def __init__(self, kept: int) -> None:
        super().__init__("progress made", delay=0)
        self.kept = kept


class _InsecureRedirect(Exception):
    """An https URL redirected to http (raised by the response hook, before the redirect is followed)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


class _LowSpeed:
    """Cuts an attempt that receives fewer than ``limit`` bytes/s over ``seconds``.

    The deadline of ``scope`` moves ``seconds`` ahead once a window's worth of bytes has arrived
    since it last moved, at most _MOVES_PER_WINDOW times per window: moving a trio deadline costs
    microseconds, so a fast body costs a clock read per chunk, no timer and no system call.
    """

    def __init__(self, limit: int, seconds: float) -> None:
        self.seconds = seconds
        self.quota = limit * seconds if limit > 0 and seconds > 0 else math.inf
        self.received = 0  # since the deadline last moved
        now = trio.current_time()
        self.next_move = now + seconds / _MOVES_PER_WINDOW
        self.scope = trio.CancelScope(deadline=now + seconds if self.quota < math.inf else math.inf)

    def feed(self, size: int) -> None:
        self.received += size
        if self.received >= self.quota:
            now = trio.current_time()
            if now >= self.next_move:
                self.received = 0
                self.next_move = now + self.seconds / _MOVES_PER_WINDOW
                self.scope.deadline = now + self.seconds

    def describe(self) -> str:
        return f"too slow: {self.received / self.seconds:.0f} B/s over {self.seconds:g} s"


class _Pace:
    """The low-speed limit across the attempts of one fetch, so that a server that sends a few
    bytes and closes, again and again, sooner than an attempt is cut, still ends the read.

    A window opens at the start and after each verdict; it is judged only when an attempt fails
    after progress, so a fast body costs nothing here. Once it has brought ``limit * seconds``
    bytes the read is fine: a new window opens and the slow ones are forgiven. Once it has lasted
    ``seconds`` with fewer, it was slow: that failure counts against the retries, and each slow
    window keeps counting until a fine one (a retry after progress does not forgive it).
    """

    def __init__(self, limit: int, seconds: float, position: int) -> None:
        self.seconds = seconds
        self.quota = limit * seconds if limit > 0 and seconds > 0 else math.inf
        self.slow = 0  # slow windows since the last fine one
        self._open(position)

    def _open(self, position: int) -> None:
        self.opened = trio.current_time()
        self.start = position

    def cut(self, position: int) -> None:
        """An attempt that made progress was cut for its own low speed: a slow window."""
        self.slow += 1
        self._open(position)

    def judge(self, position: int) -> str | None:
        """After an attempt failed having made progress: why the failure counts, or None."""
        delivered = position - self.start
        if delivered >= self.quota:
            self.slow = 0
            self._open(position)
            return None
        elapsed = trio.current_time() - self.opened
        if self.quota == math.inf or elapsed < self.seconds:
            return None
        self.cut(position)
        return f"too slow: {delivered / elapsed:.0f} B/s over {elapsed:.1f} s of attempts that broke off"


class Origin:
    """An HTTP client for probing and fetching ranges; use as ``async with Origin(cfg) as origin``."""

    def __init__(self, config: OriginConfig | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``transport`` replaces the network, for tests (``httpx.MockTransport``)."""
        self.config = config or OriginConfig()
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._lean: RangeClient | None = None
        self._httpx_only: set[bytes] = set()  # servers whose answers the lean client cannot read
        self._probes = OriginLimits(self.config.max_connections)  # httpx has no cap of its own here

    async def __aenter__(self) -> Origin:
        cfg = self.config
        timeout = httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout, pool=None)
        # No cap on connections in use: one cap over all hosts would let a slow host hold
        # what another needs. Callers bound them (rangefs.fetcher per origin, the mount's probes).
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=cfg.max_connections)
        # One trust store for both clients: httpx's (certifi, or SSL_CERT_FILE / SSL_CERT_DIR when set).
        tls = httpx.create_ssl_context()
        self._client = httpx.AsyncClient(
            timeout=timeout,
            limits=limits,
            verify=tls,
            follow_redirects=True,
            max_redirects=10,
            headers={"Accept-Encoding": "identity", "User-Agent": "rangefs"},
            transport=self._transport,
            event_hooks={"response": [self._check_redirect]},
        )
        # Range GETs take the lean client unless a test transport or a proxy is in the way.
        if cfg.lean_ranges and self._transport is None and not urllib.request.getproxies():
            self._lean = RangeClient(cfg.connect_timeout, cfg.read_timeout, max_idle=cfg.max_connections, tls=tls)
        return self

    async def _check_redirect(self, resp: httpx.Response) -> None:
        """Refuse to follow an https URL to http (its bytes and cookies would travel in the clear)."""
        if self.config.allow_insecure_redirect or not resp.has_redirect_location or resp.url.scheme != "https":
            return
        target = resp.url.join(resp.headers["Location"])
        if target.scheme == "http":
            raise _InsecureRedirect(str(target))

    @contextmanager
    def _low_speed(self) -> Iterator[_LowSpeed]:
        """Run an attempt under the low-speed limit; raises a counting _Retry when it is too slow."""
        guard = _LowSpeed(self.config.low_speed_limit, self.config.low_speed_time)
        with guard.scope:
            yield guard
        if guard.scope.cancelled_caught:
            raise _Retry(guard.describe(), counts=True)

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
        async with self._probes.of(url):
            return await self._with_retries(url, lambda: self._probe_once(url))

    async def _probe_once(self, url: str) -> RemoteFile:
        with self._low_speed():
            return await self._probe_unguarded(url)
        raise AssertionError("unreachable")  # _low_speed raises when it cut the attempt short

    async def _probe_unguarded(self, url: str) -> RemoteFile:
        resp = await self.client.head(url)
        _raise_for_status(url, resp)
        size = resp.headers.get("Content-Length")
        if resp.status_code in _HEAD_REFUSED or not size or not size.isdigit():
            return await self._probe_by_get(url)
        if not resp.is_success:
            raise BadResponse(f"{redact_url(url)}: HEAD answered {_status(resp)}")
        _refuse_encoding(url, resp)
        return _remote_from(url, resp, int(size), resp.headers.get("Accept-Ranges", "bytes") != "none")

    async def _probe_by_get(self, url: str) -> RemoteFile:
        async with self.client.stream("GET", url, headers={"Range": "bytes=0-0"}) as resp:
            _raise_for_status(url, resp)
            _refuse_encoding(url, resp)
            if resp.status_code == 206:
                size = _total_from_content_range(url, resp)
                return _remote_from(url, resp, size, True)
            if resp.status_code == 416:
                match = _CONTENT_RANGE_UNSATISFIED.match(resp.headers.get("Content-Range", ""))
                if match and match.group(1) == "0":
                    return _remote_from(url, resp, 0, True)
            length = resp.headers.get("Content-Length", "")
            if resp.status_code == 200 and length.isdigit():
                return _remote_from(url, resp, int(length), False)
            raise BadResponse(f"{redact_url(url)}: cannot learn the size (GET answered {_status(resp)})")

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
        ``config.retries``, unless the attempts of the current window (_Pace) stay under the
        low-speed limit: then it counts, and every slow window keeps counting until one brings
        enough, so a trickle by reconnection ends like a slow attempt.
        """
        position = start
        pace = _Pace(self.config.low_speed_limit, self.config.low_speed_time, start)

        async def advance(offset: int, chunk: bytes) -> None:
            nonlocal position
            await sink(offset, chunk)
            position = offset + len(chunk)

        async def attempt() -> None:
            before = position
            try:
                await once(position, advance)
            except (_Retry, httpx.TransportError) as exc:
                if position == before:
                    raise
                if isinstance(exc, _Retry) and exc.counts:
                    pace.cut(position)
                    raise
                log.info("%s: %s at byte %d; %s", redact_url(remote.url), _describe(exc), position, how)
                slow = pace.judge(position)
                if slow is not None:
                    raise _Retry(slow, counts=True) from None
                raise _Progressed(pace.slow) from None

        while position < stop:
            await self._with_retries(remote.url, attempt)

    async def _stream_once(self, remote: RemoteFile, skip: int, sink: Sink) -> None:
        received = 0
        with self._low_speed() as speed:
            async with self.client.stream("GET", remote.url) as resp:
                _raise_for_status(remote.url, resp)
                if resp.status_code != 200:
                    raise BadResponse(f"{redact_url(remote.url)}: answered {_status(resp)} to a GET")
                length = resp.headers.get("Content-Length")
                if not _same_version(remote, resp) or (length is not None and length != str(remote.size)):
                    raise RemoteChanged(f"{redact_url(remote.url)}: the file is not the version being read")
                _refuse_encoding(remote.url, resp)
                async for chunk in resp.aiter_raw():
                    speed.feed(len(chunk))
                    end = received + len(chunk)
                    if end > skip:
                        piece = chunk[max(0, skip - received) : remote.size - received]
                        if piece:
                            await sink(max(skip, received), piece)
                    received = end
        if received < remote.size:
            raise _Retry(f"body ended at byte {received}, expected {remote.size}")

    async def _fetch_once(self, remote: RemoteFile, start: int, sink: Sink, *, stop: int) -> None:
        # Ranges count bytes of the encoded body: ask for none (httpx adds these for its requests;
        # the lean client sends only what it is given).
        headers = {"Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity", "User-Agent": "rangefs"}
        if remote.if_range:
            headers["If-Range"] = remote.if_range
        position = start
        with self._low_speed() as speed:
            async with self._get(remote.url, headers) as resp:
                _check_range_answer(remote, resp, start, stop)
                async for chunk in resp.aiter_raw():
                    speed.feed(len(chunk))
                    if position >= stop:
                        return  # more than the range: keep what was asked, drop the connection
                    chunk = chunk[: stop - position]
                    await sink(position, chunk)
                    position += len(chunk)
                # Reading on to the end of the body (not returning at its last byte) lets httpcore
                # see the response complete and keep the connection: returning early cost a new
                # connection per request (+1.2 ms per 256 KiB request on loopback, slow start on a WAN).
        if position < stop:
            raise _Retry(f"body ended at byte {position}, expected {stop}")

    @asynccontextmanager
    async def _get(self, url: str, headers: dict[str, str]) -> AsyncIterator[_Answer]:
        """A streamed GET: through the lean client when it can take it, else through httpx."""
        origin = httpx.URL(url).netloc
        if self._lean is not None and origin not in self._httpx_only:
            try:
                async with self._lean.get(url, headers) as resp:
                    yield resp
                return
            except UnsupportedResponse:  # raised before the response is handed out
                log.info("%s: the server frames range bodies in chunks; using httpx for it", redact_url(url))
                self._httpx_only.add(origin)
        async with self.client.stream("GET", url, headers=headers) as resp:
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
                error: _Retry = _Retry(_describe(exc))
                error.no_connection = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
            except _Retry as exc:
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
    if isinstance(exc, _Retry):
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
    "UnicodeError": "not a usable host name",
}


def _status(resp: _Answer) -> str:
    return f"{resp.status_code} {resp.reason_phrase}".strip()


def _raise_for_status(url: str, resp: _Answer) -> None:
    """Map the statuses that mean "not there" or "try again" to our errors."""
    if resp.status_code in (404, 410):
        raise RemoteNotFound(f"{redact_url(url)} answered {_status(resp)}")
    if resp.status_code == 429 or (resp.status_code >= 500 and resp.status_code != 501):
        raise _Retry(f"server answered {_status(resp)}", delay=_retry_after(resp))


def _refuse_encoding(url: str, resp: _Answer) -> None:
    """A size from an encoded answer counts encoded bytes: not the file's size."""
    encoding = resp.headers.get("Content-Encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise BadResponse(f"{redact_url(url)}: the server encodes the file ({encoding}) although asked not to; "
                          "its ranges would not be the file's bytes")


def _retry_after(resp: _Answer) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return min(float(value), 60.0) if value.isdigit() else None


def _check_range_answer(remote: RemoteFile, resp: _Answer, start: int, stop: int) -> None:
    """Accept only a 206 for exactly ``bytes start-(stop-1)/size`` with an identity body."""
    _raise_for_status(remote.url, resp)
    if resp.status_code == 200 and _same_version(remote, resp):
        raise RangesIgnored(f"{redact_url(remote.url)}: the server ignores Range requests (answered 200 OK)")
    if resp.status_code in (200, 416):
        raise RemoteChanged(f"{redact_url(remote.url)}: answered {_status(resp)} to a ranged GET with If-Range")
    if not _same_version(remote, resp):
        raise RemoteChanged(f"{redact_url(remote.url)}: a 206 for another version (ETag or Last-Modified changed)")
    if resp.status_code != 206:
        raise BadResponse(f"{redact_url(remote.url)}: answered {_status(resp)} to a ranged GET")
    encoding = resp.headers.get("Content-Encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise _Retry(f"answered with Content-Encoding {encoding!r} to a ranged GET")
    match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    expected = (start, stop - 1, remote.size)
    if not match or match.group(3) == "*":
        raise _Retry(f"206 without a usable Content-Range ({resp.headers.get('Content-Range')!r})")
    got = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    if got[2] != remote.size:
        raise RemoteChanged(f"{redact_url(remote.url)}: size changed from {remote.size} to {got[2]}")
    if got != expected:
        raise _Retry(f"Content-Range {got[0]}-{got[1]} does not match the request {start}-{stop - 1}")


def _same_version(remote: RemoteFile, resp: _Answer) -> bool:
    """False when the answer names a validator other than the one we know (not all servers name one)."""
    etag = resp.headers.get("ETag")
    if etag is not None and remote.etag is not None and etag != remote.etag:
        return False
    modified = resp.headers.get("Last-Modified")
    return modified is None or remote.last_modified is None or modified == remote.last_modified


def _total_from_content_range(url: str, resp: httpx.Response) -> int:
    match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if not match or match.group(3) == "*":
        raise BadResponse(f"{redact_url(url)}: 206 without a total in Content-Range")
    return int(match.group(3))


def _remote_from(listed: str, resp: httpx.Response, size: int, accept_ranges: bool) -> RemoteFile:
    return RemoteFile(
        url=_with_credentials(listed, resp.url),
        size=size,
        etag=resp.headers.get("ETag"),
        last_modified=resp.headers.get("Last-Modified"),
        accept_ranges=accept_ranges,
    )


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


class OriginLimits:
    """A capacity limiter per origin, made on first use: a slow host uses its own share of
    requests, never another host's. Trio only."""

    def __init__(self, per_origin: int) -> None:
        self.per_origin = per_origin
        self._limiters: dict[str, trio.CapacityLimiter] = {}

    def of(self, url: str) -> trio.CapacityLimiter:
        """The limiter of ``url``'s origin."""
        key = origin_of(url)
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._limiters[key] = trio.CapacityLimiter(self.per_origin)
        return limiter


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL: what connection limits are counted by. Never raises (a URL
    httpx cannot parse is its own origin: its request fails with the reason anyway)."""
    try:
        scheme, host, port = _origin_key(httpx.URL(url))
    except (httpx.InvalidURL, UnicodeError):
        return url
    return f"{scheme}://{host}:{port}"


__all__ = ["Origin", "OriginConfig", "OriginError", "OriginLimits", "RemoteFile", "Sink", "origin_of"]
