"""The two error kinds every command turns into one line on stderr and exit status 1
(``noah_ray.cli.error_line``); no other module needs to be imported to raise or catch them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


class RunError(RuntimeError):
    """A stage stopped for a cause outside the config (data endpoint, corrupt file, ...); the message
    names the first error, and running the same command again after fixing it resumes."""
