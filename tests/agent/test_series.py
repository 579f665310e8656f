"""agent.cited_series on the demo charts: expected values read from the FHIR JSON itself."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fhir.resources.R4B.observation import ObservationReferenceRange

from agent import cited_series
from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.record import PatientRecord
from tests.agent.test_tools import _observations
from tests.agent.test_tools import raw as raw  # the demo patients' JSON, by Synthea id
from tests.agent.test_tools import records as records  # their records, from the local store

CREATININE, GLUCOSE = "38483-4", "2339-0"


def _with(record: PatientRecord, observations: list[Any]) -> PatientRecord:
    return dataclasses.replace(record, observations=observations, derived={})


def test_the_cited_results_oldest_first_with_the_usual_range(raw, records):
    json = _observations(raw[TOMMY_FRIESEN], CREATININE)
    refs = [f"Observation/{r['id']}" for r in json]
    # cited in another order, with other resources and a glucose beside them
    glucose = _observations(raw[TOMMY_FRIESEN], GLUCOSE)[0]["id"]
    cited = [*reversed(refs), f"Patient/{TOMMY_FRIESEN}", f"Observation/{glucose}"]
    series = cited_series(records[TOMMY_FRIESEN], cited)
    assert series is not None
    assert [ref for _, _, ref in series.points] == refs
    assert [v for _, v, _ in series.points] == [r["valueQuantity"]["value"] for r in json]
    assert [w.date().isoformat() for w, _, _ in series.points] == [
        r["effectiveDateTime"][:10] for r in json
    ]
    assert series.unit == "mg/dL" and series.name == json[-1]["code"]["text"]
    assert (series.low, series.high, series.range_label) == (0.6, 1.3, "usual range")


def test_fewer_than_three_cited_results_of_one_test_are_no_series(raw, records):
    refs = [f"Observation/{r['id']}" for r in _observations(raw[TOMMY_FRIESEN], CREATININE)]
    assert cited_series(records[TOMMY_FRIESEN], refs[:2]) is None
    assert cited_series(records[TOMMY_FRIESEN], []) is None
    # two creatinines and two glucoses are two series of two, not one of four
    glucose = [f"Observation/{r['id']}" for r in _observations(raw[TOMMY_FRIESEN], GLUCOSE)]
    assert cited_series(records[TOMMY_FRIESEN], refs[:2] + glucose[:2]) is None


def test_another_patients_results_are_never_read(raw, records):
    hers = [f"Observation/{r['id']}" for r in _observations(raw[MARTINA_MURAZIK], "2093-3")]
    assert len(hers) >= 3
    assert cited_series(records[TOMMY_FRIESEN], hers) is None
    mine = [f"Observation/{r['id']}" for r in _observations(raw[TOMMY_FRIESEN], CREATININE)][:3]
    series = cited_series(records[TOMMY_FRIESEN], hers + mine)
    assert series is not None and [ref for _, _, ref in series.points] == mine


def test_values_in_another_unit_are_converted_and_the_labs_range_is_used(raw, records):
    record = records[TOMMY_FRIESEN]
    ids = [r["id"] for r in _observations(raw[TOMMY_FRIESEN], GLUCOSE)][:3]
    observations = []
    for obs in record.observations:
        if obs.id == ids[0]:  # the same result reported in mmol/L (glucose: 180.156 g/mol)
            mmol = float(obs.valueQuantity.value) * 10 / 180.156
            obs = obs.model_copy(
                update={
                    "valueQuantity": obs.valueQuantity.model_copy(
                        update={"value": mmol, "unit": "mmol/L", "code": "mmol/L"}
                    )
                }
            )
        if obs.id == ids[2]:  # the newest carries the lab's own range, in mmol/L
            ucum = {"system": "http://unitsofmeasure.org", "code": "mmol/L"}
            rng = ObservationReferenceRange.model_validate(
                {"low": {"value": 3.9, **ucum}, "high": {"value": 5.5, **ucum}}
            )
            obs = obs.model_copy(update={"referenceRange": [rng]})
        observations.append(obs)
    series = cited_series(_with(record, observations), [f"Observation/{i}" for i in ids])
    assert series is not None and series.unit == "mg/dL"
    expected = [r["valueQuantity"]["value"] for r in _observations(raw[TOMMY_FRIESEN], GLUCOSE)[:3]]
    assert [v for _, v, _ in series.points] == pytest.approx(expected, rel=1e-6)
    assert series.range_label == "ref"
    assert (series.low, series.high) == pytest.approx((3.9 * 18.0156, 5.5 * 18.0156), rel=1e-6)


def test_bounds_are_left_out(raw, records):
    record = records[TOMMY_FRIESEN]
    ids = [r["id"] for r in _observations(raw[TOMMY_FRIESEN], CREATININE)][:4]
    observations = [
        obs.model_copy(
            update={"valueQuantity": obs.valueQuantity.model_copy(update={"comparator": "<"})}
        )
        if obs.id == ids[0]
        else obs
        for obs in record.observations
    ]
    changed = _with(record, observations)
    series = cited_series(changed, [f"Observation/{i}" for i in ids])
    assert series is not None and [r for _, _, r in series.points] == [
        f"Observation/{i}" for i in ids[1:]
    ]
    assert cited_series(changed, [f"Observation/{i}" for i in ids[:3]]) is None
