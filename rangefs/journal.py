"""Durability of one cached file: when and how its progress is saved (recorded) and flushed.

Imports rangefs.state, checksums and bitmap; sees its cached file (rangefs.cachedfile) to reach
the bitmap, the data file and the cache, and, after a failed flush (``_flush_failed``), to set
the bitmap back to the persisted blocks and distrust every verified one. The rules it keeps:

- A block's bit is set only after its data is written to the data file (the fetch's sink calls
  ``written`` after it set the bits), so whatever a save records was written.
- A saved bitmap never records a block whose sum is not written before it: a save (``save``,
  every few MiB or a fraction of a second of progress) writes the new sums, then the state, in
  place, into the slot that does not hold the newest save (rangefs.state), without waiting for
  the data to reach the disk. A block recorded but lost to a power cut fails its check before
  first use (rangefs.verifier) and is fetched again.
- A checkpoint (``checkpoint``) also flushes: it snapshots the bitmap, fdatasyncs the data
  file, then saves a state marked synced when nothing was added meanwhile; only flushed blocks
  count as ``persisted`` (what passthrough may rely on). Blocks found damaged during the flush
  (``_damaged``) are taken out of what it records as flushed.
- Locks: ``checkpoint_lock`` before ``_save_lock``; whoever opens, replaces or closes the files
  holds both (``files_locked``). Saves and checkpoints run shielded from cancellation: cancelled
  half way, they would have taken the marks of progress without recording it.

Fields, all written on the trio thread except ``persisted``, ``dirty`` and ``unsaved``, which
the cached file's open, grow and reset also write in a worker thread while holding both locks:
``dirty`` (blocks written or discarded since the last flush and save), ``unsaved`` (the state
file does not record everything written yet), ``persisted`` (blocks the state file records,
flushed, less any found damaged), ``_unsaved_blocks`` and ``_added`` (blocks written since the
last save, and in this session), ``_save_spawned`` (a save is started and waits for
``_save_lock``), ``_damaged`` (blocks found damaged since the running checkpoint's snapshot).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from rangefs import checksums, state
from rangefs.bitmap import Bitmap

if TYPE_CHECKING:
    from rangefs.cachedfile import CachedFile

log = logging.getLogger(__name__)

# A save records the blocks written so far at most this long after the first unrecorded one, or
# once this much is unrecorded: what a kill -9 can lose. A save writes a few sums and a state
# file the size of the run list, and waits for no flush, so it can come this often.
SAVE_DELAY = 0.2
SAVE_BYTES = 8 * 1024 * 1024


class Journal:
    """Saves and checkpoints of one cached file, and what they have made durable."""

    def __init__(self, file: CachedFile) -> None:
        self._file = file
        self.dirty = False
        self.unsaved = False
        self._unsaved_blocks = 0
        self._save_spawned = False
        self._added = 0  # a checkpoint tells by it whether any block came during its flush
        self.checkpoint_lock = trio.Lock()
        self._save_lock = trio.Lock()  # held while the state and sums files are written
        self.persisted: Bitmap | None = None
        self._damaged: set[int] = set()

    @asynccontextmanager
    async def files_locked(self) -> AsyncIterator[None]:
        """Hold off checkpoints and saves (to open, close or replace the files)."""
        async with self.checkpoint_lock, self._save_lock:
            yield

    def written(self, blocks: int) -> None:
        """Progress to save: soon, and at once when much is unsaved."""
        self.dirty = self.unsaved = True
        self._added += blocks
        self._unsaved_blocks += blocks
        self._file.cache.dirtied(self._file)
        if self._unsaved_blocks * self._file.block_size >= SAVE_BYTES:
            self.save_soon()

    def discarded(self, blocks: set[int]) -> None:
        """``blocks`` failed their check and left the bitmap: none of them counts as flushed."""
        for block in blocks:
            self._damaged.add(block)  # a checkpoint running now must not record it as flushed
            if self.persisted is not None:
                self.persisted.discard(block)
        self.dirty = self.unsaved = True

    def save_soon(self) -> None:
        """Start a save in the background unless one waits to start (a save of one file must not
        hold up another's: a version switch holds the file's locks while it asks the server)."""
        if not self._save_spawned:
            self._save_spawned = self._file.cache.spawn(self.save)

    async def save(self) -> None:
        """Record every block written so far in the state file, without flushing the data first.

        Each recorded block's sum is written before the state file, and a block is checked against
        its sum before first use in a session: a record that outlives the block's bytes (a power
        cut) costs a refetch, never a wrong byte. Survives a kill -9, not a power cut (no fsync).
        """
        async with self._save_lock:
            self._save_spawned = False
            with trio.CancelScope(shield=True):  # a cancelled save would leave its progress unmarked
                if self.unsaved and self._file.data.fd >= 0:
                    await self._write_state(synced=False)

    async def record(self) -> bool:
        """Write the state now, as the bitmap stands (eviction must know that no state records
        the blocks it cleared before it punches them); whether it was written."""
        async with self._save_lock:
            with trio.CancelScope(shield=True):
                written = self._file.data.fd >= 0
                if written:
                    self.unsaved = True
                    written = await self._write_state(synced=False)
            return written

    async def _write_state(self, *, synced: bool) -> bool:
        """Write the unwritten sums, then the state file recording the bitmap (``_save_lock`` held).
        ``synced``: every recorded block was flushed; the save is then made durable too."""
        file, data = self._file, self._file.data
        snapshot, identity = file.open_bitmap().copy(), file.identity
        pieces = data.sums.take_unwritten()
        self.unsaved, self._unsaved_blocks = False, 0

        def write() -> None:
            checksums.write(data.sums_path, pieces, sync=synced)
            state.save(data.state_path, identity, snapshot, synced=synced, durable=synced)

        try:
            await trio.to_thread.run_sync(write)
        except OSError as exc:  # the data is safe; only the record of it waits for the next try
            log.warning("%s: cannot save cache state: %s", file.identity.url, exc.strerror)
            data.sums.unwritten_again(pieces)
            self.unsaved = True
            return False
        return True

    async def checkpoint(self) -> None:
        """Record the present blocks at once, then flush them and save the state as flushed."""
        await self.save()  # a flush after a large read takes long: record first
        async with self.checkpoint_lock:
            # Shielded: cancelled half way (the mount stopping during a flush), it would have
            # taken the dirty marks without saving the state, and the unmount's own checkpoint
            # would find nothing to save.
            with trio.CancelScope(shield=True):
                if not self.dirty or self._file.data.fd < 0:
                    return
                snapshot, added = self._file.open_bitmap().copy(), self._added
                self._damaged.clear()
                self.dirty = False
                try:
                    await trio.to_thread.run_sync(os.fdatasync, self._file.data.fd)
                except OSError as exc:
                    await self._flush_failed(exc)
                    return
                async with self._save_lock:
                    self.unsaved = True  # the state is rewritten, marked synced or not
                    if not await self._write_state(synced=self._added == added):
                        self.dirty = True
                        return
                for block in self._damaged:  # found damaged during the flush: its rewrite may not be on disk
                    snapshot.discard(block)
                self.persisted = snapshot

    async def _flush_failed(self, exc: OSError) -> None:
        """After a failed fdatasync the kernel forgets the error: a later one succeeds without the
        lost pages. Forget every block written since the last good flush."""
        file = self._file
        log.warning("%s: cannot flush the cache file: %s; refetching recent blocks", file.identity.url, exc.strerror)
        file.bitmap = (self.persisted or Bitmap(file.identity.nblocks)).copy()
        # A block flushed before may have been rewritten since, and that write lost (its pages
        # stay cached, clean, until evicted): evict them from the page cache, then check every block
        # again, from the disk, against the sums of what was last written.
        await trio.to_thread.run_sync(file.data.evict_page_cache)
        file.verifier.verified = Bitmap(file.identity.nblocks)
        self.dirty = self.unsaved = True
        file.cache.dirtied(file)
