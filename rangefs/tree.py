"""The mount's inodes: files and directories, from the URL list.

One file per URL-list entry, directories from their paths. Imports the cache only for the type
of a file's cached state; never pyfuse3 (the root's inode number is the protocol's own). Built
before the mount; afterwards changed only by a reload (rangefs.reload) and by a file's probe
ending (``cached`` set, rangefs.lazy), both on the trio thread, between the handlers' awaits.
An inode number is never reused within a mount: a node a reload removed may still be named by
the kernel or by an open handle.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rangefs.urllist import Entry

if TYPE_CHECKING:
    from rangefs.cachedfile import CachedFile

# FUSE_ROOT_ID of <linux/fuse.h> (pyfuse3.ROOT_INODE): the kernel names the mount's root so.
ROOT_INODE = 1


@dataclass
class Node:
    """A file or directory of the mount."""

    inode: int
    name: bytes
    parent: int
    children: dict[bytes, int] | None = None  # directories only
    entry: Entry | None = None  # files only
    cached: CachedFile | None = None  # files only, once probed (see rangefs.lazy)
    attached: bool = True  # False once a reload took it out of the tree

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclass
class Tree:
    """Inodes of the mount, built from the URL list."""

    nodes: dict[int, Node] = field(default_factory=dict)
    _next_inode: int = ROOT_INODE + 1

    @classmethod
    def build(cls, files: Sequence[tuple[Entry, CachedFile | None]]) -> Tree:
        tree = cls()
        tree.nodes[ROOT_INODE] = Node(ROOT_INODE, b"", ROOT_INODE, children={})
        for entry, cached in files:
            tree.add_file(entry, cached)
        return tree

    def add_file(self, entry: Entry, cached: CachedFile | None) -> Node:
        """A file at ``entry.path``, with the directories above it (the path must be free)."""
        parent = self.nodes[ROOT_INODE]
        for part in entry.path[:-1]:
            parent = self._subdir(parent, os.fsencode(part))
        node = self._add(parent, os.fsencode(entry.path[-1]))
        node.entry, node.cached = entry, cached
        return node

    def files(self) -> Iterator[Node]:
        """The file nodes in the tree."""
        return (node for node in self.nodes.values() if node.entry is not None and node.attached)

    def detach(self, inode: int) -> list[tuple[int, bytes]]:
        """Take a file out of the tree, with the directories it leaves empty; the names removed,
        as (parent inode, name). The file's node stays in ``nodes`` (see ``drop``)."""
        removed = []
        node = self.nodes[inode]
        while node.inode != ROOT_INODE:
            parent = self.nodes[node.parent]
            assert parent.children is not None
            del parent.children[node.name]
            node.attached = False
            removed.append((parent.inode, node.name))
            if node.is_dir:
                del self.nodes[node.inode]
            if parent.children:
                break
            node = parent
        return removed

    def drop(self, inode: int) -> None:
        """Forget a detached node for good (no handle uses it any more)."""
        node = self.nodes.get(inode)
        if node is not None and not node.attached:
            del self.nodes[inode]

    def path_of(self, inode: int, mountpoint: str) -> str:
        """The path of a file under the mount point ('' when the mount point is not known)."""
        if not mountpoint:
            return ""
        names = []
        node = self.nodes.get(inode)
        while node is not None and node.inode != ROOT_INODE:
            names.append(os.fsdecode(node.name))
            node = self.nodes.get(node.parent)
        return os.path.join(mountpoint, *reversed(names))

    def _add(self, parent: Node, name: bytes, directory: bool = False) -> Node:
        assert parent.children is not None and name not in parent.children
        node = Node(self._next_inode, name, parent.inode, children={} if directory else None)
        self._next_inode += 1
        self.nodes[node.inode] = node
        parent.children[name] = node.inode
        return node

    def _subdir(self, parent: Node, name: bytes) -> Node:
        assert parent.children is not None
        inode = parent.children.get(name)
        return self.nodes[inode] if inode is not None else self._add(parent, name, directory=True)
