"""Process and socket helpers shared by the test helpers and the scripts; standard library only."""

from __future__ import annotations

import socket
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (state Z) or a vanished pid does not."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``, whichever of its threads started them."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def close_socket(sock: socket.socket) -> None:
    """Shut both directions down (waking a thread blocked on it), then close."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
