"""The one error base class: a problem the user can fix, printed by the CLI as one line (exit 2)."""

from __future__ import annotations


class LmshrinkError(Exception):
    """A bad input, setting, model or asset; the message names the problem and the fix."""


class Stopped(Exception):
    """A run stopped short after keeping its work (a signal, Ctrl-C or SIGTERM; or clean's workers given
    up): the CLI prints the message as it is and exits with `exit_code` (128 + the signal's number: 130,
    143; 1 otherwise)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what schedulers send before a kill) raised like Ctrl-C's KeyboardInterrupt, so that
    every command stops the same way on either (see `lmshrink.cli.main`)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def one_of(name: str, value: object, choices, also: str = "") -> list[str]:
    """[] if `value` is one of `choices`, else the one-line problem naming them (a settings check)."""
    if value in choices:
        return []
    return [f"{name}: {value!r} is unknown; choose one of {', '.join(map(str, choices))}{also}"]
