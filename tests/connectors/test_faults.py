"""Faulty servers end in retries or clear, typed errors: never a hang, never a silent partial result."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from connectors.errors import (
    HttpStatusError,
    IncompletePaging,
    InvalidResponse,
    ResourceNotFound,
    TransportError,
)
from connectors.fhir_client import FhirClient
from connectors.http import retry_after_seconds
from connectors.settings import FhirServerSettings, HttpSettings
from tests.peers.faulty import FaultyFhir


@pytest.fixture(scope="module")
def faulty() -> Iterator[FaultyFhir]:
    with FaultyFhir() as server:
        yield server


def client(server: FaultyFhir, fault: str, **http: float) -> FhirClient:
    options = {
        "timeout_s": 1.0,
        "deadline_s": 5.0,
        "max_retries": 3,
        "backoff_base_s": 0.05,
        **http,
    }
    settings = HttpSettings(**options)
    return FhirClient(FhirServerSettings(url=server.url(fault), http=settings, page_size=5))


async def test_429_waits_for_retry_after_then_succeeds(faulty):
    async with client(faulty, "r429") as c:
        started = time.monotonic()
        patient = await c.read("Patient", "p1")
    assert patient.id == "p1"
    assert faulty.hits["r429"] == 2
    assert time.monotonic() - started >= 0.95  # honoured Retry-After: 1


async def test_503_is_retried_with_backoff(faulty):
    async with client(faulty, "flaky") as c:
        assert (await c.read("Patient", "p1")).id == "p1"
    assert faulty.hits["flaky"] == 3


async def test_server_that_stays_down_gives_a_typed_error_with_url_and_status(faulty):
    async with client(faulty, "down") as c:
        with pytest.raises(HttpStatusError) as info:
            await c.read("Patient", "p1")
    assert info.value.status == 503
    assert info.value.url.endswith("/down/Patient/p1")
    assert "maintenance" in str(info.value) and "4 attempts" in str(info.value)


async def test_404_is_not_retried(faulty):
    async with client(faulty, "missing") as c:
        with pytest.raises(ResourceNotFound, match="Patient/p9 not found"):
            await c.read("Patient", "p9")
    assert faulty.hits["missing"] == 1


@pytest.mark.parametrize("fault", ["slow", "drip"])
async def test_slow_or_dripping_server_ends_within_the_deadline(faulty, fault):
    async with client(faulty, fault, deadline_s=3.0) as c:
        with pytest.raises(TransportError) as info:
            await asyncio.wait_for(c.read("Patient", "p1"), timeout=15)
    assert f"/{fault}/Patient/p1" in str(info.value)


async def test_truncated_body_is_retried_then_reported(faulty):
    async with client(faulty, "truncated") as c:
        with pytest.raises(TransportError, match="connection failed"):
            await c.read("Patient", "p1")
    assert faulty.hits["truncated"] == 4


async def test_truncated_json_is_a_clear_error(faulty):
    async with client(faulty, "badjson") as c:
        with pytest.raises(InvalidResponse, match="not valid JSON"):
            await c.read("Patient", "p1")


async def test_search_answer_that_is_not_a_bundle(faulty):
    async with client(faulty, "notbundle") as c:
        with pytest.raises(InvalidResponse, match="expected a Bundle, got Patient"):
            await c.search("Observation")


async def test_full_pages_without_next_links_and_ignored_offset_are_reported(faulty):
    async with client(faulty, "nolinks") as c:
        with pytest.raises(IncompletePaging, match="may ignore _offset") as info:
            await c.search("Observation")
    assert info.value.fetched == 5


async def test_endless_next_links_stop_at_max_pages(faulty):
    settings = FhirServerSettings(url=faulty.url("loop"), max_pages=5)
    async with FhirClient(settings) as c:
        with pytest.raises(IncompletePaging, match="repeated a page link|max_pages"):
            await c.search("Observation")


async def test_invalid_resource_is_kept_raw_and_reported(faulty):
    async with client(faulty, "invalid") as c:
        result = await c.search("Observation")
    assert [r.id for r in result.resources] == ["o1", "o3"]
    assert len(result.invalid) == 1
    bad = result.invalid[0]
    assert bad.reference == "Observation/o2" and "status" in bad.error
    assert bad.raw["status"] == {"not": "a code"}


async def test_connection_refused_is_a_transport_error():
    from tests.peers.servers import free_port

    settings = FhirServerSettings(
        url=f"http://127.0.0.1:{free_port()}/fhir",
        http=HttpSettings(timeout_s=1, deadline_s=3, max_retries=2, backoff_base_s=0.05),
    )
    async with FhirClient(settings) as c:
        with pytest.raises(TransportError, match="connection failed.*3 attempts"):
            await c.read("Patient", "p1")


def test_retry_after_accepts_seconds_and_http_dates():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("soon") is None
