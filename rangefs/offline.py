"""Revalidation against servers that are down: one warning per server, the cache served meanwhile.

Imports rangefs.origin (for its types), errors and redact; never pyfuse3. Runs on the trio
thread. ``Reachability.probe`` wraps the origin's probe for the revalidation at open (see
rangefs.versions): when a server takes no connection, the first such probe logs one warning
for the server, and the opens of its files within ``RETRY_DOWN`` seconds do not ask it at all
(each would wait for the retries); they serve the cached version (rangefs.fs). The first probe
that gets an answer again logs that the server is back. Reads of blocks not cached still go to
the server, and fail with EIO after the retries while it is down: a mount started with its
server down (every file known to the catalog, rangefs.catalog) serves what is cached and works
again, without a remount, when the server is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from rangefs.errors import HostUnreachable
from rangefs.origin import RemoteFile, origin_of
from rangefs.redact import redact_url

log = logging.getLogger(__name__)

RETRY_DOWN = 5.0  # seconds an open trusts that a server found down is still down


class ServerDown(HostUnreachable):
    """The server of a URL took no connection (now, or lately: not asked again)."""


class Reachability:
    """Which servers took no connection lately, for the probes of revalidation."""

    def __init__(self, probe: Callable[[str], Awaitable[RemoteFile]]) -> None:
        self._probe = probe
        self._down: dict[str, float] = {}  # origin -> until when it is not asked again
        self._warned: set[str] = set()  # origins warned about and not back since

    def found_down(self, url: str, exc: Exception) -> str | None:
        """The server of ``url`` could not be reached: the warning, if it is the first since it
        last answered (logged here; None when it was already given)."""
        host = origin_of(url)
        self._down[host] = time.monotonic() + RETRY_DOWN
        if host in self._warned:
            return None
        self._warned.add(host)
        message = (f"{redact_url(host)} cannot be reached ({exc}); its files are served from the cache, "
                   "and blocks not cached fail, until it answers again")
        log.warning("%s", message)
        return message

    async def probe(self, url: str) -> RemoteFile:
        """The origin's probe of ``url``, unless its server was found down lately.

        Raises:
            ServerDown: it takes no connection (or did within RETRY_DOWN seconds).
            OriginError: as the origin's probe.
        """
        host = origin_of(url)
        until = self._down.get(host)
        if until is not None and time.monotonic() < until:
            raise ServerDown(f"{redact_url(url)}: not asked: its server took no connection {RETRY_DOWN:g}s ago")
        try:
            remote = await self._probe(url)
        except HostUnreachable as exc:
            self.found_down(url, exc)
            raise ServerDown(str(exc)) from None
        self._down.pop(host, None)
        if host in self._warned:
            self._warned.discard(host)
            log.warning("%s answers again", redact_url(host))
        return remote
