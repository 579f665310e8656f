"""Prometheus metrics of the HTTP service (``GET /metrics``, text exposition format 0.0.4).

Per process: each ``create_app`` has its own registry, so several workers each expose their own
counts (scrape each, or run one process per container; prometheus_client's multiprocess mode is
not used). Label values are route templates, methods, statuses, endpoint names, outcomes, backend
names and error class names: never a patient id, a name or a question.

- ``chartsight_http_requests_total{method, route, status}``: requests, by route template.
- ``chartsight_http_request_duration_seconds{method, route}``: latency histogram, to the last
  byte of the response (a Server-Sent Events stream counts until it ends).
- ``chartsight_outcomes_total{endpoint, outcome}``: every audited patient-data request's outcome
  (answered, abstained, error, timeout, cancelled, denied, ...), from the audit log's records.
- ``chartsight_model_errors_total{backend, error}``: model backend calls that failed (the answer
  then falls back to the evidence answer), from ``common.observe.MODEL_ERROR``.
- ``chartsight_fhir_errors_total{error}``: FHIR server calls that failed for good after retries
  (404 excluded), from ``common.observe.FHIR_ERROR``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from common import observe
from surfaces.http.audit import AuditLog
from surfaces.settings import OpsSettings

# seconds; a cached answer takes tens of ms, a cold one seconds, a model's answer up to minutes
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# the request methods counted by name (RFC 9110 section 9 and RFC 5789 PATCH); any other token a
# client sends (HTTP allows any) is counted as "other", so that clients cannot add label values
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


class Metrics:
    """The service's counters and histograms in a registry of their own; ``observe`` is the
    ``common.observe`` observer that counts model and FHIR errors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chartsight_http_requests", "HTTP requests by route template and status.",
            ["method", "route", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "chartsight_http_request_duration_seconds",
            "Time to the end of the response, by route template.",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.outcomes = Counter(
            "chartsight_outcomes",
            "Outcomes of audited patient-data requests (answered, abstained, error, timeout, "
            "cancelled, denied, ...) by endpoint.",
            ["endpoint", "outcome"], registry=r,
        )  # fmt: skip
        self.model_errors = Counter(
            "chartsight_model_errors", "Model backend calls that failed (then the evidence "
            "answer is given).", ["backend", "error"], registry=r,
        )  # fmt: skip
        self.fhir_errors = Counter(
            "chartsight_fhir_errors", "FHIR server calls that failed after retries (not 404).",
            ["error"], registry=r,
        )  # fmt: skip

    def request_done(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request: ``method`` as sent (one outside ``METHODS`` is counted as
        ``other``), ``route`` its template (``/v1/patients/{patient_id}/similar``), ``seconds``
        its duration."""
        method = method if method in METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe(self, event: str, labels: dict[str, str]) -> None:
        """The ``common.observe`` observer: counts ``MODEL_ERROR`` and ``FHIR_ERROR`` reports;
        other events are ignored."""
        if event == observe.MODEL_ERROR:
            self.model_errors.labels(labels.get("backend", ""), labels.get("error", "")).inc()
        elif event == observe.FHIR_ERROR:
            self.fhir_errors.labels(labels.get("error", "")).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


class CountedAudit:
    """The audit log with each record's ``(endpoint, outcome)`` counted in
    ``Metrics.outcomes``: every surface (API, CDS Hooks, SMART page, MCP) audits each
    patient-data request with its outcome, so the count needs no hook of its own in them.
    Everything else is the wrapped ``AuditLog``'s."""

    def __init__(self, audit: AuditLog, metrics: Metrics) -> None:
        self._audit = audit
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._audit, name)

    def _count(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        endpoint = kwargs.get("endpoint", args[1] if len(args) > 1 else "")
        outcome = kwargs.get("outcome", args[2] if len(args) > 2 else "")
        self._metrics.outcomes.labels(str(endpoint), str(outcome)).inc()

    def record(self, *args: Any, **kwargs: Any) -> None:
        """``AuditLog.record``, then counted (only once the row is written)."""
        self._audit.record(*args, **kwargs)
        self._count(args, kwargs)

    async def arecord(self, *args: Any, **kwargs: Any) -> None:
        """``AuditLog.arecord``, then counted (only once the row is written)."""
        await self._audit.arecord(*args, **kwargs)
        self._count(args, kwargs)


def counted(audit: AuditLog, metrics: Metrics) -> AuditLog:
    """``audit`` counting its records' outcomes in ``metrics`` (a ``CountedAudit``, typed as the
    ``AuditLog`` it stands in for)."""
    return cast(AuditLog, CountedAudit(audit, metrics))


def may_scrape(ops: OpsSettings, client_host: str | None, authorization: str | None) -> bool:
    """Whether a request may read ``/metrics`` under ``ops.metrics``: ``loopback``: the TCP peer
    is 127.0.0.0/8 or ::1; ``token``: ``Authorization: Bearer <token>`` whose SHA-256 (hex) is
    ``ops.metrics_token_sha256`` (compared in constant time); ``off``: never."""
    if ops.metrics == "loopback":
        try:
            return client_host is not None and ipaddress.ip_address(client_host).is_loopback
        except ValueError:
            return False
    if ops.metrics == "token" and ops.metrics_token_sha256 and authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        return hmac.compare_digest(digest, ops.metrics_token_sha256.lower())
    return False
