"""Fixtures shared by the agent tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from connectors.demo import TOMMY_FRIESEN, demo_bundles
from tests.conftest import load_bundle


def _first_id(path: Path) -> str:
    return str(load_bundle(path)["entry"][0]["resource"]["id"])


@pytest.fixture(scope="module")
def tommy_json() -> list[dict[str, Any]]:
    """The demo patient Tommy Friesen's resources as plain FHIR JSON."""
    path = next(p for p in demo_bundles() if _first_id(p) == TOMMY_FRIESEN)
    return [e["resource"] for e in load_bundle(path)["entry"]]
