"""A remote file's version, and the checks an HTTP answer must pass to be taken as its bytes.

Pure logic over status, headers and the version known (``RemoteFile``); imports no HTTP client:
rangefs.origin reads the answers (through httpx or rangefs.http11) and hands them here. A check
raises a rangefs.errors exception when the answer can never be used, and ``Retry`` when another
attempt may fix it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Protocol

from rangefs.errors import BadResponse, RangesIgnored, RemoteChanged, RemoteNotFound
from rangefs.redact import redact_url

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class RemoteFile:
    """One version of a remote file, as the server described it."""

    url: str  # where ranges are fetched from: the final URL after redirects
    size: int
    etag: str | None
    last_modified: str | None
    accept_ranges: bool = True
    # Sent with every request for it (rangefs.auth): the user's headers when ``url`` is on the listed
    # URL's origin, else none. Secrets: out of repr, and not part of what makes a version.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False, compare=False)

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


class Retry(Exception):
    """An attempt failed in a way another attempt may fix.

    ``counts``: the failure counts against the retries even when the attempt made progress
    (a trickle makes progress on every attempt, and must still end).
    """

    def __init__(self, reason: str, delay: float | None = None, *, counts: bool = False) -> None:
        super().__init__(reason)
        self.delay = delay
        self.counts = counts
        self.no_connection = False  # no connection could be made: the host, not this URL, fails


class Answer(Protocol):
    """What the checks read of a response: httpx.Response, or rangefs.http11.RangeResponse."""

    @property
    def status_code(self) -> int: ...
    @property
    def reason_phrase(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    def aiter_raw(self) -> AsyncIterator[bytes]: ...


def status_line(resp: Answer) -> str:
    return f"{resp.status_code} {resp.reason_phrase}".strip()


def raise_for_status(url: str, resp: Answer) -> None:
    """Map the statuses that mean "not there" or "try again" to our errors."""
    if resp.status_code in (404, 410):
        raise RemoteNotFound(f"{redact_url(url)} answered {status_line(resp)}")
    if resp.status_code == 429 or (resp.status_code >= 500 and resp.status_code != 501):
        raise Retry(f"server answered {status_line(resp)}", delay=retry_after(resp))


def refuse_encoding(url: str, resp: Answer) -> None:
    """A size from an encoded answer counts encoded bytes: not the file's size."""
    encoding = resp.headers.get("Content-Encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise BadResponse(f"{redact_url(url)}: the server encodes the file ({encoding}) although asked not to; "
                          "its ranges would not be the file's bytes")


def retry_after(resp: Answer) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return min(float(value), 60.0) if value.isdigit() else None


def check_range_answer(remote: RemoteFile, resp: Answer, start: int, stop: int) -> None:
    """Accept only a 206 for exactly ``bytes start-(stop-1)/size`` with an identity body."""
    raise_for_status(remote.url, resp)
    if resp.status_code == 200 and same_version(remote, resp):
        raise RangesIgnored(f"{redact_url(remote.url)}: the server ignores Range requests (answered 200 OK)")
    if resp.status_code in (200, 416):
        raise RemoteChanged(f"{redact_url(remote.url)}: answered {status_line(resp)} to a ranged GET with If-Range")
    if not same_version(remote, resp):
        raise RemoteChanged(f"{redact_url(remote.url)}: a 206 for another version (ETag or Last-Modified changed)")
    if resp.status_code != 206:
        raise BadResponse(f"{redact_url(remote.url)}: answered {status_line(resp)} to a ranged GET")
    encoding = resp.headers.get("Content-Encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise Retry(f"answered with Content-Encoding {encoding!r} to a ranged GET")
    match = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    expected = (start, stop - 1, remote.size)
    if not match or match.group(3) == "*":
        raise Retry(f"206 without a usable Content-Range ({resp.headers.get('Content-Range')!r})")
    got = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    if got[2] != remote.size:
        raise RemoteChanged(f"{redact_url(remote.url)}: size changed from {remote.size} to {got[2]}")
    if got != expected:
        raise Retry(f"Content-Range {got[0]}-{got[1]} does not match the request {start}-{stop - 1}")


def same_version(remote: RemoteFile, resp: Answer) -> bool:
    """False when the answer names a validator other than the one we know (not all servers name one)."""
    etag = resp.headers.get("ETag")
    if etag is not None and remote.etag is not None and etag != remote.etag:
        return False
    modified = resp.headers.get("Last-Modified")
    return modified is None or remote.last_modified is None or modified == remote.last_modified


def total_from_content_range(url: str, resp: Answer) -> int:
    match = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
    if not match or match.group(3) == "*":
        raise BadResponse(f"{redact_url(url)}: 206 without a total in Content-Range")
    return int(match.group(3))
