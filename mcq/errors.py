"""The one exception type that means "the user's input is wrong" (the CLI prints it as one line, exit code 2)."""


class McqError(Exception):
    """Bad input: a missing file, a malformed checkpoint, an unsupported option. The message says what and where."""
