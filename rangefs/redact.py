"""Hide the secrets of a URL (userinfo, query values) before it reaches a log, a message or a file.

Imports only the standard library: every layer that names a URL uses it, so it depends on none of them.
"""

from __future__ import annotations

import re

# Optional "scheme://" (or "//"), then the authority up to the first '/', '?' or '#'.
_AUTHORITY = re.compile(r"((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?([^/?#]*)")
_QUERY_SEP = re.compile(r"([&;])")


def redact_url(url: str) -> str:
    """Return url with its userinfo and every query value replaced by ``***`` (the keys are kept).

    Every value, not those whose key looks secret: signed URLs name their secrets freely
    (``code=``, ``Policy=``, ``p=``), and no list of names can know them all.

    Never raises: odd input is handled textually, without a URL parser that could refuse it.
    """
    head, hash_mark, fragment = url.partition("#")
    head, question_mark, query = head.partition("?")
    head = _AUTHORITY.sub(_redact_userinfo, head, count=1)
    if question_mark:
        query = "".join(_redact_parameter(part) for part in _QUERY_SEP.split(query))
    return head + question_mark + query + hash_mark + ("***" if fragment else "")


def _redact_userinfo(match: re.Match[str]) -> str:
    """Replace the userinfo of an authority (everything before its last '@') with ``***``."""
    prefix, authority = match.group(1) or "", match.group(2)
    if "@" not in authority:
        return match.group(0)
    return f"{prefix}***@{authority.rpartition('@')[2]}"


def _redact_parameter(parameter: str) -> str:
    """Replace the value of one ``name=value`` query parameter; a bare part may itself be a
    secret (``?TOKEN``), so it goes too. Separators and empty parts stay, to keep the shape."""
    name, equals, _ = parameter.partition("=")
    if equals:
        return f"{name}=***"
    return parameter if parameter in ("", "&", ";") else "***"
