"""Forwarding the audit log to a hospital's audit repository (``serve.audit.repository``).

The audit database is the spool: every ``audit_log`` row without an ``audit_delivery`` row for the
repository is still to send. A background task of the service sends them, oldest first, as FHIR
batch Bundles of AuditEvents (``auditevent.audit_event``; IHE ITI-20 "Record Audit Event" in its
FHIR form accepts a batch or transaction Bundle of AuditEvents) and notes each entry the repository
answers for. When the repository is down, slow or answers 5xx, the task waits (exponential backoff
with jitter, up to ``backoff_max_s``) and tries again: requests are never held up, and nothing is
lost, since the rows stay in the database across restarts until the repository has taken them.

Delivery is exactly once as long as each POST's answer arrives; an answer lost after the
repository stored the batch (a cut connection, a shutdown mid-POST) means that batch is sent again.
One forwarding process per audit database: two services sharing one database would each send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import httpx

from connectors.auth import BearerAuth, SmartBackendAuth
from surfaces.http.audit import AuditLog
from surfaces.http.auditevent import FHIR_JSON, audit_event
from surfaces.settings import AuditRepositorySettings

log = logging.getLogger("chartsight.audit")

# 4xx statuses of a Bundle entry worth sending again (RFC 9110 408 Request Timeout, RFC 8470 425
# Too Early, RFC 6585 429 Too Many Requests); a 5xx is always sent again
_TRANSIENT = {408, 425, 429}


class RepositoryUnavailable(Exception):
    """The audit repository could not take a batch now (no connection, a timeout, or an HTTP
    status other than 200 for the Bundle): the batch stays in the spool."""


class AuditForwarder:
    """Sends the audit log's undelivered rows to the audit repository ``settings.url`` as
    AuditEvents recorded by the service at ``service_url``, in a loop (``run``) woken by each
    new audit row (``AuditLog.listeners``) and every ``settings.poll_s`` seconds."""

    def __init__(
        self, audit: AuditLog, settings: AuditRepositorySettings, service_url: str
    ) -> None:
        self.audit = audit
        self.settings = settings
        self.repository = settings.url.rstrip("/")
        self.service_url = service_url
        self.failures = 0  # consecutive failed POSTs
        self._floor = 0  # every row at or below this id has been delivered or refused
        self._wake = asyncio.Event()
        audit.listeners.append(self._wake.set)
        auth: httpx.Auth | None = None
        if settings.smart is not None:
            auth = SmartBackendAuth(settings.smart, self.repository)
        elif settings.token is not None:
            auth = BearerAuth(settings.token.get_secret_value())
        self.client = httpx.AsyncClient(auth=auth, timeout=settings.timeout_s)

    async def run(self) -> None:
        """Forward until cancelled: send a batch whenever rows wait, else sleep until a row is
        recorded or ``poll_s`` passes; after a failure (the repository's, or the audit database's)
        wait ``backoff_base_s`` doubled per consecutive failure, at most ``backoff_max_s``, a
        random time between half that and that (jitter, so that restarted services do not retry
        in step), and try again. Errors are logged (the repository's URL and the kind of failure,
        never an event's content), never raised."""
        try:
            while True:
                self._wake.clear()  # a row recorded from here on wakes the wait below
                try:
                    sent = await self.forward_once()
                except Exception as exc:
                    self.failures += 1
                    wait = min(
                        self.settings.backoff_max_s,
                        self.settings.backoff_base_s * 2 ** min(self.failures - 1, 30),
                    )
                    if isinstance(exc, RepositoryUnavailable):
                        log.warning(
                            "audit repository %s: %s; the events stay spooled, next try in "
                            "%.1f s", self.repository, exc, wait,
                        )  # fmt: skip
                    else:  # the audit database itself, or an event that cannot be rendered
                        log.error("audit forwarding failed: %s", type(exc).__name__, exc_info=exc)
                    await asyncio.sleep(random.uniform(wait / 2, wait))
                    continue
                if sent == 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)
        finally:
            await self.client.aclose()
            if self._wake.set in self.audit.listeners:
                self.audit.listeners.remove(self._wake.set)

    async def forward_once(self) -> int:
        """Send one batch of up to ``batch_size`` spooled rows and note what the repository
        answered for each: ``delivered`` (2xx, with its ``location``) or ``refused`` (a 4xx
        other than 408/425/429: sending it again would not help; logged as an error, the row
        stays in the audit log); a transient answer leaves the row spooled. Returns how many rows
        were noted (0 when the spool is empty). Raises ``RepositoryUnavailable`` when the Bundle
        got no 200 answer with one entry per event."""
        rows = await asyncio.to_thread(
            self.audit.undelivered, self.repository, self._floor, self.settings.batch_size
        )
        if not rows:
            return 0
        events = [audit_event(row, self.service_url) for row in rows]
        for event in events:
            event.pop("id")  # the repository assigns its own
        bundle = {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"resource": e, "request": {"method": "POST", "url": "AuditEvent"}} for e in events
            ],
        }
        try:
            reply = await self.client.post(
                self.repository,
                json=bundle,
                headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
            )
        except httpx.HTTPError as exc:
            raise RepositoryUnavailable(type(exc).__name__) from exc
        if reply.status_code != 200:
            raise RepositoryUnavailable(f"HTTP {reply.status_code} for the batch")
        try:
            answers = reply.json().get("entry") or []
        except ValueError as exc:
            raise RepositoryUnavailable("a batch-response that is not JSON") from exc
        if len(answers) != len(rows):
            raise RepositoryUnavailable(f"{len(answers)} answers for {len(rows)} events")
        noted = [_outcome(row["id"], answer) for row, answer in zip(rows, answers, strict=True)]
        done = [n for n in noted if n is not None]
        await asyncio.to_thread(self.audit.delivered, self.repository, done)
        self.failures = 0
        refused = [n for n in done if n[1] == "refused"]
        if refused:
            log.error(
                "audit repository %s refused %d events (audit_log ids %s); they stay in the "
                "audit log only", self.repository, len(refused), [r[0] for r in refused],
            )  # fmt: skip
        # the floor rises past every row noted before the first one still spooled
        for row, n in zip(rows, noted, strict=True):
            if n is None:
                break
            self._floor = row["id"]
        return len(done)


def _outcome(audit_id: int, answer: Any) -> tuple[int, str, str | None] | None:
    """What a batch-response entry says about one event: ``(id, "delivered", location)``,
    ``(id, "refused", diagnostics)``, or None (send it again). FHIR R4 Bundle
    ``entry.response.status`` starts with the HTTP status code."""
    response = answer.get("response") if isinstance(answer, dict) else None
    status = str((response or {}).get("status", "")).split(" ")[0]
    code = int(status) if status.isdigit() else 0
    if 200 <= code < 300:
        return audit_id, "delivered", (response or {}).get("location")
    if 400 <= code < 500 and code not in _TRANSIENT:
        issues = ((response or {}).get("outcome") or {}).get("issue") or [{}]
        return audit_id, "refused", f"HTTP {code}: {issues[0].get('diagnostics', '')}"
    return None
