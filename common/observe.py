"""A tiny observer hook for operational counts: the connectors and the agent ``report`` what
happened (a FHIR call failed, the model failed) by an event name and a few labels; whoever keeps
counts (the HTTP service's Prometheus metrics, ``surfaces/http/metrics.py``) is the ``observer``
of the context the work runs in. Nothing here knows Prometheus, and with no observer (the command
line) a report costs one context-variable lookup.

The observer is a context variable, not a global: the service sets it for each request and for
its lifespan, so concurrent requests and several services in one process (tests) each count their
own events; asyncio tasks and ``asyncio.to_thread`` inherit it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar

log = logging.getLogger(__name__)

# (event name, labels) -> None; labels are short names (an error's class name, a backend), never
# patient data
Observer = Callable[[str, dict[str, str]], None]

_observer: ContextVar[Observer | None] = ContextVar("chartsight_observer", default=None)

FHIR_ERROR = "fhir_error"  # a FHIR server call failed for good: labels {"error": class name}
MODEL_ERROR = "model_error"  # a model call failed: {"backend": model.name setting, "error": class}


def report(event: str, **labels: str) -> None:
    """Tell the current context's observer that ``event`` happened, with ``labels`` (short
    strings: an error's class name, a backend's name; never patient data). Does nothing without
    an observer; an observer's own failure is logged, never raised into the caller's work."""
    observer = _observer.get()
    if observer is None:
        return
    try:
        observer(event, labels)
    except Exception as exc:  # counting must not break an answer
        log.warning("observer failed on %s: %s", event, type(exc).__name__)


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """Make ``observer`` receive the reports of the work run inside the ``with`` block (and of the
    tasks and threads started from it), restoring the previous observer after."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)
