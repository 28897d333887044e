"""Set up the root logger of a rangefs process: the mount daemon, or its fetch helper.

One format, the log file opened by rangefs.safefs (never through a symbolic link), and stderr
too in the foreground. Imports rangefs.safefs and rangefs.errors only.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rangefs import safefs
from rangefs.errors import UsageError

LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def setup_logging(
    log_path: Path | None, *, verbose: bool, foreground: bool, required: bool, log_format: str = LOG_FORMAT
) -> None:
    """Log to ``log_path`` (when given), and to stderr when ``foreground``; DEBUG when ``verbose``.

    ``required``: a log that cannot be opened refuses the start (the daemon: the user named it);
    otherwise the process goes without it (the fetch helper: the daemon checked it at mount, and
    losing the helper's lines is no reason to fail).

    Raises:
        UsageError: ``required`` and the log cannot be opened (names the file).
    """
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handlers: list[logging.Handler] = []
    if log_path is not None:
        try:
            handlers.append(safefs.LogHandler(log_path))
        except OSError as exc:
            if required:
                raise UsageError(f"cannot write log file '{log_path}': {exc.strerror}") from None
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    formatter = logging.Formatter(log_format)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
