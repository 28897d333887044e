"""The project's own misbehaving HTTP/1.1 origin on 127.0.0.1, for fault tests.

Without faults it answers GET and HEAD like nginx: strong ETag, Last-Modified, Content-Length,
single byte ranges, If-Range, keep-alive. Each misbehaviour is a switch in ``Faults``, set per path.
It writes to raw sockets (no http.server) so it can cut, stall, lie and count body bytes exactly.
Stdlib only; every sleep wakes up when the connection is dropped, so ``stop`` is quick.
"""

from __future__ import annotations

import array
import email.utils
import enum
import gzip
import hashlib
import http.client
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import IO, Any

from procs import close_socket

_SLICE = 16 * 1024  # largest single write; small enough that cuts and stalls land on time
_RATE_TICKS = 50  # writes per second under a ``rate`` cap
_UNSATISFIABLE = (-1, -1)  # a Range that asks only for bytes past the end
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_MAX_LINE = 65536
_THREAD = "faultserver:"  # thread names are this and the port, so tests can find leftovers


class _Auto(enum.Enum):
    AUTO = enum.auto()


AUTO = _Auto.AUTO  # put/change: derive the validator instead of taking one
Validator = str | _Auto | None  # an ETag or Last-Modified value; None sends no header


class Pattern:
    """Bytes of a file too large to hold: a file's data for a server that claims a huge size.

    Each 8-byte word holds its own number (little-endian), so every range has its own bytes.
    Supports ``len`` and slicing, which is all the server does with a file's data.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(self.size)
        return pattern_bytes(start, stop)


def pattern_bytes(start: int, stop: int) -> bytes:
    """Bytes ``start .. stop`` of any ``Pattern``."""
    if stop <= start:
        return b""
    first = start // 8
    words = array.array("Q", range(first, (stop + 7) // 8))
    return words.tobytes()[start - 8 * first : stop - 8 * first]


@dataclass
class Faults:
    """Fault switches for one path, given as keyword arguments to put/set_faults; all off by default."""

    ignore_range: bool = False  # GET always 200 with the full body
    accept_ranges: str | None = "bytes"  # Accept-Ranges value; None omits the header
    bare_206: bool = False  # a 206 names no ETag or Last-Modified (only If-Range tells versions apart)
    long_206: int = 0  # a 206 body (and its Content-Length) this many "X" bytes longer than its Content-Range
    refuse_head: bool = False  # HEAD answered with head_status
    head_status: int = 405
    redirect: tuple[int, str] | None = None  # (status, Location) for every request
    gzip: bool = False  # Content-Encoding: gzip on whatever body is sent
    content_range_shift: int = 0  # a 206 claims start+shift..end+shift, sends start..end
    wrong_total: int | None = None  # total size announced in Content-Range
    cut_after: int | None = None  # write at most this many body bytes, then close
    cut_next: list[int] = field(default_factory=list)  # as cut_after, one value per body sent, in order
    extra_bytes: int = 0  # garbage after the announced GET body, then close
    short_body: int = 0  # write this many body bytes fewer than announced, then close
    fail_next: list[tuple[int, float | None]] = field(default_factory=list)  # (status, Retry-After)
    delay: float = 0.0  # seconds before the headers
    rate: int | None = None  # body bytes per second
    stall_after: tuple[int, float] | None = None  # (bytes, seconds): pause once mid-body
    change_after: int | None = None  # switch to next_data after this many body bytes of a response
    next_data: bytes | None = None
    chunked: bool = False  # Transfer-Encoding: chunked instead of Content-Length
    require_auth: str | None = None  # 401 to a request without exactly this Authorization header
    hang_from: int | None = None  # GETs from this offset on (of a range that starts there or
    # later; 0: every GET) are never answered; the request's closed_at tells when the client gave up
    hang_head: bool = False  # HEADs are never answered, as with hang_from


@dataclass
class FileSpec:
    """One served file: its current version and its faults (mutated only under the server lock)."""

    path: str
    data: bytes
    etag: str | None
    last_modified: str | None
    faults: Faults
    version: int = 1


@dataclass
class RequestRecord:
    """One request as received, and what the server did with it."""

    method: str
    path: str
    headers: dict[str, str]
    connection: int  # serial number of the TCP connection, to see keep-alive reuse
    status: int = 0
    body_bytes_sent: int = 0  # payload bytes written (not chunk framing), extra garbage included
    closed_at: float | None = None  # hang: time.monotonic() when the client closed the connection

    def header(self, name: str) -> str | None:
        """The value of a request header, looked up case-insensitively."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    @property
    def range(self) -> str | None:
        return self.header("Range")


class _Dropped(Exception):
    """The connection was dropped (go_down/stop) while its thread slept."""


