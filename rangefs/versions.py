"""Switching one cached file to a new version of its remote file, and what the new one keeps.

Imports rangefs.bitmap, state, errors and origin; sees its cached file (rangefs.cachedfile) to
reach its lock, flights, journal and data file. Runs on the trio thread. The rules it keeps:

- A switch holds the file's ``lock`` (no user arrives or leaves meanwhile), sets the file's
  ``switching`` event (readers wait for it instead of claiming blocks), stops every fetch
  (none may write into the new version's data file), then, holding both journal locks,
  replaces the version, bumps ``generation`` and replaces the bitmap: never the old bitmap
  under the new version, even if what follows fails.
- No switch while passthrough handles are open: the kernel reads the data file for them, and
  emptying it would serve them zeros; ``stale`` makes every open ask again until they close.
- ``_validated`` (when the server last confirmed the version) is written on the trio thread only.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import trio

from rangefs import state
from rangefs.bitmap import Bitmap
from rangefs.errors import RangefsError, RemoteChanged
from rangefs.origin import RemoteFile

if TYPE_CHECKING:
    from rangefs.cachedfile import CachedFile

log = logging.getLogger(__name__)


class Versions:
    """Revalidation of one cached file against its server, and the switch to a new version."""

    def __init__(self, file: CachedFile) -> None:
        self._file = file
        self._validated = time.monotonic()

    def confirmed_at(self, wall: float) -> None:
        """The server last confirmed the version at ``wall`` (``time.time()``): a probe saved in
        the catalog (rangefs.catalog), so that a remount revalidates as the interval says."""
        self._validated = time.monotonic() - max(0.0, time.time() - wall)

    async def revalidate(self, *, force: bool = False) -> bool:
        """Ask the server whether the file changed, if due; switch to a new version. True if it did.

        Due when ``force``, when a fetch saw a change, or when ``revalidate_interval`` has
        passed since the last confirmation. A new version discards every cached block (the
        data file is replaced by an empty one, the state file rewritten) and bumps ``generation``.

        Raises:
            RemoteChanged: it changed, but passthrough handles still read the data file, so the
                cache stays on the old version until they close (``stale`` makes opens ask again).
            OriginError: the server could not be asked (the cached version stays).
            CacheError: unmounting (the probe is cancelled, see Cache.network).
        """
        file = self._file
        due = self._validated + file.cache.config.revalidate_interval
        if not (force or file.stale or time.monotonic() >= due) or file.cache.probe is None:
            return False
        remote = await file.cache.network(file.identity.url, file.cache.probe, file.url)
        self._validated = time.monotonic()
        if self._same_version(remote):
            file.stale = False
            return False
        async with file.lock:
            if self._same_version(remote):
                return False  # another open switched while we waited for the lock
            if file.passthrough_handles:
                # The kernel reads the data file for them: emptying it would serve them zeros.
                # They keep the old version, whole; the switch happens at the first open after.
                file.stale = True  # so every open asks again until then
                raise RemoteChanged(f"{file.identity.url}: the remote file changed while {file.passthrough_handles} "
                                    f"open handle(s) read the cached version; open it again once they are closed")
            log.warning("%s: the remote file changed (size %d -> %d); dropping its cached blocks",
                        file.identity.url, file.remote.size, remote.size)
            switching = file.switching = trio.Event()  # readers wait for it instead of claiming blocks
            try:
                await file.flights.stop()
                async with file.journal.files_locked():
                    await self._switch(remote)
            finally:
                switching.set()
                file.switching = None
        return True

    async def _switch(self, remote: RemoteFile) -> None:
        """Make ``remote`` the version (the file's lock and both journal locks held, no fetch running)."""
        file = self._file
        old_identity, old_bitmap = file.identity, file.bitmap
        file.set_version(remote)
        file.generation += 1
        file.stale = False
        file.journal.dirty = file.journal.unsaved = False
        if file.data.fd >= 0 and old_bitmap is not None:
            # Never the old bitmap under the new version, even if what follows fails.
            file.bitmap = Bitmap(file.identity.nblocks)
            file.journal.persisted = Bitmap(file.identity.nblocks)
            file.bitmap = await self.adopt(old_identity, old_bitmap)
        else:  # the next open finds the old state and resets
            file.unload()

    async def adopt(self, old: state.Identity, old_bitmap: Bitmap) -> Bitmap:
        """The bitmap for the new version (open files): the old one's whole blocks if the file only
        grew (checked by fetching the last cached whole block again), else an empty cache."""
        file = self._file
        block_size = file.block_size
        keep = old.size // block_size  # whole blocks of the old version; its partial tail goes
        check = old_bitmap.last_before(keep)
        if (file.growing and check is not None and file.cache.direct is not None
                and old.block_size == block_size and old.size < file.size):
            start = check * block_size
            try:
                fresh = await file.cache.network(file.identity.url, file.cache.direct, file.remote, start,
                                                 start + block_size)
                kept = await trio.to_thread.run_sync(os.pread, file.data.fd, block_size, start)
            except (RangefsError, OSError) as exc:
                log.info("%s: cannot check the cached prefix (%s)", file.identity.url, exc)
            else:
                if fresh == kept:
                    runs = ((first, min(stop, keep)) for first, stop in old_bitmap.runs() if first < keep)
                    bitmap = Bitmap.from_runs(file.identity.nblocks, runs)
                    try:
                        await trio.to_thread.run_sync(self._grow, bitmap)
                    except OSError as exc:  # e.g. no room for the larger state file: start afresh
                        log.warning("%s: cannot keep the cached blocks of the file that grew (%s); dropping them",
                                    file.identity.url, exc.strerror)
                    else:
                        log.info("%s: grew from %d to %d bytes; kept %d cached blocks", file.identity.url,
                                 old.size, file.size, len(bitmap))
                        return bitmap
                else:
                    log.info("%s: not a pure append (block %d differs); dropping the cached blocks",
                             file.identity.url, check)
        try:
            return await trio.to_thread.run_sync(file.reset)
        except OSError as exc:
            log.warning("%s: cannot empty the cache file (%s); its old blocks are not used", file.identity.url,
                        exc.strerror)
            file.journal.persisted = Bitmap(file.identity.nblocks)
            file.unwritable()  # not into the old file for now: the kernel may still read it
            return Bitmap(file.identity.nblocks)

    def _grow(self, bitmap: Bitmap) -> None:
        """Keep ``bitmap`` for the new, larger version (worker thread, both journal locks held)."""
        file = self._file
        file.verifier.narrow(bitmap)
        file.data.grow(file.identity, bitmap)
        file.journal.persisted = bitmap.copy()

    def _same_version(self, remote: RemoteFile) -> bool:
        # Without a validator no version can be told apart; such a cache is never reused anyway.
        current = self._file.remote
        return remote.size == current.size and remote.if_range == current.if_range and bool(remote.if_range)

    def changed(self) -> None:
        """A fetch learned that the remote changed: fail the reads of this version from now on,
        and move the cache to the new version in the background (an open would do it too)."""
        file = self._file
        if file.stale:
            return
        file.stale = True
        file.cache.spawn(self._revalidate_quietly)

    async def _revalidate_quietly(self) -> None:
        try:
            await self.revalidate(force=True)
        except RangefsError as exc:
            log.warning("%s: cannot learn the new version: %s", self._file.identity.url, exc)
