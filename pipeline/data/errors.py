"""Data error types: one line each, naming the URL."""

from __future__ import annotations

from pipeline.errors import PipelineError


class DataError(PipelineError):
    """A dataset cannot be used: a missing or malformed manifest, an unsafe archive, ..."""


class BadDataError(DataError):
    """The error budget for corrupt samples was exceeded."""
