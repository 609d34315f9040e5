"""Project error types. Every user-facing failure is one line naming the file/key/URL."""

from __future__ import annotations


class PipelineError(Exception):
    """A failure the CLI reports as one line and a non-zero exit (no traceback)."""


class ConfigError(PipelineError, ValueError):
    """A bad config value.

    Args:
        key: dotted key path inside the config, e.g. ``model.latent_channels``.
        msg: what was expected.
        file: the yaml file the value came from, when known.
    """

    def __init__(self, key: str, msg: str, file: str | None = None):
        self.key, self.msg, self.file = key, msg, file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.msg}"

    def within(self, prefix: str = "", file: str | None = None) -> ConfigError:
        """The same error with ``prefix.`` prepended to its key and ``file`` set."""
        key = f"{prefix}.{self.key}" if prefix and self.key else (prefix or self.key)
        return ConfigError(key, self.msg, file or self.file)


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-blank line of ``str(e)`` (at most ``limit`` characters), else the type name.

    Library errors (botocore, MLflow, Ray) often carry a multi-line body; a user-facing
    message keeps only its headline.
    """
    for line in str(e).strip().splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(e).__name__
