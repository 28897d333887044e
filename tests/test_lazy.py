"""The lazy prober (rangefs.lazy) without a mount: lookups racing the background queue for the
same nodes never fail nor hang (a found race: a lookup took a slot for a node the queue had just
taken one for, with the node as the borrower of both)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio

from rangefs.catalog import Catalog
from rangefs.lazy import Probes
from rangefs.origin import RemoteFile
from rangefs.tree import Node
from rangefs.urllist import Entry


def test_lookups_racing_the_queue_all_resolve_and_none_hangs() -> None:
    async def main() -> None:
        async def probe(url: str) -> RemoteFile:
            await trio.sleep(0.01)
            return RemoteFile(url, 1, None, None)

        def attach(node: Node, remote: RemoteFile) -> None:
            node.cached = object()  # type: ignore[assignment]

        probes = Probes(probe, attach, Catalog(Path(tempfile.mkdtemp())), "list", 4)
        nodes = [Node(i + 2, b"f%d" % i, 1, entry=Entry(f"http://h/f{i}", (f"f{i}",), i + 1)) for i in range(40)]
        results: dict[int, str] = {}

        async def resolve(node: Node) -> None:
            try:
                with trio.fail_after(5):
                    await probes.resolve(node)
                results[node.inode] = "ok"
            except trio.TooSlowError:
                results[node.inode] = "hung"
            except Exception as exc:  # any failure is the finding
                results[node.inode] = f"{type(exc).__name__}: {exc}"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probes.run)
            await trio.sleep(0.001)
            probes.add(nodes)
            async with trio.open_nursery() as lookups:
                for node in nodes:
                    lookups.start_soon(resolve, node)
            nursery.cancel_scope.cancel()
        assert {k: v for k, v in results.items() if v != "ok"} == {}
        assert all(node.cached is not None for node in nodes)

    trio.run(main)
