"""'Is he on a beta blocker?': yes or no first, over the demo patients, the expected answer computed
here from the FHIR JSON with hand-written ingredient lists (not ChartSight's table)."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from agent import ChartSight, Settings
from agent.grounding import verify
from connectors.store import FhirStore
from tests.conftest import load_bundle

NOW = datetime(2021, 1, 1, tzinfo=UTC)
# what the question asks → words that make a MedicationRequest's drug a member (written here)
ASKED = {
    "Is the patient on a beta blocker?": ("metoprolol", "atenolol", "carvedilol", "toprol"),
    "Is the patient on a statin?": ("simvastatin", "atorvastatin", "rosuvastatin", "pravastatin"),
    "Is the patient on a diuretic?": ("furosemide", "lasix", "hydrochlorothiazide"),
    "Is the patient anticoagulated?": ("warfarin", "apixaban", "rivaroxaban", "heparin"),
    "Is the patient on an antiplatelet?": ("aspirin", "clopidogrel"),
    "Is the patient on birth control?": ("levora", "natazia", "yaz", "nuvaring", "ethinyl", "medroxyprogesterone"),
    "Is the patient taking opioids?": ("hydrocodone", "oxycodone", "meperidine"),
}  # fmt: skip


def _expected(bundle: dict[str, Any], words: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """(active member references, other member references) from the bundle's JSON."""
    active, other = set(), set()
    for entry in bundle["entry"]:
        r = entry["resource"]
        if r["resourceType"] != "MedicationRequest":
            continue
        display = r["medicationCodeableConcept"]["coding"][0]["display"].lower()
        if any(re.search(rf"\b{w}\b", display) for w in words):
            (active if r["status"] == "active" else other).add(f"MedicationRequest/{r['id']}")
    return active, other


@pytest.fixture(scope="module")
def answers(demo_store: FhirStore, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    from connectors.demo import demo_bundles

    settings = Settings(
        home=tmp_path_factory.mktemp("meds") / "home", store={"url": str(demo_store.engine.url)}
    )
    bundles = [load_bundle(p) for p in demo_bundles()]

    async def go() -> list[Any]:
        out = []
        async with ChartSight(settings, now=NOW, use_index=False) as cs:
            for bundle in bundles:
                pid = bundle["entry"][0]["resource"]["id"]
                for question, words in ASKED.items():
                    out.append((bundle, question, words, await cs.ask(pid, question)))
        return out

    return asyncio.run(go())


def test_yes_or_no_comes_first_and_cites_what_it_rests_on(answers: list[Any]):
    yes = no = 0
    for bundle, question, words, answer in answers:
        active, other = _expected(bundle, words)
        pid = bundle["entry"][0]["resource"]["id"]
        cited = {c.reference for c in answer.citations}
        assert not answer.abstained and answer.supported_fraction == 1.0, (question, answer.text)
        assert [c.tool for c in answer.tool_calls] == ["medication_use"], question
        if active:
            yes += 1
            assert answer.text.startswith("Yes: on "), (question, answer.text)
            assert active <= cited and f"Patient/{pid}" not in cited
        else:
            no += 1
            assert answer.text.startswith("No: "), (question, answer.text)
            assert f"Patient/{pid}" in cited and "searched" in answer.text
        # what was taken before is said, never as active
        assert other <= cited, (question, answer.text)
        for ref in other:
            assert "Not active now: " in answer.text and ref in answer.text
    assert yes >= 5 and no >= 10  # both kinds of answer were exercised


def test_a_model_cannot_claim_a_drug_its_citation_does_not_name(answers: list[Any]):
    _, _, _, answer = next(
        a
        for a in answers
        if a[1] == "Is the patient on a diuretic?" and a[3].text.startswith("Yes")
    )
    given = {c.reference: c.text for c in answer.citations}
    ref = next(r for r in given if r.startswith("MedicationRequest/"))
    assert verify(f"He is on a diuretic [{ref}].", given).supported_fraction == 1.0
    # a subclass the cited drug is not in (hydrochlorothiazide is a thiazide, furosemide a loop
    # diuretic): supported only when the cited line names a member
    loop = verify(f"He is on a loop diuretic [{ref}].", given).supported_fraction
    assert loop == (
        1.0 if "lasix" in given[ref].lower() or "furosemide" in given[ref].lower() else 0.0
    )
    assert verify(f"He is on atorvastatin 40 mg daily [{ref}].", given).supported_fraction == 0.0
    assert verify(f"He is on a statin [{ref}].", given).supported_fraction == 0.0
