"""An in-memory HTTP origin for unit tests, served through httpx.MockTransport.

It honours Range and If-Range like nginx, and each misbehaviour a test needs is a switch.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import trio

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class FakeOrigin:
    """One file at any path; ``requests`` records every request's (method, Range) in order."""

    data: bytes
    etag: str | None = '"v1"'
    last_modified: str | None = "Mon, 23 Nov 2026 08:00:00 GMT"
    ignore_ranges: bool = False
    cut_after: int | None = None  # send at most this many body bytes per response
    content_range_shift: int = 0  # lie in Content-Range by this many bytes
    answer_etag: str | None = None  # a different ETag in 206 answers (a server ignoring If-Range)
    encoding: str | None = None
    chunk_delay: float = 0.0  # send bodies in 64 KiB chunks this many seconds apart (trio only)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def _headers(self) -> dict[str, str]:
        headers = {}
        if self.etag is not None:
            headers["ETag"] = self.etag
        if self.last_modified is not None:
            headers["Last-Modified"] = self.last_modified
        if self.encoding:
            headers["Content-Encoding"] = self.encoding
        return headers

    def handle(self, request: httpx.Request) -> httpx.Response:
        range_header = request.headers.get("Range", "")
        self.requests.append((request.method, range_header))
        headers = self._headers()
        if request.method == "HEAD":
            return httpx.Response(200, headers={**headers, "Content-Length": str(len(self.data))})
        match = _RANGE.match(range_header)
        if_range = request.headers.get("If-Range")
        stale = if_range is not None and if_range not in (self.etag, self.last_modified)
        if self.ignore_ranges or not match or stale:
            return _response(200, headers, self.data, self.chunk_delay)
        start = int(match.group(1))
        end = min(int(match.group(2) or len(self.data) - 1), len(self.data) - 1)
        body = self.data[start : end + 1]
        if self.cut_after is not None:
            body = body[: self.cut_after]
        shift = self.content_range_shift
        headers["Content-Range"] = f"bytes {start + shift}-{end + shift}/{len(self.data)}"
        if self.answer_etag is not None:
            headers["ETag"] = self.answer_etag
        return _response(206, headers, body, self.chunk_delay)


def _response(status: int, headers: dict[str, str], body: bytes, delay: float = 0.0) -> httpx.Response:
    """A response whose body is a raw stream, as from a socket (``content=`` would count as read)."""
    headers = {**headers, "Content-Length": str(len(body))}
    stream = _SlowStream(body, delay) if delay else httpx.ByteStream(body)
    return httpx.Response(status, headers=headers, stream=stream)


class _SlowStream(httpx.AsyncByteStream):
    def __init__(self, body: bytes, delay: float) -> None:
        self.body, self.delay = body, delay

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.body), 64 * 1024):
            await trio.sleep(self.delay)
            yield self.body[start : start + 64 * 1024]
