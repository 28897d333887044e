"""rangefs: HTTP(S) URLs as read-only files under a FUSE mount, backed by a resumable sparse block cache."""

__version__ = "0.1.0"
