"""The one error base class: a problem the user can fix, printed by the CLI as one line (exit 2)."""

from __future__ import annotations


class LmshrinkError(Exception):
    """A bad input, setting, model or asset; the message names the problem and the fix."""
