"""The version of this package: recorded in every adapter file it writes and in the loader files it generates, so
that a file read by another version can say which version wrote it."""

__version__ = "0.1.0"
