"""Structured tools: expected values computed here from the FHIR JSON itself."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.tools import Fact, ToolContext, ToolError, default_tools
from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.record import PatientRecord, assemble_record
from connectors.store import FhirStore, StoreSource
from tests.conftest import install_entry_point, load_bundle

NOW = datetime(2021, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def raw(bundles: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Each demo patient's resources as plain JSON, by Synthea patient id."""
    out = {}
    for path in bundles:
        resources = [e["resource"] for e in load_bundle(path)["entry"]]
        out[resources[0]["id"]] = resources
    return out


@pytest.fixture(scope="module")
def records(demo_store: FhirStore) -> dict[str, PatientRecord]:
    source = StoreSource(demo_store)
    return {
        pid: asyncio.run(assemble_record(source, pid)) for pid in (TOMMY_FRIESEN, MARTINA_MURAZIK)
    }


def _observations(resources: list[dict[str, Any]], loinc: str) -> list[dict[str, Any]]:
    found = [
        r
        for r in resources
        if r["resourceType"] == "Observation"
        and any(c.get("code") == loinc for c in r["code"].get("coding", []))
    ]
    return sorted(found, key=lambda r: r["effectiveDateTime"])


def _one(facts: list[Fact]) -> Fact:
    assert len(facts) == 1, facts
    return facts[0]


@pytest.mark.parametrize("pid", [TOMMY_FRIESEN, MARTINA_MURAZIK])
@pytest.mark.parametrize(
    ("query", "loinc"),
    [
        ("A1c", "4548-4"),
        ("body weight", "29463-7"),
        ("39156-5", "39156-5"),
        ("creatinine", "38483-4"),
    ],
)
def test_latest_observation_matches_the_json(records, raw, pid: str, query: str, loinc: str):
    expected = _observations(raw[pid], loinc)
    fact = _one(
        default_tools()["latest_observation"](ToolContext(records[pid], now=NOW), query=query)
    )
    if not expected:
        assert fact.value is None and fact.statement.startswith("No ")
        return
    newest = expected[-1]
    assert fact.evidence == (f"Observation/{newest['id']}",)
    assert fact.value == pytest.approx(newest["valueQuantity"]["value"])
    assert fact.unit == newest["valueQuantity"]["unit"]
    assert fact.date == datetime.fromisoformat(newest["effectiveDateTime"])
    assert fact.statement.endswith(f"[Observation/{newest['id']}]")
    assert fact.details["results_in_record"] == len(expected)


def test_observation_stats_over_a_window(records, raw):
    since = datetime(2017, 1, 1, tzinfo=UTC)
    rows = [
        r
        for r in _observations(raw[TOMMY_FRIESEN], "4548-4")
        if datetime.fromisoformat(r["effectiveDateTime"]) >= since
    ]
    values = [r["valueQuantity"]["value"] for r in rows]
    fact = _one(
        default_tools()["observation_stats"](
            ToolContext(records[TOMMY_FRIESEN], now=NOW), query="hba1c", since=since
        )
    )
    assert fact.details["count"] == len(values) > 2
    assert fact.value == pytest.approx(statistics.fmean(values))
    assert fact.details["min"] == pytest.approx(min(values))
    assert fact.details["max"] == pytest.approx(max(values))
    # a change under a fifth of the usual range's width (4–5.6 %) is "about unchanged"
    change = values[-1] - values[0]
    expected = "rising" if change > 0 else "falling"
    assert fact.details["trend"] == (
        "about unchanged" if abs(change) < 0.2 * (5.6 - 4.0) else expected
    )
    assert set(fact.evidence) == {f"Observation/{r['id']}" for r in rows}
    last_day = default_tools()["observation_stats"](
        ToolContext(records[TOMMY_FRIESEN], now=NOW), query="A1c", days=1
    )
    none, newest = last_day  # nothing in the window, and where the record's newest result is
    assert none.details["count"] == 0 and none.value is None
    newest_a1c = _observations(raw[TOMMY_FRIESEN], "4548-4")[-1]
    assert newest.statement.startswith("The newest A1c result in the record is ")
    assert newest.evidence == (f"Observation/{newest_a1c['id']}",)


