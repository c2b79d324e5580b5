"""The one shape of every expected failure: a machine-readable reason and a detail."""

from __future__ import annotations


class ReasonedError(ValueError):
    """``reason`` is a short snake_case label (metrics, DLQ); ``detail`` is for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StageCannotRun(ValueError):
    """A failure no record is to blame for and no wait mends (credentials refused): the
    stage stops with this one-line message instead of dead-lettering its input."""
