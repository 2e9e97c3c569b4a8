"""User-facing errors: one line, says what is wrong and how to fix it.

The CLI prints ``moe-erc: error: <message>`` and exits with code 2 for any
:class:`UserError`; ``--debug`` shows the traceback instead.
"""


class UserError(Exception):
    """A problem with the user's input (config, data, paths), not a bug."""


class ConfigError(UserError):
    """Invalid configuration: unknown key, bad type or value, impossible layout."""


class DataError(UserError):
    """Missing, empty or corrupt data files, or a tokenizer that does not match them."""


class CheckpointError(UserError):
    """A checkpoint that cannot be found or loaded."""