def test_demographics_and_age(records, raw):
    patient = raw[TOMMY_FRIESEN][0]
    born = date.fromisoformat(patient["birthDate"])
    on = date(2020, 6, 1)
    expected = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    tools = default_tools()
    ctx = ToolContext(records[TOMMY_FRIESEN], now=NOW)
    age = _one(tools["age"](ctx, on=on))
    assert age.value == expected and age.evidence == (f"Patient/{TOMMY_FRIESEN}",)
    demo = _one(tools["demographics"](ctx))
    assert demo.value["name"] == f"{patient['name'][0]['given'][0]} {patient['name'][0]['family']}"
    assert (
        demo.value["birth_date"] == patient["birthDate"] and demo.value["sex"] == patient["gender"]
    )


@pytest.mark.parametrize("pid", [TOMMY_FRIESEN, MARTINA_MURAZIK])
def test_active_problems_medications_allergies(records, raw, pid: str):
    resources = raw[pid]
    active_conditions = {
        f"Condition/{r['id']}"
        for r in resources
        if r["resourceType"] == "Condition"
        and r.get("clinicalStatus", {}).get("coding", [{}])[0].get("code") == "active"
    }
    active_meds = {
        f"MedicationRequest/{r['id']}"
        for r in resources
        if r["resourceType"] == "MedicationRequest" and r["status"] == "active"
    }
    allergies = {
        f"AllergyIntolerance/{r['id']}"
        for r in resources
        if r["resourceType"] == "AllergyIntolerance"
    }
    tools = default_tools()
    ctx = ToolContext(records[pid], now=NOW)

    def refs(name: str, prefix: str) -> set[str]:
        return {r for f in tools[name](ctx) for r in f.evidence if r.startswith(prefix)}

    assert refs("active_problems", "Condition/") == active_conditions
    assert refs("active_medications", "MedicationRequest/") == active_meds
    assert refs("allergies", "AllergyIntolerance/") == allergies
    if not allergies:
        (none,) = tools["allergies"](ctx)
        # an absence is a statement about the whole record, cited by its Patient
        assert none.statement == f"No allergy is recorded. [Patient/{pid}]" and none.value == []


def test_recent_encounters_are_newest_first_and_limited(records, raw):
    encounters = sorted(
        (r for r in raw[TOMMY_FRIESEN] if r["resourceType"] == "Encounter"),
        key=lambda r: r["period"]["start"],
        reverse=True,
    )
    facts = default_tools()["recent_encounters"](
        ToolContext(records[TOMMY_FRIESEN], now=NOW), limit=3
    )
    assert [f.evidence[0] for f in facts] == [f"Encounter/{r['id']}" for r in encounters[:3]]


def test_bad_arguments_and_unknown_tools_fail_clearly(records):
    tools = default_tools()
    ctx = ToolContext(records[TOMMY_FRIESEN], now=NOW)
    with pytest.raises(ToolError, match="recent_procedures: bad arguments"):
        tools["recent_procedures"](ctx, limit=0)
    with pytest.raises(ToolError, match="no tool 'nope'"):
        tools["nope"]
    schema = tools["observation_stats"].schema()["function"]
    assert schema["name"] == "observation_stats" and "query" in schema["parameters"]["required"]
    # an argument named like the record's context is an unknown argument, not a TypeError
    for name in ("ctx", "self"):
        with pytest.raises(ToolError, match=f"latest_observation: bad arguments.*{name}"):
            tools["latest_observation"](ctx, query="A1c", **{name: 1})


def test_a_window_reaching_before_year_1_is_the_whole_record(records):
    """'the last 99999 months' (or a caller's ``days`` of 1e9) starts before ``datetime``'s
    first year: the statistics of every result, not an OverflowError."""
    ctx = ToolContext(records[TOMMY_FRIESEN], now=NOW)
    stats = default_tools()["observation_stats"]
    whole = _one(stats(ctx, query="A1c"))
    assert _one(stats(ctx, query="A1c", days=1e9)).details == whole.details


