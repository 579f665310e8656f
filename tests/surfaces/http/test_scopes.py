"""SMART scope parsing (SMART App Launch 2.2, "Scopes and Launch Context"): v1 and v2 spellings."""

from __future__ import annotations

import pytest

from surfaces.http.security import Principal, may, scope_permissions


def caller(*scopes: str) -> Principal:
    return Principal("client", "client", frozenset(scopes))


@pytest.mark.parametrize(
    ("scope", "parsed"),
    [
        ("patient/*.read", ("patient", "*", "rs", "")),
        ("user/Observation.write", ("user", "Observation", "cud", "")),
        ("system/*.*", ("system", "*", "cruds", "")),
        ("patient/Observation.rs", ("patient", "Observation", "rs", "")),
        (
            "patient/Observation.rs?category=laboratory",
            ("patient", "Observation", "rs", "category=laboratory"),
        ),
        ("openid", None),
        ("launch/patient", None),
        ("patient/Observation.sr", None),  # v2 letters come in the order c r u d s
        ("patient/observation.rs", None),  # resource types are capitalised
    ],
)
def test_scopes_are_parsed_in_both_smart_versions(scope: str, parsed: object) -> None:
    assert scope_permissions(scope) == parsed


def test_a_grant_needs_every_permission_the_type_and_the_level() -> None:
    assert may(caller("user/AuditEvent.rs"), "AuditEvent", levels={"user", "system"})
    assert may(caller("system/AuditEvent.read"), "AuditEvent")
    assert may(caller("patient/*.read"), "Observation")
    assert may(caller("user/DocumentReference.cu"), "DocumentReference", "c")
    assert not may(caller("user/Observation.r"), "Observation")  # read without search
    assert not may(caller("patient/Observation.rs"), "AuditEvent")
    assert not may(caller("patient/AuditEvent.rs"), "AuditEvent", levels={"user", "system"})
    # a query-restricted grant is not a grant of the whole type
    assert not may(caller("patient/Observation.rs?category=laboratory"), "Observation")
    # a grant that must name its type: a wildcard does not count
    assert not may(caller("system/*.read"), "AuditEvent", wildcard=False)
    assert may(caller("system/AuditEvent.read"), "AuditEvent", wildcard=False)
