"""A lean keep-alive HTTP/1.1 client for range GETs, on httpcore's network streams and h11.

Why: a range body through httpx costs Python work per chunk in four layers (httpx, httpcore,
h11's receive buffer, our sink), and each request costs CPU in httpcore's pool. This client
sends the request and parses the response head with h11, then reads the body straight from
the network stream, counting Content-Length itself, and keeps the connection for the next
request (measured against httpx: docs/experiments.md, 'Lean HTTP/1.1 client').

Only for plain GETs of a URL whose redirects are already resolved (the probe does that with
httpx), reached without a proxy (rangefs.origin decides); anything it does not handle (a chunked
body, a 1xx other than 100, HTTP/1.0 keep-alive) is read to completion or closed with the connection.
Imports h11, httpcore and httpx (for its URL and exception types) and nothing of rangefs; only
rangefs.origin uses it. Errors are raised as the httpx exceptions of the same meaning, so
rangefs.origin sees one family.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import httpcore
import httpx

_READ_SIZE = 1024 * 1024  # socket read size for bodies (see rangefs.origin)
_HEAD_READ_SIZE = 64 * 1024
_MAX_HEAD = 256 * 1024  # a response head larger than this is refused
DEFAULT_PORTS = {"http": 80, "https": 443}

_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    h11.RemoteProtocolError: httpx.RemoteProtocolError,
    h11.LocalProtocolError: httpx.RemoteProtocolError,
}


# How a kept connection that the server closed in the meantime fails: worth one more try.
_STALE_CONNECTION = (httpcore.ReadError, httpcore.WriteError, httpcore.RemoteProtocolError, h11.RemoteProtocolError)


def _mapped(exc: Exception) -> httpx.TransportError:
    for cls, mapped in _ERRORS.items():
        if isinstance(exc, cls):
            return mapped(str(exc))
    return httpx.ReadError(str(exc))


@dataclass
class _Connection:
    stream: httpcore.AsyncNetworkStream
    reused: bool = False


@dataclass
class RangeResponse:
    """Status and headers of an answer; ``aiter_raw`` yields its body (Content-Length bodies only)."""

    status_code: int
    reason_phrase: str
    headers: httpx.Headers
    url: str
    _body: AsyncIterator[bytes] = field(repr=False)

    def aiter_raw(self) -> AsyncIterator[bytes]:
        return self._body


class RangeClient:
    """GETs over pooled HTTP/1.1 connections; ``async with RangeClient(...) as client``."""

    def __init__(
        self, connect_timeout: float, read_timeout: float, max_idle: int = 16, tls: ssl.SSLContext | None = None
    ) -> None:
        """``tls``: the context for https (give the one httpx uses, so both trust the same certificates)."""
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._backend = httpcore.TrioBackend()
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = tls

    async def __aenter__(self) -> RangeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.stream.aclose()

    @asynccontextmanager
    async def get(self, url: str, headers: dict[str, str], method: str = "GET") -> AsyncIterator[RangeResponse]:
        """Send a GET (or a HEAD: an answer without a body); the response's body must be read inside
        the block (else the connection is closed).

        Raises:
            httpx.TransportError: connecting, sending or receiving failed.
        """
        target = httpx.URL(url)
        # raw_host: the ASCII (IDNA) form, for connecting and for SNI, as httpcore does
        key = (target.scheme, target.raw_host.decode("ascii"), target.port or DEFAULT_PORTS[target.scheme])
        for attempt in range(2):
            conn = await self._connection(key)
            try:
                status, reason, response_headers, leftover, reusable = await self._exchange(
                    conn, target, headers, method)
                break
            except (h11.LocalProtocolError, ValueError) as exc:  # a header h11 will not send
                await conn.stream.aclose()
                raise httpx.InvalidURL(f"cannot send this request: {exc}") from None
            except _STALE_CONNECTION as exc:
                await conn.stream.aclose()
                if conn.reused and attempt == 0:
                    continue  # a kept connection the server had closed: once more on a new one
                raise _mapped(exc) from None
            except (httpcore.TimeoutException, httpcore.NetworkError) as exc:
                await conn.stream.aclose()
                raise _mapped(exc) from None
            except BaseException:
                await conn.stream.aclose()
                raise
        length = "0" if method == "HEAD" else response_headers.get("Content-Length", "")
        if "Transfer-Encoding" in response_headers or not length.isdigit():
            # Chunked (Transfer-Encoding wins over Content-Length, RFC 9112 6.3) or unframed:
            # not this client's job; the caller takes another path, before any byte is read.
            await conn.stream.aclose()
            raise UnsupportedResponse("a response body without a plain Content-Length")
        body = _Body(conn, leftover, int(length), self.read_timeout)
        response = RangeResponse(status, reason, response_headers, url, body.chunks())
        try:
            yield response
        finally:
            if body.complete and reusable:
                self._keep(key, conn)
            else:
                await conn.stream.aclose()

    async def _connection(self, key: tuple[str, str, int]) -> _Connection:
        pool = self._idle.get(key, [])
        while pool:
            conn = pool.pop()
            if conn.stream.get_extra_info("is_readable"):
                await conn.stream.aclose()  # closed by the server (or junk after a response)
                continue
            conn.reused = True
            return conn
        scheme, host, port = key
        try:
            stream = await self._backend.connect_tcp(host, port, timeout=self.connect_timeout)
            if scheme == "https":
                stream = await stream.start_tls(self._ssl_context(), server_hostname=host, timeout=self.connect_timeout)
        except (httpcore.TimeoutException, httpcore.NetworkError) as exc:
            raise _mapped(exc) from None
        return _Connection(stream)

    def _keep(self, key: tuple[str, str, int], conn: _Connection) -> None:
        pool = self._idle.setdefault(key, [])
        if len(pool) < self.max_idle:
            pool.append(conn)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()  # httpx's trust store (certifi, or SSL_CERT_FILE)
        return self._ssl

    async def _exchange(
        self, conn: _Connection, target: httpx.URL, headers: dict[str, str], method: str = "GET"
    ) -> tuple[int, str, httpx.Headers, bytes, bool]:
        """Send the request; read up to the end of the response head. Leftover = body bytes read."""
        parser = h11.Connection(our_role=h11.CLIENT)
        head = h11.Request(method=method, target=target.raw_path, headers=_request_headers(target, headers))
        request = parser.send(head)
        await conn.stream.write(request + (parser.send(h11.EndOfMessage()) or b""), timeout=self.read_timeout)
        received = 0
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                data = await conn.stream.read(_HEAD_READ_SIZE, timeout=self.read_timeout)
                received += len(data)
                if received > _MAX_HEAD:
                    raise httpcore.RemoteProtocolError("response head too large")
                if not data and parser.their_state is h11.SEND_RESPONSE:
                    raise httpcore.RemoteProtocolError("server closed the connection without answering")
                parser.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if not isinstance(event, h11.Response):
                raise httpcore.RemoteProtocolError(f"unexpected {type(event).__name__}")
            response_headers = httpx.Headers(
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()]
            )
            leftover, _ = parser.trailing_data
            reusable = (
                event.http_version == b"1.1"
                and "close" not in response_headers.get("Connection", "").lower()
                and "Content-Length" in response_headers
                and "Transfer-Encoding" not in response_headers
            )
            return event.status_code, event.reason.decode("latin-1"), response_headers, bytes(leftover), reusable


class UnsupportedResponse(Exception):
    """The answer is framed in a way this client does not read (chunked): use httpx instead."""


class _Body:
    """The body of one response: the head's leftover bytes, then reads of the stream."""

    def __init__(self, conn: _Connection, leftover: bytes, length: int, read_timeout: float) -> None:
        self.conn = conn
        self.leftover = leftover
        self.remaining = length
        self.read_timeout = read_timeout
        self.complete = False  # read to its last byte, and nothing after it: the connection is reusable

    async def chunks(self) -> AsyncIterator[bytes]:
        extra = len(self.leftover) > self.remaining
        if self.leftover:
            chunk, self.leftover = self.leftover[: self.remaining], b""
            self.remaining -= len(chunk)
            yield chunk
        while self.remaining > 0:
            try:
                chunk = await self.conn.stream.read(min(_READ_SIZE, self.remaining), timeout=self.read_timeout)
            except (httpcore.TimeoutException, httpcore.NetworkError) as exc:
                raise _mapped(exc) from None
            if not chunk:
                raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
            self.remaining -= len(chunk)
            yield chunk
        self.complete = not extra


def _request_headers(target: httpx.URL, headers: dict[str, str]) -> list[tuple[str, str]]:
    """Host, basic auth from the URL's user info (as httpx sends it, unless ``headers`` has its own
    Authorization), then ``headers``."""
    lines = [("Host", target.netloc.decode("ascii"))]
    own = any(name.lower() == "authorization" for name in headers)
    if (target.username or target.password) and not own:
        credentials = f"{target.username}:{target.password}".encode()
        lines.append(("Authorization", f"Basic {base64.b64encode(credentials).decode('ascii')}"))
    return lines + list(headers.items())
