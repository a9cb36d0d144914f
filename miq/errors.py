"""The user-facing errors: each ``str(e)`` is the one line the CLI prints before exiting with code 2.

One leaf module, so that every layer raises them without importing the layer that reports them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad flag value or combination: names the flag, the value and what is allowed."""


class NoEffectError(ConfigError):
    """A flag that would change nothing given the others; ``flag`` names it (a sweep drops it from the
    configurations it does nothing in)."""

    def __init__(self, message: str, flag: str):
        super().__init__(message)
        self.flag = flag


class DataError(Exception):
    """A problem with a dataset: bad name, missing file, text too short, hub unreachable."""


class ModelError(Exception):
    """A problem with MODEL: not found, unreachable, unsupported, or a saved folder that does not read back."""


class PlanError(ValueError):
    """A problem with one layer's quantization plan (names the layer)."""


class LayerInputError(ValueError):
    """A layer's calibration inputs are not finite (names the layer)."""


class PublishError(Exception):
    """The work was done but its outputs could not be written (disk full, permissions changed meanwhile):
    nothing was published; the CLI exits with 1, not 2."""


USER_ERRORS = (ConfigError, DataError, ModelError, PlanError, LayerInputError)


def bad_value(flag: str, value, allowed: str) -> ConfigError:
    """The one line bad input gets: the flag, the value as given, and what is allowed."""
    return ConfigError(f"{flag} {value}: {allowed}")


def first_line(e: BaseException) -> str:
    """An exception's first line (at most 200 characters), or its type's name: what a one-line error quotes."""
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__
