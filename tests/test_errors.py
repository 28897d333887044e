"""classify_fetch_error: what the readers of a failed fetch see, and what is logged."""

from __future__ import annotations

import errno
import logging

import pytest

from rangefs.errors import (
    CacheError,
    CacheUnwritable,
    RangesIgnored,
    RemoteChanged,
    RemoteUnreachable,
    classify_fetch_error,
)

log = logging.getLogger("test_errors")
URL = "http://example.test/file"


@pytest.mark.parametrize("exc", [RemoteChanged("changed"), RangesIgnored("ignored"), RemoteUnreachable("gone"),
                                 CacheError("unmounting")])
def test_a_rangefs_error_is_itself_and_not_logged(exc: Exception, caplog: pytest.LogCaptureFixture) -> None:
    assert classify_fetch_error(URL, exc, log) is exc
    assert not caplog.records


def test_an_os_error_is_an_unwritable_cache(caplog: pytest.LogCaptureFixture) -> None:
    error = classify_fetch_error(URL, OSError(errno.ENOSPC, "No space left on device"), log)
    assert type(error) is CacheUnwritable
    assert str(error) == f"{URL}: cannot write the cache file: No space left on device"
    assert not caplog.records


def test_anything_else_is_a_bug_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    bug = KeyError("oops")
    error = classify_fetch_error(URL, bug, log)
    assert type(error) is CacheError
    assert str(error) == f"{URL}: unexpected error: KeyError('oops')"
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.name == "test_errors"
    assert record.getMessage() == f"{URL}: unexpected error while fetching"
    assert record.exc_info is not None and record.exc_info[1] is bug
