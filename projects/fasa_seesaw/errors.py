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
    in a process of detectron2's launch arrives with the worker's traceback in its text; when
    that traceback ends with a project error (``fasa_seesaw....Error:``), only its message is
    for the user. A traceback that ends with any other error is left whole, even if a project
    error was being handled when it was raised.
    """
    text = str(e)
    # The exception a traceback ends with is the first unindented line after its last
    # "Traceback (most recent call last):" (earlier ones belong to chained exceptions).
    last = text.rsplit("Traceback (most recent call last):", 1)[-1]
    raised = re.search(r"^(?=\S)(.*)$", last.lstrip("\n"), flags=re.M)
    found = raised and re.match(r"fasa_seesaw\.[\w.]*Error: ", raised.group(1))
    if not found:
        return text
    return last.lstrip("\n")[raised.start() + found.end() :].strip()


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


def registered_subclass(registry, name: str, cls: type) -> bool:
    """Whether detectron2 ``registry`` has ``name`` and it is ``cls`` or a subclass of it."""
    return name in registry and issubclass(registry.get(name), cls)
