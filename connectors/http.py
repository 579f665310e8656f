"""HTTP with retries: exponential backoff with full jitter, ``Retry-After`` honoured, a hard deadline.

Every failure ends in a typed error naming the URL (and the status, where there was one).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from common import observe
from connectors.errors import ConnectorError, HttpStatusError, ResourceNotFound, TransportError
from connectors.settings import HttpSettings

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def default_retryable(response: httpx.Response) -> bool:
    """Whether an error answer is worth sending the request again: 408, 425, 429 and the
    transient 5xx (``RETRY_STATUSES``)."""
    return response.status_code in RETRY_STATUSES


def _detail(response: httpx.Response) -> str:
    """The first diagnostics line of an OperationOutcome, the message of an OpenAI-style
    ``{"error": {"message": ...}}``, or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"].splitlines()[0][:200] if error["message"] else ""
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue") or []:
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
            if text:
                return str(text)[:200]
    return ""


class RetryingHttp:
    """An ``httpx.AsyncClient`` wrapped with retries and typed errors.

    ``retryable`` decides which error answers are sent again (``default_retryable``: 408, 425,
    429, 500, 502, 503, 504). ``retry_read_timeouts=False`` sends nothing again once a request
    was written and its answer timed out (a model server may still be working on it; a second
    copy would only queue behind the first); connection failures and connect or pool timeouts,
    where nothing reached the server, are retried either way. ``failures`` names the
    ``common.observe`` event reported when a request fails for good (``observe.FHIR_ERROR`` for a
    FHIR server), labelled with the error's class name; a 404 (``ResourceNotFound``) is an
    answer, not a failure, and is not reported."""

    def __init__(
        self,
        settings: HttpSettings,
        *,
        auth: httpx.Auth | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retryable: Callable[[httpx.Response], bool] = default_retryable,
        retry_read_timeouts: bool = True,
        failures: str | None = None,
    ) -> None:
        self.settings = settings
        self.failures = failures
        self.retryable = retryable
        self.retry_read_timeouts = retry_read_timeouts
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout_s),
            auth=auth,
            headers=dict(headers or {}),
            verify=settings.verify_tls,
            follow_redirects=settings.follow_redirects,
            transport=transport,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    async def aclose(self) -> None:
        """Close the underlying ``httpx.AsyncClient``; no request is sent after."""
        await self.client.aclose()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        s = self.settings
        if retry_after is not None:
            return min(retry_after, s.backoff_max_s)
        return random.uniform(0, min(s.backoff_max_s, s.backoff_base_s * 2**attempt))

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send with retries; return a 2xx response or raise a ``ConnectorError``
        (``TransportError``, ``HttpStatusError``, ``ResourceNotFound``)."""
        try:
            return await self._send(method, url, **kwargs)
        except ConnectorError as exc:
            if self.failures is not None and not isinstance(exc, ResourceNotFound):
                observe.report(self.failures, error=type(exc).__name__)
            raise

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        deadline = time.monotonic() + self.settings.deadline_s
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            failure: str
            retry_after: float | None = None
            try:
                async with asyncio.timeout(max(remaining, 0.001)):
                    response = await self.client.request(method, url, **kwargs)
                    # Read the body inside the deadline: a server that drips bytes must not hang us.
                    await response.aread()
            except TimeoutError as exc:
                if time.monotonic() >= deadline:
                    raise TransportError(
                        url, f"no complete answer within {self.settings.deadline_s:g} s"
                    ) from exc
                failure = "timed out"
                last_exc: BaseException = exc
            except httpx.TimeoutException as exc:
                failure, last_exc = f"timed out ({type(exc).__name__})", exc
                sent = isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout)
                if sent and not self.retry_read_timeouts:
                    raise TransportError(
                        url, f"no answer within {self.settings.timeout_s:g} s (not sent again)"
                    ) from exc
            except httpx.TransportError as exc:
                failure, last_exc = f"connection failed ({type(exc).__name__}: {exc})", exc
            else:
                if response.is_success:
                    return response
                if not self.retryable(response):
                    cls = ResourceNotFound if response.status_code == 404 else HttpStatusError
                    raise cls(str(response.url), response.status_code, _detail(response))
                failure = f"HTTP {response.status_code}"
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                last_exc = HttpStatusError(
                    str(response.url), response.status_code, _detail(response)
                )

            wait = self._backoff(attempt, retry_after)
            if attempt >= self.settings.max_retries or time.monotonic() + wait >= deadline:
                if isinstance(last_exc, HttpStatusError):
                    raise HttpStatusError(
                        last_exc.url,
                        last_exc.status,
                        f"{last_exc.detail or 'giving up'} after {attempt + 1} attempts",
                    ) from last_exc
                raise TransportError(url, f"{failure} after {attempt + 1} attempts") from last_exc
            log.info("retrying %s %s in %.2fs: %s", method, url, wait, failure)
            await asyncio.sleep(wait)
            attempt += 1