class _Conn:
    """A client socket and the event that wakes its thread's sleeps when it is dropped."""

    def __init__(self, sock: socket.socket, serial: int) -> None:
        self.sock = sock
        self.serial = serial
        self.dropped = threading.Event()

    def sleep(self, seconds: float) -> None:
        if seconds > 0 and self.dropped.wait(seconds):
            raise _Dropped

    def drop(self) -> None:
        self.dropped.set()
        close_socket(self.sock)


class FaultServer:
    """``with FaultServer() as server: server.put("/f", data, cut_after=100)`` then GET server.url("/f")."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._files: dict[str, FileSpec] = {}
        self._requests: list[RequestRecord] = []
        self._conns: set[_Conn] = set()
        self._threads: list[threading.Thread] = []  # accept and connection threads not yet joined
        self._serials = 0
        self._stopped = False
        self._clock = int(time.time()) - 3600  # each new version one second later: dates never repeat
        self._listener: socket.socket | None = socket.create_server((host, port))
        self.port: int = self._listener.getsockname()[1]
        self.base_url = f"http://{host}:{self.port}"

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def url(self, path: str) -> str:
        return self.base_url + path

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> FaultServer:
        """Serve in a daemon thread; returns self."""
        with self._lock:
            assert self._listener is not None and not self._threads, "start once, while up"
            self._spawn(self._accept_loop, self._listener)
        return self

    def stop(self) -> None:
        """Close the listener and every client connection; join all threads."""
        with self._lock:
            self._stopped = True
        self.go_down()

    def go_down(self) -> None:
        """Stop listening and drop open connections: clients then get connection refused."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            threads, self._threads = self._threads, []
        if listener is not None:
            close_socket(listener)  # shutdown() wakes the thread blocked in accept()
        for conn in conns:
            conn.drop()
        for thread in threads:
            thread.join(timeout=5)

    def come_back(self) -> None:
        """Listen again on the same port."""
        assert not self._stopped and self._listener is None, "come_back follows go_down"
        self._listener = socket.create_server((self.host, self.port))  # SO_REUSEADDR: TIME_WAIT is fine
        self.start()

    # -- files ------------------------------------------------------------------------------

    def put(
        self,
        path: str,
        data: bytes,
        *,
        etag: Validator = AUTO,
        last_modified: Validator = AUTO,
        **faults: Any,
    ) -> FileSpec:
        """Serve ``data`` at ``path`` (replacing any file there) with the given fault switches."""
        spec = FileSpec(path, b"", None, None, Faults(**faults), version=0)
        self._set_version(spec, data, etag, last_modified)
        with self._lock:
            self._files[path] = spec
        return spec

    def change(self, path: str, data: bytes, *, etag: Validator = AUTO, last_modified: Validator = AUTO) -> None:
        """Make a new version of ``path``: new bytes, and a new ETag and Last-Modified unless given."""
        self._set_version(self._files[path], data, etag, last_modified)

    def set_faults(self, path: str, **faults: Any) -> None:
        """Replace the fault switches of ``path``."""
        new = Faults(**faults)
        with self._lock:
            self._files[path].faults = new

    def _set_version(self, spec: FileSpec, data: bytes, etag: Validator, last_modified: Validator) -> None:
        with self._lock:
            self._clock += 1
            spec.version += 1
            spec.data = data
            digest = f"pattern{len(data)}" if isinstance(data, Pattern) else hashlib.sha256(data).hexdigest()[:16]
            spec.etag = f'"{digest}-{spec.version}"' if etag is AUTO else etag
            auto_date = email.utils.formatdate(self._clock, usegmt=True)
            spec.last_modified = auto_date if last_modified is AUTO else last_modified

    # -- the request log --------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    def mark(self) -> int:
        """A position in the request log, for ``since``."""
        with self._lock:
            return len(self._requests)

    def since(self, mark: int) -> list[RequestRecord]:
        """The requests received after ``mark``."""
        with self._lock:
            return self._requests[mark:]

    def bytes_sent(self, path: str | None = None) -> int:
        """Body bytes actually written to sockets, for every path or one."""
        return sum(r.body_bytes_sent for r in self.requests if path is None or r.path == path)

    # -- serving ----------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # go_down closed the listener
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms Nagle wait per response
            with self._lock:
                self._serials += 1
                conn = _Conn(sock, self._serials)
                if listener is not self._listener:
                    conn.drop()
                    return
                self._conns.add(conn)
                self._spawn(self._serve, conn)

    def _spawn(self, target: Callable[[Any], None], arg: Any) -> None:
        """Start a thread; called under the lock, so go_down never joins an unstarted thread."""
        self._threads = [t for t in self._threads if t.is_alive()]
        thread = threading.Thread(target=target, args=(arg,), name=f"{_THREAD}{self.port}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _serve(self, conn: _Conn) -> None:
        try:
            with conn.sock.makefile("rb") as rfile:
                while self._handle_one(conn, rfile):
                    pass
        except (OSError, _Dropped, http.client.HTTPException, UnicodeError):
            pass  # the client went away or sent garbage: only this connection ends
        finally:
            conn.drop()
            with self._lock:
                self._conns.discard(conn)

    def _handle_one(self, conn: _Conn, rfile: IO[bytes]) -> bool:
        """Read one request and answer it; returns whether the connection stays open."""
        line = rfile.readline(_MAX_LINE)
        if not line.strip():
            return bool(line)  # tolerate a stray CRLF between requests; b"" is EOF
        words = line.decode("latin-1").split()
        if len(words) != 3:
            _send_head(conn, 400, {"Content-Length": "0", "Connection": "close"})
            return False
        method, path, version = words
        message = http.client.parse_headers(rfile)
        rfile.read(int(message.get("Content-Length", 0)))
        record = RequestRecord(method, path, dict(message.items()), conn.serial)
        with self._lock:
            self._requests.append(record)
        keep_alive = version == "HTTP/1.1" and "close" not in (record.header("Connection") or "").lower()
        return self._respond(conn, record) and keep_alive

    def _respond(self, conn: _Conn, record: RequestRecord) -> bool:
        """Answer one request; returns False when the answer leaves the connection unusable."""
        with self._lock:
            spec = self._files.get(record.path)
            if spec is not None:
                data, etag, last_modified, faults = spec.data, spec.etag, spec.last_modified, spec.faults
                failure = faults.fail_next.pop(0) if faults.fail_next else None
        if spec is None:
            return self._send_empty(conn, record, 404, {})
        conn.sleep(faults.delay)
        if failure is not None:
            status, retry_after = failure
            headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
            return self._send_empty(conn, record, status, headers)
        if faults.require_auth is not None and record.header("Authorization") != faults.require_auth:
            return self._send_empty(conn, record, 401, {"WWW-Authenticate": 'Basic realm="faultserver"'})
        if faults.redirect is not None:
            return self._send_empty(conn, record, faults.redirect[0], {"Location": faults.redirect[1]})
        if _hangs(record, data, faults):
            _wait_for_close(conn)
            record.closed_at = time.monotonic()
            return False
        if record.method == "HEAD" and faults.refuse_head:
            return self._send_empty(conn, record, faults.head_status, {})
        if record.method not in ("GET", "HEAD"):
            return self._send_empty(conn, record, 405, {"Allow": "GET, HEAD"})
        status, headers, body = _entity(record, data, etag, last_modified, faults)
        if faults.chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(len(body))
        record.status = status
        _send_head(conn, status, headers)
        if record.method == "HEAD":
            return True
        return self._send_body(conn, record, spec, body, faults)

    def _send_empty(self, conn: _Conn, record: RequestRecord, status: int, headers: dict[str, str]) -> bool:
        record.status = status
        _send_head(conn, status, {**headers, "Content-Length": "0"})
        return True

    def _send_body(self, conn: _Conn, record: RequestRecord, spec: FileSpec, body: bytes, faults: Faults) -> bool:
        """Write the body under the faults' cuts, rates and stalls; returns whether it was complete."""
        limit = max(0, len(body) - faults.short_body)
        if faults.cut_after is not None:
            limit = min(limit, faults.cut_after)
        with self._lock:
            cut = faults.cut_next.pop(0) if faults.cut_next else None
        if cut is not None:
            limit = min(limit, cut)
        stall_at, stall_for = faults.stall_after or (-1, 0.0)
        marks = (stall_at, -1 if faults.change_after is None else faults.change_after)  # writes stop at these
        step = max(1, faults.rate // _RATE_TICKS) if faults.rate else _SLICE  # capped: small writes, not bursts
        sent, started = 0, time.monotonic()
        while True:
            if faults.change_after is not None and sent >= faults.change_after:
                self._switch_to_next(spec, faults)
            if sent == stall_at:
                conn.sleep(stall_for)
            if sent >= limit:
                break
            size = min(step, limit - sent, *(mark - sent for mark in marks if mark > sent))
            _write_chunk(conn, record, body[sent : sent + size], faults.chunked)
            sent += size
            if faults.rate:
                conn.sleep(started + sent / faults.rate - time.monotonic())
        if limit < len(body):
            return False
        if faults.chunked:
            conn.sock.sendall(b"0\r\n\r\n")
        if faults.extra_bytes:
            _send_counted(conn, record, b"X" * faults.extra_bytes)
            return False
        return True

    def _switch_to_next(self, spec: FileSpec, faults: Faults) -> None:
        with self._lock:
            next_data, faults.next_data = faults.next_data, None
        if next_data is not None:  # only the first response to get here switches
            self._set_version(spec, next_data, AUTO, AUTO)


def _entity(
    record: RequestRecord, data: bytes, etag: str | None, last_modified: str | None, faults: Faults
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a GET or HEAD before transfer faults (cuts, rates) apply."""
    headers = {"Content-Type": "application/octet-stream"}
    if faults.accept_ranges is not None:
        headers["Accept-Ranges"] = faults.accept_ranges
    if etag is not None:
        headers["ETag"] = etag
    if last_modified is not None:
        headers["Last-Modified"] = last_modified
    total = len(data) if faults.wrong_total is None else faults.wrong_total
    wanted = None
    if record.method == "GET" and not faults.ignore_range and _if_range_holds(record, etag, last_modified):
        wanted = _parse_range(record.range, len(data))
    if wanted == _UNSATISFIABLE:
        return 416, {**headers, "Content-Range": f"bytes */{total}"}, b""
    status, body = 200, data
    if wanted is not None:
        start, end = wanted
        shift = faults.content_range_shift
        status, body = 206, data[start : end + 1]
        headers["Content-Range"] = f"bytes {start + shift}-{end + shift}/{total}"
        body += b"X" * faults.long_206
        if faults.bare_206:
            headers.pop("ETag", None)
            headers.pop("Last-Modified", None)
    if faults.gzip:
        body = gzip.compress(body, mtime=0)
        headers["Content-Encoding"] = "gzip"
    return status, headers, body


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``bytes=`` range, _UNSATISFIABLE, or None to ignore the header."""
    match = _RANGE.fullmatch(value.strip()) if value else None
    if match is None or match.group() == "bytes=-":
        return None  # absent, another unit, multi-range or malformed: the full body
    first, last = match.groups()
    if not first:  # bytes=-n: the last n bytes
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else _UNSATISFIABLE
    start, end = int(first), int(last) if last else size - 1
    if last and end < start:
        return None  # invalid, and RFC 9110 says to ignore an invalid Range
    return (start, min(end, size - 1)) if start < size else _UNSATISFIABLE


def _if_range_holds(record: RequestRecord, etag: str | None, last_modified: str | None) -> bool:
    """Whether If-Range lets the Range apply: a strong ETag match, or a date equal to Last-Modified."""
    value = record.header("If-Range")
    if value is None:
        return True
    if value.startswith(('"', "W/")):
        return etag is not None and not etag.startswith("W/") and value == etag
    if last_modified is None:
        return False
    try:
        return email.utils.parsedate_to_datetime(value) == email.utils.parsedate_to_datetime(last_modified)
    except (TypeError, ValueError):
        return False


def _hangs(record: RequestRecord, data: bytes, faults: Faults) -> bool:
    """Whether the request is one the faults leave unanswered (hang_from, hang_head)."""
    if record.method == "HEAD":
        return faults.hang_head
    return record.method == "GET" and faults.hang_from is not None and _start(record, data) >= faults.hang_from


def _start(record: RequestRecord, data: bytes) -> int:
    """The first byte a GET asks for."""
    wanted = _parse_range(record.range, len(data))
    return 0 if wanted is None else wanted[0]


def _wait_for_close(conn: _Conn) -> None:
    """Answer nothing until the client closes the connection (or it is dropped)."""
    while True:
        readable, _, _ = select.select([conn.sock], [], [], 0.1)
        if conn.dropped.is_set():
            raise _Dropped
        if readable:
            try:
                if not conn.sock.recv(65536):
                    return
            except OSError:  # reset: closed too
                return


def _send_head(conn: _Conn, status: int, headers: dict[str, str]) -> None:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", f"Date: {email.utils.formatdate(usegmt=True)}", "Server: faultserver"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def _write_chunk(conn: _Conn, record: RequestRecord, payload: bytes, chunked: bool) -> None:
    if chunked:
        conn.sock.sendall(b"%x\r\n" % len(payload))
    _send_counted(conn, record, payload)
    if chunked:
        conn.sock.sendall(b"\r\n")


def _send_counted(conn: _Conn, record: RequestRecord, payload: bytes) -> None:
    """Write payload, counted before the write so a client holding the bytes never sees a lower count."""
    record.body_bytes_sent += len(payload)
    unsent = memoryview(payload)
    try:
        while unsent:
            unsent = unsent[conn.sock.send(unsent) :]
    finally:
        record.body_bytes_sent -= len(unsent)  # exact again once the write returns or fails
