"""Which URLs a mount probes, when, and how a list entry becomes a cached file.

Imports rangefs.catalog, offline, origin, cache and cachedfile, tree, urllist, errors and redact;
sees rangefs.mount's MountOptions for typing only; never pyfuse3. Runs on the daemon's trio thread
before the mount (``learn``, ``_probe_all``) and after it (``Files``: lazy probes, reloads).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from rangefs.cache import Cache
from rangefs.cachedfile import CachedFile
from rangefs.catalog import Catalog
from rangefs.errors import HostUnreachable, OriginError, UsageError
from rangefs.offline import Reachability
from rangefs.origin import Origin, RemoteFile, origin_of
from rangefs.redact import redact_url
from rangefs.tree import Node
from rangefs.urllist import Entry

if TYPE_CHECKING:
    from rangefs.mount import MountOptions

log = logging.getLogger(__name__)

PROBE_CONCURRENCY = 16
# A list with more URLs than this that the catalog does not know mounts before they are probed
# (rangefs.lazy): probing each costs a round trip and some CPU, and a mount of thousands would
# keep its user waiting. Up to this many, the mount probes them first, so a URL that fails
# fails the mount (or is skipped with --skip-unavailable) as it always did.
_EAGER_PROBES = 256


async def learn(
    origin: Origin, entries: list[Entry], catalog: Catalog, reachability: Reachability, opts: MountOptions,
    warn: Callable[[str], None],
) -> tuple[list[tuple[Entry, RemoteFile, float | None]], list[Entry]]:
    """The usable entries (with when the catalog's record of each was made; None: probed now),
    and those to be probed after mounting.

    A list of up to _EAGER_PROBES URLs is probed at mount, as always: a remount sees what
    changed. In a longer one, what the catalog knows is not asked again: a remount lists the
    tree at once, and each file is revalidated at its first open as --revalidate-interval says;
    the URLs the catalog does not know are probed at mount if they are few, else the first of
    each host is (a host down fails the mount as before) and the rest after mounting.
    """
    known: list[tuple[Entry, RemoteFile, float | None]] = []
    unknown = entries
    if len(entries) > _EAGER_PROBES:
        unknown = []
        for entry in entries:
            saved = catalog.get(entry.url)
            if saved is None:
                unknown.append(entry)
            else:  # headers are never saved: the user's are added back
                known.append((entry, origin.with_user_headers(entry.url, saved.remote), saved.checked))
    if not unknown:
        return known, []
    scout_only = len(unknown) > _EAGER_PROBES
    probed, later = await _probe_all(origin, unknown, opts, warn, catalog, reachability, scout_only=scout_only)
    if later:
        log.info("%d URLs known to the catalog, %d to be probed after mounting", len(known), len(later))
    catalog.put_all((entry.url, remote) for entry, remote, checked in probed if checked is None)
    blob = catalog.snapshot()
    if blob is not None:
        await trio.to_thread.run_sync(catalog.write, blob)
    return known + probed, later


class Files:
    """How a list entry becomes a cached file of the mount (at mount, after a probe, at a reload)."""

    def __init__(self, opts: MountOptions, cache: Cache, catalog: Catalog, origin: Origin) -> None:
        self.opts = opts
        self.cache = cache
        self.catalog = catalog
        self.origin = origin

    def make(self, entry: Entry, remote: RemoteFile, checked: float | None = None) -> CachedFile:
        """``checked``: when the server last described it (a saved probe), else now."""
        growing = entry.option("grow") == "yes" or (self.opts.growing and entry.option("grow") != "no")
        cached = self.cache.file(entry.url, remote, growing)
        if cached.remote.headers != remote.headers:
            # A reload that changed the entry's own headers: the file's next range GETs send them.
            cached.remote = dataclasses.replace(cached.remote, headers=remote.headers)
        if checked is not None and cached.remote == remote:
            cached.versions.confirmed_at(checked)
        return cached

    def attach(self, node: Node, remote: RemoteFile) -> None:
        assert node.entry is not None
        node.cached = self.make(node.entry, remote)

    def known(self, entry: Entry) -> CachedFile | None:
        """The cached file of an entry the catalog knows, else None (a reload's new entries, whose
        own headers the origin learns here, for their probes and ranges)."""
        if entry.headers:
            self.origin.entry_headers[entry.url] = entry.headers
        else:
            self.origin.entry_headers.pop(entry.url, None)
        saved = self.catalog.get(entry.url)
        if saved is None:
            return None
        return self.make(entry, self.origin.with_user_headers(entry.url, saved.remote), saved.checked)

    def remember(self) -> None:
        """Record in the catalog the versions the files moved to while mounted (revalidation)."""
        for file in self.cache:
            saved = self.catalog.get(file.url)
            if saved is None or saved.remote != file.remote:
                self.catalog.put(file.url, file.remote)


async def _probe_all(
    origin: Origin, entries: list[Entry], opts: MountOptions, warn: Callable[[str], None],
    catalog: Catalog, reachability: Reachability, *, scout_only: bool = False,
) -> tuple[list[tuple[Entry, RemoteFile, float | None]], list[Entry]]:
    """Probe every URL, at most PROBE_CONCURRENCY at once; unusable ones fail the mount or are skipped.

    A host that takes no connection fails all its URLs with the one reason, found out once: each
    host's first URL is probed before the others, and a host found down fails its URLs not yet
    probed at once. The whole phase ends after ``opts.probe_timeout``; URLs not probed by then fail.
    A URL whose server cannot be reached but that the catalog knows is served from the cache (one
    warning per host). ``scout_only``: only each host's first URL is probed; the others of a host
    that answered are returned to be probed after mounting (rangefs.lazy).

    Returns the usable entries (with when the catalog's record of one was made, None: just now)
    and those left for later.
    """
    results: dict[int, RemoteFile | OriginError | None] = {}  # None: left for later
    limiter = trio.CapacityLimiter(PROBE_CONCURRENCY)
    hosts: dict[str, _HostProbes] = {}

    async def probe(index: int, entry: Entry, host: _HostProbes, first: bool) -> None:
        if not first:
            await host.scouted.wait()
            if scout_only and host.down is None:
                results[index] = None
                return
        async with limiter:
            if host.down is not None:
                results[index] = HostUnreachable(f"{redact_url(entry.url)}: not probed: {host.down}")
                return
            try:
                results[index] = await origin.probe(entry.url)
            except HostUnreachable as exc:
                results[index] = exc
                host.down = host.down or f"its host takes no connection (line {entry.line})"
            except OriginError as exc:
                results[index] = exc
            finally:
                if first:
                    host.scouted.set()

    with trio.move_on_after(opts.probe_timeout):
        async with trio.open_nursery() as nursery:
            for index, entry in enumerate(entries):
                key = origin_of(entry.url)
                first = key not in hosts  # the host's first URL in the list goes first
                host = hosts.setdefault(key, _HostProbes())
                nursery.start_soon(probe, index, entry, host, first)
    found: list[tuple[Entry, RemoteFile, float | None]] = []
    later: list[Entry] = []
    failures: list[str] = []
    for index, entry in enumerate(entries):
        result = results.get(index, _NOT_PROBED)
        saved = catalog.get(entry.url) if isinstance(result, HostUnreachable) else None
        if isinstance(result, RemoteFile):
            found.append((entry, result, None))
        elif result is None:
            later.append(entry)
        elif saved is not None:  # the server is down, the cache knows the file: serve what it has
            found.append((entry, origin.with_user_headers(entry.url, saved.remote), saved.checked))
            message = reachability.found_down(entry.url, result)  # once per host
            if message is not None:
                warn(message)
        elif result is _NOT_PROBED:
            failures.append(f"{opts.url_list} line {entry.line}: {redact_url(entry.url)}: not probed within "
                            f"{opts.probe_timeout:g}s (--probe-timeout)")
        else:
            failures.append(f"{opts.url_list} line {entry.line}: {result}")
    return _settle_failures(found, failures, opts, warn, len(later)), later


_NOT_PROBED = OriginError("not probed")  # a marker: the probe phase ended first


@dataclass
class _HostProbes:
    """The probe phase's knowledge of one host (scheme, name and port)."""

    scouted: trio.Event = field(default_factory=trio.Event)  # the probe of its first URL has ended
    down: str | None = None  # why it takes no connection, once found out


def _settle_failures(
    found: list[tuple[Entry, RemoteFile, float | None]], failures: list[str], opts: MountOptions,
    warn: Callable[[str], None], others: int = 0,
) -> list[tuple[Entry, RemoteFile, float | None]]:
    """``others``: the entries usable without a probe here (probed after mounting)."""
    for failure in failures:
        log.warning("%s", failure)
    if failures and not opts.skip_unavailable:
        more = f" (and {len(failures) - 1} more; --skip-unavailable mounts the rest)" if len(failures) > 1 else ""
        raise UsageError(failures[0] + more)
    for failure in failures:
        warn(f"{failure}; skipped")
    if not found and not others:
        raise UsageError(f"no URL in '{opts.url_list}' could be used")
    return found
