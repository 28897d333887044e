"""What probes learned, kept in the cache directory so that a remount need not ask again.

Imports httpx (to check a saved URL parses), rangefs.remote, redact, datafile, state and safefs; never pyfuse3
or trio. One file, ``catalog.json`` in the cache directory, shared by every mount of that cache
directory: a JSON object ``{"version": 1, "files": {KEY: RECORD}}``, KEY the URL's cache key
(a hash: rangefs.datafile.cache_key), RECORD::

    {"url": redacted listed URL (for people; never used), "final": the URL ranges go to when it
     is not the listed one, "size": int, "etag": str|null, "last_modified": str|null,
     "ranges": bool, "checked": seconds since the epoch of the probe}

No secret is written: a probe whose final URL differs from the listed one and carries userinfo
or query values (``redact_url`` changes it) is not recorded, and that URL is probed again at
every mount. Written whole to a temp file and renamed over the old one (rangefs.safefs), so a
reader sees the old catalog or the new one, never half of one. Two mounts sharing the cache
directory may each rewrite it: the later write wins, and a record the other wrote may be lost,
which costs one probe at the next mount, never a wrong answer (every record is checked against
the server at the first open after ``--revalidate-interval``, and a fetch's If-Range catches a
change in between). Bounded: at most ``MAX_RECORDS`` records, the oldest checked dropped first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx

from rangefs import safefs, state
from rangefs.datafile import cache_key
from rangefs.redact import redact_url
from rangefs.remote import RemoteFile

log = logging.getLogger(__name__)

NAME = "catalog.json"
VERSION = 1
MAX_RECORDS = 200_000  # about 60 MB of JSON at most; beyond, the oldest records go
_MAX_BYTES = 80 * 1024 * 1024  # a bigger file is not ours to trust: ignored (200,000 URLs take about 60 MB)


@dataclass(frozen=True)
class Known:
    """One URL's last probe, as saved."""

    remote: RemoteFile
    checked: float  # time.time() of the probe


class Catalog:
    """The saved probes of one cache directory; used on one thread (the trio thread, or a
    worker thread it waits for)."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / NAME
        self._records: dict[str, dict[str, object]] = {}
        self._dirty = False

    def load(self) -> None:
        """Read the saved catalog; a missing, foreign or damaged one counts as empty (logged)."""
        try:
            if safefs.lstat(self.path).st_size > _MAX_BYTES:  # before reading: json needs many times it
                raise ValueError("too large")
            blob = safefs.read_bytes(self.path)
            if len(blob) > _MAX_BYTES:
                raise ValueError("too large")
            data = json.loads(blob)
            if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("files"), dict):
                raise ValueError("not a catalog of this version")
            self._records = {k: v for k, v in data["files"].items() if isinstance(v, dict)}
        except FileNotFoundError:
            self._records = {}
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            log.warning("%s: ignored (%s); its URLs are probed again", self.path, type(exc).__name__
                        if isinstance(exc, RecursionError) else exc)
            self._records = {}

    def get(self, url: str) -> Known | None:
        """What the last probe of ``url`` learned, if it was saved and reads back whole."""
        record = self._records.get(cache_key(url))
        if record is None:
            return None
        try:
            final = record.get("final")
            size, checked = record["size"], record["checked"]
            etag, modified, ranges = record.get("etag"), record.get("last_modified"), record.get("ranges", True)
            if (not isinstance(size, int) or size < 0 or not isinstance(checked, (int, float))
                    or not all(v is None or isinstance(v, str) for v in (final, etag, modified))
                    or not isinstance(ranges, bool) or (isinstance(final, str) and not _usable(final))):
                return None
            remote = RemoteFile(url=final if isinstance(final, str) else url, size=size,
                                etag=etag if isinstance(etag, str) else None,
                                last_modified=modified if isinstance(modified, str) else None,
                                accept_ranges=ranges)
        except KeyError:
            return None
        return self._as_cached(url, remote, float(checked))

    def _as_cached(self, url: str, remote: RemoteFile, checked: float) -> Known:
        """The saved probe, unless the cache's state file records another version: the state is
        written at each version switch, the catalog only now and then, so after a crash (or a
        second mount's older save) the catalog may be the older of the two, and trusting it would
        drop the cached blocks as those of a changed file. Then the state's version is served and
        asked about at the first open (``checked`` 0)."""
        try:
            identity = state.read(self.path.parent / safefs.FILES / f"{cache_key(url)}.state").identity
        except (OSError, state.StateCorrupt):
            return Known(remote, checked)
        saved = (identity.size, identity.etag, identity.last_modified)
        if saved == (remote.size, remote.etag, remote.last_modified):
            return Known(remote, checked)
        remote = dataclasses.replace(remote, size=identity.size, etag=identity.etag,
                                     last_modified=identity.last_modified)
        return Known(remote, 0.0)

    def put(self, url: str, remote: RemoteFile, checked: float | None = None) -> None:
        """Record a probe of ``url`` (not when its final URL would carry a secret into the file)."""
        final: str | None = None
        if remote.url != url:
            if redact_url(remote.url) != remote.url:
                self._records.pop(cache_key(url), None)
                return
            final = remote.url
        self._records[cache_key(url)] = {
            "url": redact_url(url), "final": final, "size": remote.size, "etag": remote.etag,
            "last_modified": remote.last_modified, "ranges": remote.accept_ranges,
            "checked": time.time() if checked is None else checked,
        }
        self._dirty = True

    def put_all(self, probed: Iterable[tuple[str, RemoteFile]]) -> None:
        for url, remote in probed:
            self.put(url, remote)

    def save(self) -> None:
        """Write the catalog if anything changed (see ``snapshot`` and ``write``)."""
        blob = self.snapshot()
        if blob is not None:
            self.write(blob)

    def snapshot(self) -> bytes | None:
        """The catalog's bytes if anything changed since the last one (None: nothing to write);
        taken on the thread that changes it, so that ``write`` may run in another."""
        if not self._dirty:
            return None
        if len(self._records) > MAX_RECORDS:
            oldest = sorted(self._records, key=lambda k: _checked(self._records[k]))
            for key in oldest[: len(self._records) - MAX_RECORDS]:
                del self._records[key]
        self._dirty = False
        return json.dumps({"version": VERSION, "files": self._records}, separators=(",", ":")).encode()

    def write(self, blob: bytes) -> None:
        """Replace the catalog file by ``blob`` atomically (a failure is logged, not raised: the
        catalog only spares probes)."""
        temp = safefs.temp_path(self.path)
        try:
            fd = safefs.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            safefs.replace(temp, self.path)
        except OSError as exc:
            safefs.unlink(temp)
            log.warning("%s: not saved: %s", self.path, exc.strerror or exc)


def _checked(record: dict[str, object]) -> float:
    value = record.get("checked")
    return float(value) if isinstance(value, (int, float)) else 0.0


def _usable(url: str) -> bool:
    """Whether a saved final URL is an http(s) URL httpx can parse (a damaged one counts as unsaved)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)
