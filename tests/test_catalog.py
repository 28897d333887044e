"""The saved probes (rangefs.catalog) read back a damaged or hostile catalog.json as missing
records, never as an exception that would fail a mount or a reload."""

from __future__ import annotations

import json
from pathlib import Path

from rangefs.catalog import NAME, VERSION, Catalog
from rangefs.datafile import cache_key
from rangefs.origin import RemoteFile


def test_a_catalog_nested_too_deep_counts_as_empty(tmp_path: Path) -> None:
    (tmp_path / NAME).write_text("[" * 100_000 + "]" * 100_000)
    catalog = Catalog(tmp_path)
    catalog.load()  # RecursionError in json: ignored, logged
    assert catalog.get("http://h/a") is None


def test_a_record_whose_final_url_does_not_parse_counts_as_unsaved(tmp_path: Path) -> None:
    url = "http://h/a"
    record = {"final": "http://[::1/x", "size": 10, "checked": 1.0, "etag": None, "last_modified": None,
              "ranges": True}
    (tmp_path / NAME).write_text(json.dumps({"version": VERSION, "files": {cache_key(url): record}}))
    catalog = Catalog(tmp_path)
    catalog.load()
    assert catalog.get(url) is None
    record["final"] = "http://h/b"
    (tmp_path / NAME).write_text(json.dumps({"version": VERSION, "files": {cache_key(url): record}}))
    catalog.load()
    known = catalog.get(url)
    assert known is not None and known.remote == RemoteFile("http://h/b", 10, None, None)


def test_a_state_file_newer_than_the_catalog_wins_and_is_asked_about_at_open(tmp_path: Path) -> None:
    """The catalog is saved now and then, a version switch's state at once: after a crash the
    catalog may name the older version, and trusting it would drop the cached blocks."""
    from rangefs import state
    from rangefs.bitmap import Bitmap

    url = "http://h/a"
    record = {"final": None, "size": 10, "checked": 123.0, "etag": '"v1"', "last_modified": None, "ranges": True}
    (tmp_path / NAME).write_text(json.dumps({"version": VERSION, "files": {cache_key(url): record}}))
    catalog = Catalog(tmp_path)
    catalog.load()
    known = catalog.get(url)
    assert known is not None and known.remote.etag == '"v1"' and known.checked == 123.0  # no state yet
    (tmp_path / "files").mkdir()
    identity = state.Identity(cache_key(url), url, 20, '"v2"', None, 65536)
    state.save(tmp_path / "files" / f"{cache_key(url)}.state", identity, Bitmap(1))
    known = catalog.get(url)
    assert known is not None
    assert (known.remote.size, known.remote.etag, known.checked) == (20, '"v2"', 0.0)