def test_tools_come_from_entry_points(records, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    install_entry_point(
        tmp_path,
        monkeypatch,
        "cs_tool",
        "from agent.tools import Fact, tool\n"
        "@tool('encounter_count', 'How many encounters.')\n"
        "def count(ctx):\n"
        "    n = len(ctx.record.encounters)\n"
        "    return [Fact('encounter_count', f'{n} encounters.', value=n)]\n"
        "def register(reg):\n"
        "    reg.add(count.name, count)\n",
        "chartsight.tools",
        "count = cs_tool:register",
    )
    tools = default_tools()
    fact = _one(tools["encounter_count"](ToolContext(records[TOMMY_FRIESEN], now=NOW)))
    assert fact.value == len(records[TOMMY_FRIESEN].encounters) > 0


def test_tools_are_langchain_tools_too(records):
    from agent.tools import langchain_tools

    tools = {
        t.name: t
        for t in langchain_tools(default_tools(), ToolContext(records[TOMMY_FRIESEN], now=NOW))
    }
    assert {"latest_observation", "observation_stats", "active_medications"} <= set(tools)
    text = tools["latest_observation"].invoke({"query": "A1c"})
    assert text.startswith("Latest A1c: ") and "[Observation/" in text
    assert tools["observation_stats"].args["query"]["type"] == "string"


def test_a_query_cannot_put_its_own_numbers_into_a_fact(records) -> None:  # type: ignore[no-untyped-def]
    # facts support the sentences that cite them, so a model-written query with numbers in it
    # must not turn those numbers into "evidence"
    ctx = ToolContext(records[TOMMY_FRIESEN], now=NOW)
    reg = default_tools(plugins=False)
    for tool, args in [
        ("latest_observation", {"query": "A1c 13.7"}),
        ("latest_observation", {"query": "A1c 13.7", "nth": 99}),
        ("observation_stats", {"query": "A1c 13.7"}),
        ("observation_stats", {"query": "A1c 13.7", "days": 1}),
    ]:
        for fact in reg[tool](ctx, **args):
            assert fact.evidence and "13.7" not in fact.statement, fact.statement
    # a code the results carry is kept as asked
    (fact,) = reg["latest_observation"](ctx, query="4548-4")
    assert fact.statement.startswith("Latest 4548-4:")


def test_similar_cases_is_a_tool_too(tmp_path: Path, demo_store: FhirStore):
    from typer.testing import CliRunner

    from agent.service import ChartSight
    from agent.settings import Settings
    from surfaces.cli import app

    settings = Settings(home=tmp_path / "home", store={"url": str(demo_store.engine.url)})

    env = {"CHARTSIGHT_HOME": str(settings.home), "CHARTSIGHT_STORE__URL": settings.store.url}

    async def facts() -> tuple[list[Fact], list[Any]]:
        # one open ChartSight (as a running service) sees the index that `chartsight index
        # build` makes meanwhile (its own CaseIndex), without a restart
        async with ChartSight(settings) as agent:
            with pytest.raises(ToolError, match="no similar-case index"):
                await agent.facts(TOMMY_FRIESEN, "similar_cases", {"k": 2})
            build = await asyncio.to_thread(CliRunner().invoke, app, ["index", "build"], env=env)
            assert build.exit_code == 0, build.output
            return (
                await agent.facts(TOMMY_FRIESEN, "similar_cases", {"k": 2}),
                await agent.similar(TOMMY_FRIESEN, 2),
            )

    found, hits = asyncio.run(facts())
    assert [f.evidence for f in found] == [(h.key,) for h in hits] and len(found) == 2
    assert all(h.patient_id != TOMMY_FRIESEN for h in hits)
    assert all(f.statement.startswith("Similar case (score ") for f in found)


def test_the_nth_latest_in_a_period_and_an_absence_at_any_date(records):  # type: ignore[no-untyped-def]
    from agent.tools import latest_observation, observation_stats

    ctx = ToolContext(records[TOMMY_FRIESEN], now=datetime(2021, 1, 1, tzinfo=UTC))
    since, until = datetime(2015, 1, 1, tzinfo=UTC), datetime(2020, 12, 31, tzinfo=UTC)
    first = latest_observation(ctx, query="A1c", since=since, until=until)[0]
    second = latest_observation(ctx, query="A1c", since=since, until=until, nth=2)[0]
    assert first.statement.startswith("Latest A1c from 2015-01-01 to 2020-12-31:")
    assert second.statement.startswith("Result 2 back A1c") and second.date < first.date
    beyond = latest_observation(ctx, query="A1c", since=since, until=until, nth=1000)[0]
    assert beyond.statement.startswith("There is no earlier A1c result from 2015-01-01")
    # a test the chart never has: "none at any date", not only "none in that period"
    none = observation_stats(ctx, query="troponin", since=since, until=until)[0]
    assert "(none at any date)" in none.statement


def test_a_diagnosis_found_is_answered_yes_first_with_its_onset(records, tommy_json):  # type: ignore[no-untyped-def]
    from agent.tools import condition_history

    hf = [
        r
        for r in tommy_json
        if r["resourceType"] == "Condition"
        and any(c["code"] == "88805009" for c in r["code"]["coding"])
    ]
    assert hf and all(r["clinicalStatus"]["coding"][0]["code"] == "active" for r in hf)
    onset = min(r["onsetDateTime"][:10] for r in hf)
    facts = condition_history(ToolContext(records[TOMMY_FRIESEN], now=NOW), query="heart failure")
    assert facts[0].statement.startswith(
        f"Yes: heart failure is recorded as active (since {onset})."
    )
    assert set(facts[0].evidence) == {f"Condition/{r['id']}" for r in hf}


@pytest.mark.parametrize("category", ["laboratory", "vital-signs"])
def test_recent_results_are_every_result_of_the_latest_day(records, tommy_json, category):  # type: ignore[no-untyped-def]
    from agent.tools import recent_results

    # from the JSON: Observations of the category with a value, on the newest day among them
    rows = [
        r
        for r in tommy_json
        if r["resourceType"] == "Observation"
        and r.get("status") != "entered-in-error"
        and any(c["code"] == category for cat in r.get("category", []) for c in cat["coding"])
        and ("valueQuantity" in r or "valueCodeableConcept" in r or "component" in r)
    ]
    day = max(r["effectiveDateTime"][:10] for r in rows)
    expected = {f"Observation/{r['id']}" for r in rows if r["effectiveDateTime"][:10] == day}
    head, *lines = recent_results(ToolContext(records[TOMMY_FRIESEN], now=NOW), category=category)
    assert (
        head.statement.startswith(f"{len(expected)} ")
        and f"on {day}, the latest day" in head.statement
    )
    assert set(head.evidence) == expected == {f.evidence[0] for f in lines}


def test_a_birth_date_after_today_gives_no_age(records):  # type: ignore[no-untyped-def]
    from agent.tools import age

    record = records[TOMMY_FRIESEN]
    future = dataclasses.replace(
        record, patient=record.patient.model_copy(update={"birthDate": date(2100, 1, 1)})
    )
    (fact,) = age(ToolContext(future, now=NOW))
    assert fact.statement.startswith(
        "The record's birth date, 2100-01-01, is after 2021-01-01: no age can be given."
    )
    assert fact.value is None


def test_what_changed_in_a_period_counts_and_lists_what_is_new(records, tommy_json):  # type: ignore[no-untyped-def]
    """Diagnoses recorded and medications ordered in 2020, counted from the FHIR JSON itself; a
    period after the chart ends says so and names the chart's last date (not "no change")."""
    from agent.tools import changes_in_period

    ctx = ToolContext(records[TOMMY_FRIESEN], now=datetime(2026, 11, 30, tzinfo=UTC))
    in_2020 = {
        "since": datetime(2020, 1, 1, tzinfo=UTC),
        "until": datetime(2020, 12, 31, tzinfo=UTC),
    }

    def started(kind: str, field: str) -> set[str]:
        return {
            f"{kind}/{r['id']}"
            for r in tommy_json
            if r["resourceType"] == kind and r.get(field, "").startswith("2020")
        }

    conditions, orders = (
        started("Condition", "onsetDateTime"),
        started("MedicationRequest", "authoredOn"),
    )
    assert conditions and orders  # heart failure, furosemide, metoprolol (the demo's 2020)
    head, *listed = changes_in_period(ctx, **in_2020)
    assert head.statement.startswith("From 2020-01-01 to 2020-12-31 the record has ")
    assert f"{len(conditions)} diagnos" in head.statement
    assert f"{len(orders)} medication" in head.statement
    assert conditions | orders <= set(head.evidence)
    assert conditions | orders <= {ref for f in listed for ref in f.evidence}
    assert not any(ref.startswith("Encounter/") for f in listed for ref in f.evidence)

    (nothing,) = changes_in_period(ctx, days=365)
    last = max(
        r.get("effectiveDateTime", "") for r in tommy_json if r["resourceType"] == "Observation"
    )[:10]
    assert nothing.statement.startswith("Nothing is recorded from 2025-11-30 to 2026-11-30")
    assert f"the record's latest dated entry is from {last}" in nothing.statement
