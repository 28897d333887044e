"""The rangefs exception hierarchy, and which of its errors a failed fetch becomes.

Imports nothing else of rangefs.

    RangefsError                  anything rangefs raises on purpose
     +-- UsageError               bad input from the user: message is a one-line reason shown as is
     |    +-- UrlListError        a URL list that cannot be used (names the file and line)
     +-- OriginError              the remote did not give us the bytes (HTTP or network level)
     |    +-- RemoteNotFound      404/410: the file is not there
     |    +-- RemoteUnreachable   connect/read failures and timeouts, after the retries
     |    |    +-- HostUnreachable  no connection at all: every URL of that host fails alike
     |    +-- RemoteChanged       the validator or size no longer matches what we cached
     |    +-- BadResponse         an answer we refuse to trust (Content-Range mismatch, short body)
     |         +-- RangesIgnored  a 200 with the whole file to a ranged GET: stream the file instead
     +-- CacheError               the local cache cannot be used (unwritable, locked by another process)
          +-- CacheUnwritable      a block could not be written (disk full): serve it without caching
          +-- FetchInterrupted     a fetch stopped for a reason of ours (cancelled, helper died): try again

The FUSE layer maps these to errno in one table (rangefs.fs); the CLI prints the message of a
UsageError or any RangefsError raised during start-up as one line. A fetch's exception
becomes what its readers see in one place, ``classify_fetch_error``.
"""

from __future__ import annotations

import logging


class RangefsError(Exception):
    """Base of every error rangefs raises on purpose."""


class UsageError(RangefsError):
    """Bad input given by the user (arguments, files, mount point)."""


class UrlListError(UsageError):
    """A URL list that cannot be used; the message names the file and line."""


class OriginError(RangefsError):
    """The remote server did not deliver what was asked."""


class RemoteNotFound(OriginError):
    """The server answered 404 or 410."""


class RemoteUnreachable(OriginError):
    """The server could not be reached or stopped answering, after the retries."""


class HostUnreachable(RemoteUnreachable):
    """No connection to the server could be made (refused, timed out, no such host): every URL
    of that host would fail the same way."""


class RemoteChanged(OriginError):
    """The remote file is not the version we know (validator or size changed)."""


class BadResponse(OriginError):
    """An answer that does not match the request (status, Content-Range, length)."""


class RangesIgnored(BadResponse):
    """The server answered a ranged GET with the whole file (same version): it ignores Range."""


class CacheError(RangefsError):
    """The local cache cannot be used."""


class CacheUnwritable(CacheError):
    """Writing fetched bytes into the cache failed (disk full, read-only, I/O error)."""


class FetchInterrupted(CacheError):
    """A fetch ended for a reason of rangefs's own (cancelled, its helper process died); a reader
    that needs its blocks fetches them again."""


def classify_fetch_error(url: str, exc: Exception, log: logging.Logger) -> RangefsError:
    """The error the readers of a failed fetch see; ``url`` is the file's URL as messages show it.

    A RangefsError is itself. An OSError is a write to the cache that failed: CacheUnwritable,
    so a reader may be served without the cache. Anything else is a bug: it is logged on ``log``
    with its traceback and becomes a CacheError, so it fails the read, not the mount.
    """
    if isinstance(exc, RangefsError):
        return exc
    if isinstance(exc, OSError):
        return CacheUnwritable(f"{url}: cannot write the cache file: {exc.strerror}")
    log.error("%s: unexpected error while fetching", url, exc_info=exc)
    return CacheError(f"{url}: unexpected error: {exc!r}")
