"""Riding out a store outage: a call that finds the store unreachable is tried again, with
backoff, until the store answers or a bounded time has passed (``outage_seconds``).

Only for calls that are safe to repeat: reads, and writes whose conditions make a second
application a no-op (a claim with its token, a lease renewal, a job's end, a label keyed by
structure and level of theory). A write whose reply was lost may have been applied: the
repeated call then finds it done."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pestle.store.errors import StoreUnreachable, is_store_outage
from pestle.store.uri import mask_text

log = logging.getLogger("pestle.store")

T = TypeVar("T")

# How long a labelling run waits for its store to come back before it gives up.
DEFAULT_OUTAGE_SECONDS = 120.0
FIRST_DELAY = 0.25
MAX_DELAY = 5.0


def describe(exc: BaseException) -> str:
    """The first line of an outage's error, passwords masked (pymongo's messages carry a
    whole topology description)."""
    text = mask_text(str(exc)).split(", Timeout:")[0].split(" (configured timeouts")[0]
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def patiently(
    call: Callable[..., T],
    *args: Any,
    outage_seconds: float = DEFAULT_OUTAGE_SECONDS,
    what: str = "a store call",
    **kwargs: Any,
) -> T:
    """``call(*args, **kwargs)``, tried again while the store is unreachable, for up to
    ``outage_seconds`` from the first failure (plus at most one server-selection timeout of
    the last try); then a ``StoreUnreachable`` naming the outage. Other errors pass at once.
    The outage and the recovery are logged as warnings."""
    first: float | None = None
    delay = FIRST_DELAY
    while True:
        try:
            result = call(*args, **kwargs)
        except Exception as exc:
            if not is_store_outage(exc):
                raise
            now = time.monotonic()
            if first is None:
                first = now
                log.warning("the store is unreachable (%s) during %s: trying again for up "
                            "to %g s", describe(exc), what, outage_seconds)  # fmt: skip
            if now - first >= outage_seconds:
                raise StoreUnreachable(
                    f"the store stayed unreachable for {now - first:.0f} s during {what} "
                    f"(store.outage_seconds is {outage_seconds:g}): {describe(exc)}"
                ) from None
            time.sleep(min(delay, max(outage_seconds - (now - first), 0.0)))
            delay = min(delay * 2, MAX_DELAY)
        else:
            if first is not None:
                log.warning("the store answers again after %.1f s (%s)",
                            time.monotonic() - first, what)  # fmt: skip
            return result
