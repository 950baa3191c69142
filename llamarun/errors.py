"""Errors that reach the user as one line, never as a traceback.

The CLI catches these and prints ``llamarun: error: <message>``; the exit code says who is at fault:
2 for a usage error (a bad argument, a missing or malformed input file), 1 for a runtime failure.
"""


class LlamarunError(Exception):
    """Base class: a failure with a message fit to show a user as it is."""

    exit_code = 1


class UsageError(LlamarunError):
    """The user asked for something impossible: a bad value, a missing or malformed file."""

    exit_code = 2


class FormatError(UsageError):
    """A checkpoint or tokenizer file that is missing, truncated, corrupted or unsupported."""


class RuntimeFailure(LlamarunError):
    """Something failed while running (out of memory, a device error)."""

    exit_code = 1
