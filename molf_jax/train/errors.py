"""The error a training configuration raises when it cannot run."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A training configuration that cannot run; the message says which setting and why."""
