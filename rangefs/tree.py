"""The mount's inodes: files and directories, fixed at mount time from the URL list.

One file per URL-list entry, directories from their paths. Imports the cache only for the type
of a file's cached state; never pyfuse3 (the root's inode number is the protocol's own). Built
once before the mount and only read afterwards, so any task may read it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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
    cached: CachedFile | None = None  # files only

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclass
class Tree:
    """Inodes of the mount, built once from the URL list."""

    nodes: dict[int, Node] = field(default_factory=dict)

    @classmethod
    def build(cls, files: Sequence[tuple[Entry, CachedFile]]) -> Tree:
        tree = cls()
        tree.nodes[ROOT_INODE] = Node(ROOT_INODE, b"", ROOT_INODE, children={})
        for entry, cached in files:
            parent = tree.nodes[ROOT_INODE]
            for part in entry.path[:-1]:
                parent = tree._subdir(parent, os.fsencode(part))
            node = tree._add(parent, os.fsencode(entry.path[-1]))
            node.entry, node.cached = entry, cached
        return tree

    def path_of(self, inode: int, mountpoint: str) -> str:
        """The path of a file under the mount point ('' when the mount point is not known)."""
        if not mountpoint:
            return ""
        names = []
        node = self.nodes[inode]
        while node.inode != ROOT_INODE:
            names.append(os.fsdecode(node.name))
            node = self.nodes[node.parent]
        return os.path.join(mountpoint, *reversed(names))

    def _add(self, parent: Node, name: bytes, directory: bool = False) -> Node:
        assert parent.children is not None and name not in parent.children
        node = Node(len(self.nodes) + ROOT_INODE, name, parent.inode, children={} if directory else None)
        self.nodes[node.inode] = node
        parent.children[name] = node.inode
        return node

    def _subdir(self, parent: Node, name: bytes) -> Node:
        assert parent.children is not None
        inode = parent.children.get(name)
        return self.nodes[inode] if inode is not None else self._add(parent, name, directory=True)
