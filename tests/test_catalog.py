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
