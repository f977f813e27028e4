# Copyright (c) fasa_seesaw contributors.


import re
from typing import Iterable


class ConfigError(ValueError):
    """A user-facing configuration or data problem; the message says what is wrong and the fix."""


class DataError(ConfigError):
    """A dataset file that cannot be read; the message names the dataset, the file and the fix."""


def user_message(e: BaseException) -> str:
    """
    The message of a project error for the terminal. An error raised in a data-loader worker or
    in a process of detectron2's launch arrives with the worker's traceback in its text; of that
    only the project error's own message (from ``fasa_seesaw....Error:`` to the end) is for the
    user.
    """
    text = str(e)
    found = list(re.finditer(r"^fasa_seesaw\.[\w.]*Error: ", text, flags=re.M))
    if not found:
        return text
    return text[found[-1].end() :].strip()


def is_project_error(e: BaseException) -> bool:
    """A ConfigError, or one raised in another process (its text names the project's class)."""
    return isinstance(e, ConfigError) or user_message(e) != str(e)


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
