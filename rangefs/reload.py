"""Reload: read the URL list again and change the mount's tree to match, while it is mounted.

Imports rangefs.urllist, tree, lazy, fs (for its types) and errors; uses pyfuse3 only to tell
the kernel which names are gone. Asked by SIGHUP to the daemon (``on_signal``: the outcome goes
to the log) or by ``rangefs reload MOUNTPOINT`` over the control socket (rangefs.control: the
outcome, or the refusal naming the bad line, goes back to the command). Runs on the trio thread,
one reload at a time (``_lock``); the list is read in a worker thread.

- A list that does not parse is refused with its line number; the tree stays as it was.
- An entry whose path and line content (URL, options) are unchanged keeps its inode, so files
  open and names the kernel holds stay valid. An entry removed or changed leaves the tree: its
  name (and directories left empty) is gone for lookups and readdir at once; a handle open on it
  keeps reading its cached file until closed, and its node is forgotten at its last release
  (rangefs.fs). A new entry appears at once; if the catalog does not know its URL, its probe is
  queued (rangefs.lazy), and a lookup waits for it.
- The kernel's dentry cache is told of every removed name (``pyfuse3.invalidate_entry``) and
  the changed directories' attributes are dropped (``invalidate_inode``), from a worker thread
  after the tree has changed, never from a request handler: the kernel may hold a directory's
  lock while it waits for a lookup of ours, and the notification would wait for that lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from rangefs.cachedfile import CachedFile
from rangefs.errors import RangefsError, UsageError
from rangefs.fs import Filesystem
from rangefs.lazy import Probes
from rangefs.tree import Node
from rangefs.urllist import Entry, load_url_list

log = logging.getLogger(__name__)


class Reloader:
    """Reloads of one mount's URL list."""

    def __init__(
        self,
        fs: Filesystem,
        probes: Probes,
        known: Callable[[Entry], CachedFile | None],
        list_path: Path,
    ) -> None:
        """``known(entry)``: the cached file of an entry the catalog knows, else None."""
        self.fs = fs
        self.probes = probes
        self.known = known
        self.list_path = list_path
        self._lock = trio.Lock()

    async def reload(self) -> str:
        """Reread the list and apply it; the outcome, one line.

        Raises:
            UsageError: the list cannot be read or parsed (the message names its line); the tree
                is unchanged.
        """
        async with self._lock:
            try:
                entries = await trio.to_thread.run_sync(load_url_list, self.list_path)
            except RangefsError as exc:
                message = f"reload refused, the mount keeps its files: {exc}"
                log.warning("%s", message)
                raise UsageError(message) from None
            added, removed, stale = self._apply(entries)
            message = f"{len(entries)} entries, {added} added, {removed} removed"
            log.info("reloaded %s: %s", self.list_path, message)
            await self._invalidate(stale)
            return message

    async def on_signal(self) -> None:
        """A reload asked by SIGHUP: its outcome is logged, nobody waits for it."""
        try:
            await self.reload()
        except UsageError:
            pass  # logged by reload
        except Exception:  # a signal's reload must never end the daemon
            log.exception("reload failed; the mount keeps its files")

    def _apply(self, entries: list[Entry]) -> tuple[int, int, list[tuple[int, bytes]]]:
        """Change the tree (no await: handlers see the old tree or the new one, never half)."""
        tree = self.fs.tree
        current = {node.entry.path: node for node in tree.files() if node.entry is not None}
        wanted = {entry.path: entry for entry in entries}
        stale: list[tuple[int, bytes]] = []
        removed = 0
        for path, node in current.items():
            entry = wanted.get(path)
            assert node.entry is not None
            if entry is not None and _same(entry, node.entry):
                node.entry = entry  # its line number may have moved
                continue
            stale.extend(tree.detach(node.inode))
            self.probes.forget(node.inode)
            if not self.fs.has_handles(node.inode):
                tree.drop(node.inode)
            removed += 1
        new: list[Node] = []
        for path, entry in wanted.items():
            kept = current.get(path)
            if kept is not None and kept.attached:
                continue
            new.append(tree.add_file(entry, self.known(entry)))
        self.probes.add(node for node in new if node.cached is None)
        return len(new), removed, stale

    async def _invalidate(self, stale: list[tuple[int, bytes]]) -> None:
        parents = {parent for parent, _ in stale}
        for parent, name in stale:
            await trio.to_thread.run_sync(_invalidate_entry, parent, name)
        for parent in parents:
            await trio.to_thread.run_sync(_invalidate_inode, parent)


def _same(a: Entry, b: Entry) -> bool:
    return a.url == b.url and a.options == b.options


def _invalidate_entry(parent: int, name: bytes) -> None:
    try:
        pyfuse3.invalidate_entry(pyfuse3.InodeT(parent), pyfuse3.FileNameT(name))
    except OSError:
        pass  # the kernel does not hold that name (ENOENT): nothing to forget


def _invalidate_inode(inode: int) -> None:
    try:
        pyfuse3.invalidate_inode(pyfuse3.InodeT(inode), attr_only=False)
    except OSError:
        pass  # the kernel does not hold that inode
