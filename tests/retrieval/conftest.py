"""Retrieval fixtures: demo records, and the embedded-default encoders (loaded once)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.images import ImageSet, collect_images
from connectors.record import PatientRecord, assemble_record
from connectors.settings import ImageSettings
from connectors.store import FhirStore, StoreSource
from retrieval.encoders import EncoderRegistry
from retrieval.settings import EncoderSettings


async def _load(store: FhirStore, pid: str) -> tuple[PatientRecord, ImageSet]:
    source = StoreSource(store)
    record = await assemble_record(source, pid)
    return record, await collect_images(record, source, ImageSettings())


@pytest.fixture(scope="session")
def demo_charts(demo_store: FhirStore) -> dict[str, tuple[PatientRecord, ImageSet]]:
    """Every demo patient's record and images, by patient id."""
    return {p.id: asyncio.run(_load(demo_store, p.id)) for p in demo_store.patients()}


@pytest.fixture(scope="session")
def tommy(demo_charts: dict[str, tuple[PatientRecord, ImageSet]]) -> PatientRecord:
    return demo_charts[TOMMY_FRIESEN][0]


@pytest.fixture(scope="session")
def martina(demo_charts: dict[str, tuple[PatientRecord, ImageSet]]) -> PatientRecord:
    return demo_charts[MARTINA_MURAZIK][0]


@pytest.fixture(scope="session")
def encoders() -> EncoderRegistry:
    """MiniLM and EfficientNet-Lite0, the packaged defaults (no network)."""
    cache = Path(os.environ["CHARTSIGHT_RETRIEVAL__ENCODERS__CACHE_DIR"])
    return EncoderRegistry(EncoderSettings(device="cpu", cache_dir=cache))
