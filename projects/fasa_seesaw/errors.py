# Copyright (c) fasa_seesaw contributors.


class ConfigError(ValueError):
    """A user-facing configuration or data problem; the message says what is wrong and the fix."""
