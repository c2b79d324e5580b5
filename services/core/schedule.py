"""The adaptive revisit schedule, pure: how long until a stored page is visited again.

The Nutch / StormCrawler adaptive-schedule idea: a page found changed is revisited sooner
(its interval times ``REVISIT_SHRINK``), one found unchanged later (times
``REVISIT_GROW``), always within ``[REVISIT_MIN, REVISIT_MAX]``. Their known failure modes
are avoided by deciding "changed" only from what the revisit observed: a ``304`` is
unchanged (it is the cheapest proof there is), a 200 with the stored digest is unchanged,
and a missing ``Last-Modified`` says nothing (it neither resets the interval nor counts as
a change). A page's first visit gets ``REVISIT_INITIAL``.
"""

from __future__ import annotations

from .config import Settings


def clamp(interval: float, settings: Settings) -> float:
    return min(settings.revisit_max, max(settings.revisit_min, interval))


def next_interval(previous: float | None, changed: bool, settings: Settings) -> float:
    """The interval after a visit: ``previous`` (None on a first visit, or for a page
    stored before the schedule existed) shrunk when the page ``changed``, grown when not."""
    if previous is None or previous <= 0:
        return clamp(settings.revisit_initial, settings)
    factor = settings.revisit_shrink if changed else settings.revisit_grow
    return clamp(previous * factor, settings)


def schedule_fields(
    previous: float | None, changed: bool, checked_at: float, settings: Settings
) -> dict[str, float]:
    """What the sink stores on a visited page's document: ``revisit_interval`` and
    ``next_visit`` (``checked_at`` plus the interval)."""
    interval = next_interval(previous, changed, settings)
    return {"revisit_interval": interval, "next_visit": checked_at + interval}
