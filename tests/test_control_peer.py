"""The control client talks only to the daemon its mount names: a socket in the cache directory
whose peer is another process is refused before any request is sent."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from rangefs.control import Client, socket_name
from rangefs.errors import UsageError
from rangefs.mount import daemon_pid

from util import Mounts, Server, seeded_bytes

pytestmark = pytest.mark.timeout(60)


def test_a_socket_whose_peer_is_not_the_named_daemon_is_refused(mounts: Mounts, nginx: Server) -> None:
    m = mounts.mount([nginx.put("peer/a.bin", seeded_bytes(4096, seed=201))])
    pid = daemon_pid(m.path)
    assert pid is not None
    with Client(m.path, pid) as client:  # the daemon itself: accepted
        client.send({"op": "status"})
        assert "ok" in list(client.replies())[-1]
    # A listener of this test's own, under the name of a pid that is not its own.
    impostor = os.getpid() + 1 if os.getpid() + 1 != pid else os.getpid() + 2
    path = m.cache_dir / socket_name(impostor)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    got: list[bytes] = []

    def accept() -> None:
        conn, _ = listener.accept()
        got.append(conn.recv(100))
        conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        with pytest.raises(UsageError, match="not this mount's daemon"):
            Client(m.path, impostor)
        thread.join(5)
        assert got == [b""], "the client sent a request to a socket that is not the daemon's"
    finally:
        listener.close()
        path.unlink()
