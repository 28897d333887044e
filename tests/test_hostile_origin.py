"""Real mounts against slow and hostile origins: trickles, busy hosts, bad certificates, redirects, secrets.

Each test reads through a real rangefs mount (the CLI, a daemon, the kernel) from FaultServer,
nginx or a small server made here, and checks what the reader got and what the servers saw.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from util import Mounts, Server

pytestmark = pytest.mark.timeout(90)

MiB = 1 << 20


def xattrs(path: Path) -> str:
    """Every extended attribute of ``path`` with its value, as ``getfattr -d`` shows them."""
    return "".join(f"{name}={os.getxattr(path, name)!r}\n" for name in os.listxattr(path))


# -- redaction --------------------------------------------------------------------------------


def test_every_query_value_is_redacted_whatever_its_name(mounts: Mounts, nginx: Server) -> None:
    url = nginx.put("redact/r.bin", b"redacted\n") + "?code=SECRET1&Policy=SECRET2&p=SECRET3"
    down = "http://127.0.0.1:1/gone.bin?code=SECRET4&p=SECRET5"
    m = mounts.mount([url, down], "-v", "--skip-unavailable", "--retries", "0")

    assert (m.path / "r.bin").read_bytes() == b"redacted\n"
    shown = xattrs(m.path / "r.bin")
    assert "code=***&Policy=***&p=***" in shown
    assert m.unmount().returncode == 0
    assert m.result is not None
    everything = shown + m.result.stderr + (m.cache_dir / "rangefs.log").read_text()
    everything += "".join(p.read_text(errors="replace") for p in (m.cache_dir / "files").glob("*.state"))
    assert "gone.bin?code=***&p=***" in everything  # the unusable URL was reported...
    for secret in ("SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET5"):
        assert secret not in everything  # ...and no value of any URL
