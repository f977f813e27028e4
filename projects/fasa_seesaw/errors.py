# Copyright (c) fasa_seesaw contributors.


from typing import Iterable


class ConfigError(ValueError):
    """A user-facing configuration or data problem; the message says what is wrong and the fix."""


class DataError(ConfigError):
    """A dataset file that cannot be read; the message names the dataset, the file and the fix."""


def user_message(e: BaseException) -> str:
    """
    The message of a ConfigError for the terminal: an error raised in a data-loader worker
    arrives re-raised with the worker's traceback in its text, of which only the last line (the
    original message) is for the user.
    """
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if ": " in last else last


def check_choice(key: str, value, choices: Iterable) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``; ``key`` names the setting."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key} {value!r} is unknown; use one of {choices}.")


def check_range(key: str, value, low: float, high: float, *, low_open=False, high_open=False):
    """Raise ConfigError unless ``value`` lies between ``low`` and ``high`` (ends as given)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must lie in {interval}; got {value!r}.")
