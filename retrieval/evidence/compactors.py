"""The built-in compactors: per FHIR *datatype* (Quantity, CodeableConcept, Period, Reference, ...)
turning verbose JSON into short text, and per *resource type* (Observation, Condition, ...)
composing them into one ``Evidence`` line. Each is a named function, registered by name from
``DATATYPES`` and ``RESOURCES``; ``meta``, narrative and empty fields never reach the text.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from connectors.record import PatientRecord
from retrieval.clinical import codes_of, display_name, measurement_of, read_status
from retrieval.evidence.flags import range_flag, range_text
from retrieval.evidence.model import (
    CompactContext,
    Compactors,
    DatatypeCompactor,
    Evidence,
    ResourceCompactor,
    evidence_line,
)
from retrieval.evidence.text import clean_text, date_text, number, status_code

# Short names for the code systems charts use, for the compact lines.
SYSTEM_NAMES: dict[str, str] = {
    "http://loinc.org": "LOINC",
    "http://snomed.info/sct": "SNOMED",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://dicom.nema.org/resources/ontology/DCM": "DCM",
}

# UCUM units of a Timing's period, as words
_PERIOD_UNITS = {
    "s": "second",
    "min": "minute",
    "h": "hour",
    "d": "day",
    "wk": "week",
    "mo": "month",
    "a": "year",
}

# --- datatypes ------------------------------------------------------------------------------------


def coding(c: Any, reg: Compactors) -> str:
    """A Coding: its display (else code), with "(LOINC 4548-4)" when the system is one of
    ``SYSTEM_NAMES`` and it has both display and code."""
    name = clean_text(str(c.display or c.code or ""))
    system = SYSTEM_NAMES.get(c.system or "")
    return f"{name} ({system} {c.code})" if system and c.code and c.display else name


def concept(c: Any, reg: Compactors) -> str:
    """A CodeableConcept: its text, with the first coding of a known system as "(SNOMED 44054006)";
    without text, that coding (else the first) as ``coding`` writes it; "" when empty."""
    codings = c.coding or []
    coded = next((x for x in codings if x.system in SYSTEM_NAMES and x.code), None)
    if c.text:
        text = clean_text(str(c.text))
        return f"{text} ({SYSTEM_NAMES[coded.system]} {coded.code})" if coded else text
    if coded is not None:
        return coding(coded, reg)
    return coding(codings[0], reg) if codings else ""


def quantity(q: Any, reg: Compactors) -> str:
    """A Quantity (and Age, Duration, Distance, Count, SimpleQuantity, Money): comparator, value and
    unit ("<0.5 mg/dL"); "" without a value."""
    if q.value is None:
        return ""
    unit = q.unit or q.code or ""
    comparator = q.comparator or ""  # a bound ("<0.5") stays a bound in every line
    return f"{comparator}{number(q.value)} {unit}".strip()


def range_(r: Any, reg: Compactors) -> str:
    """A Range: "4–6 mmol/L", "> 4 mmol/L" or "< 6 mmol/L" (the unit of its high bound, else low)."""
    unit = (r.high or r.low).unit if (r.high or r.low) is not None else None
    return f"{range_text(r)} {unit or ''}".strip()


def ratio(r: Any, reg: Compactors) -> str:
    """A Ratio: "<numerator> / <denominator>", each as its datatype writes it."""
    return f"{reg.text(r.numerator)} / {reg.text(r.denominator)}"


def period(p: Any, reg: Compactors) -> str:
    """A Period: "<start> to <end>", "<start>" (also when both are one date), "until <end>", or ""."""
    start = date_text(p.start)
    end = date_text(p.end)
    if start and end and start != end:
        return f"{start} to {end}"
    return start or (f"until {end}" if end else "")


def reference(r: Any, reg: Compactors) -> str:
    """A Reference: its display, else the reference string itself."""
    return clean_text(str(r.display or r.reference or ""))


def human_name(n: Any, reg: Compactors) -> str:
    """A HumanName: its text, else the given names and the family name."""
    if n.text:
        return clean_text(str(n.text))
    return clean_text(" ".join([*(str(g) for g in n.given or []), str(n.family or "")]))


def annotation(a: Any, reg: Compactors) -> str:
    """An Annotation (a note): its text, cleaned."""
    return clean_text(str(a.text or ""))


def dosage(d: Any, reg: Compactors) -> str:
    """A Dosage: its text, else "dose <d>, <n>× per <period>, as needed" from its parts (UCUM
    period units as words, e.g. "2× per day")."""
    if d.text:
        return clean_text(str(d.text))
    parts = []
    for dr in d.doseAndRate or []:
        dose = reg.text(dr.doseQuantity or dr.doseRange)
        if dose:
            parts.append(f"dose {dose}")
    timing = d.timing.repeat if d.timing is not None else None
    if timing is not None and timing.frequency and timing.period:
        unit = _PERIOD_UNITS.get(str(timing.periodUnit or ""), str(timing.periodUnit or ""))
        every = unit if float(timing.period) == 1 else f"{number(timing.period)} {unit}s"
        parts.append(f"{timing.frequency}× per {every}")
    if d.asNeededBoolean:
        parts.append("as needed")
    return ", ".join(p for p in parts if p)


def attachment(a: Any, reg: Compactors) -> str:
    """An Attachment: its title, else its content type, else "attachment" (never its data)."""
    return clean_text(str(a.title or a.contentType or "attachment"))


# --- resources ------------------------------------------------------------------------------------


def _note_text(attachment: Any) -> str:
    """Inline text of an attachment (plain text or similar), for notes and report bodies."""
    ctype = (attachment.contentType or "").split(";")[0].strip().lower()
    if not attachment.data or not (
        ctype.startswith("text/") or ctype in ("application/xhtml+xml",)
    ):
        return ""
    data = attachment.data
    raw = data if isinstance(data, bytes) else base64.b64decode(data)
    text = raw.decode("utf-8", errors="replace")
    if ctype in ("text/html", "application/xhtml+xml"):
        text = re.sub(r"<[^>]+>", " ", text)
    return clean_text(text)


def _status_note(res: Any) -> str:
    """ ", <status words>" for a line, when the status says something a reader must know."""
    label = read_status(res).label
    return f", {label}" if label else ""


def _drug(m: Any, reg: Compactors, ctx: CompactContext) -> tuple[str, tuple[str, ...]]:
    """The drug a medication resource names (``PatientRecord.medication_code``: its concept, or
    the contained or referenced Medication's code), else the reference's display."""
    code = ctx.record.medication_code(m)
    if code is not None:
        return reg.text(code), codes_of(code)
    ref = getattr(m, "medicationReference", None)
    return (reg.text(ref), ()) if ref is not None else ("", ())


def patient(p: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """Patient: "Patient: <name>, <gender>, born <date>, died <date>|deceased" (undated line)."""
    parts = [f"Patient: {clean_text(display_name(p))}"]
    if p.gender:
        parts.append(str(p.gender))
    born = date_text(p.birthDate)
    if born:
        parts.append(f"born {born}")
    died = date_text(p.deceasedDateTime)
    if died:
        parts.append(f"died {died}")
    elif p.deceasedBoolean:
        parts.append("deceased")
    return evidence_line(p, ", ".join(parts), "demographics", dated=False)


# components written in the order clinicians write them: a blood pressure is "systolic/diastolic"
# (LOINC 8480-6 before 8462-4, whatever order the panel lists them in); others keep their order
_COMPONENT_ORDER = {"8480-6": 0, "8462-4": 1}


def _component_rank(comp: Any) -> int:
    codes = [c.code for c in (comp.code.coding or []) if c.code] if comp.code else []
    return min((_COMPONENT_ORDER[c] for c in codes if c in _COMPONENT_ORDER), default=2)


def _component_text(comp: Any, reg: Compactors, ctx: CompactContext) -> tuple[str, bool]:
    comp_codes = codes_of(comp.code)
    m = measurement_of(comp.valueQuantity) or measurement_of(comp.valueString)
    value = (
        m.text
        if m is not None and comp.valueQuantity is None
        else reg.text(comp.valueQuantity or comp.valueCodeableConcept or comp.valueString)
    )
    if not value and comp.dataAbsentReason is not None:
        value = f"no value ({reg.text(comp.dataAbsentReason)})"
    flag, bad = range_flag(
        comp.valueQuantity or m,
        comp.referenceRange or [],
        comp.interpretation or [],
        comp_codes,
        ctx.terms,
    )
    label = reg.text(comp.code).split(" (")[0]
    return f"{label} {value}".strip() + (f" ({flag})" if flag else ""), bad


def observation(o: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """Observation: "<name> <value> (<flag>)", or its components "<name>: <a> <v>; <b> <v>", or
    "<name>: no result (<why>)"; a status other than final/amended/corrected is shown, notes
    appended. Abnormal by ``flags.range_flag``."""
    codes = codes_of(o.code)
    name = reg.text(o.code)
    status = read_status(o)
    abnormal = False
    value = reg.text(
        o.valueQuantity
        or o.valueCodeableConcept
        or o.valueString
        or o.valueBoolean
        or o.valueInteger
        or o.valueRange
        or o.valueRatio
        or o.valuePeriod
        or o.valueDateTime
    )
    if value:
        flag, abnormal = range_flag(
            o.valueQuantity or measurement_of(o.valueString),
            o.referenceRange or [],
            o.interpretation or [],
            codes,
            ctx.terms,
        )
        body = f"{name} {value}".strip() + (f" ({flag})" if flag else "")
    elif o.component:
        parts = []
        for comp in sorted(o.component, key=_component_rank):
            text, bad = _component_text(comp, reg, ctx)
            abnormal |= bad
            codes += codes_of(comp.code)
            parts.append(text)
        body = f"{name}: " + "; ".join(parts)
    else:
        why = [w for w in (status.label, reg.text(o.dataAbsentReason)) if w]
        body = f"{name}: no result" + (f" ({'; '.join(why)})" if why else "")
    if value or o.component:
        if status.not_done:
            body += f" [{status.label}]"
        elif o.status not in ("final", "amended", "corrected", None):
            body += f" [status {o.status}]"
    for note in o.note or []:
        body += f"; note: {reg.text(note)}"
    return evidence_line(o, body, "observation", tuple(dict.fromkeys(codes)), abnormal=abnormal)


def condition(c: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """Condition: "Condition: <code>, <clinical status> (<verification>), resolved <date>", or
    "ruled out" when refuted; active by ``clinical.read_status``."""
    status = read_status(c)
    clinical = status_code(c.clinicalStatus) if c.clinicalStatus is not None else ""
    if status.refuted:
        body = f"Condition: {reg.text(c.code)}, ruled out (verification status refuted)"
    else:
        body = f"Condition: {reg.text(c.code)}" + (f", {clinical}" if clinical else "")
        verification = status_code(c.verificationStatus) if c.verificationStatus else ""
        if verification and verification != "confirmed":
            body += f" ({verification})"
        resolved = date_text(c.abatementDateTime)
        if resolved:
            body += f", resolved {resolved}"
    return evidence_line(c, body, "condition", codes_of(c.code), active=status.active)


def medication(m: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """MedicationRequest, MedicationStatement, MedicationAdministration, MedicationDispense:
    "Medication[ given| dispensed]: <drug>, <status>; <dosage>; for <reasons>; reason: <why not>"."""
    drug, codes = _drug(m, reg, ctx)
    status = read_status(m)
    dosages = getattr(m, "dosageInstruction", None) or getattr(m, "dosage", None)
    if isinstance(dosages, list):
        dosage = reg.text(dosages[0]) if dosages else ""
    else:  # MedicationAdministration.dosage: one element with text and dose
        dosage = clean_text(str(getattr(dosages, "text", "") or "")) or reg.text(
            getattr(dosages, "dose", None)
        )
    word = {
        "MedicationAdministration": "Medication given",
        "MedicationDispense": "Medication dispensed",
    }.get(m.get_resource_type(), "Medication")
    body = f"{word}: {drug or 'unnamed'}, {_label_or(m.status, status.label)}"
    body += f"; {dosage}" if dosage else ""
    reasons = [reg.text(r) for r in (getattr(m, "reasonCode", None) or [])]
    if reasons:
        body += f"; for {', '.join(reasons)}"
    if status.not_done:
        why = getattr(m, "statusReason", None)
        why_text = reg.text(why) if why is not None and not isinstance(why, list) else ""
        body += f"; reason: {why_text}" if why_text else ""
    return evidence_line(m, body, "medication", codes, active=status.active)


def allergy(a: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """AllergyIntolerance: "Allergy: <code>, criticality <c>, <status>, reaction <r>", or
    "not allergic (refuted on <date>)" when refuted."""
    status = read_status(a)
    if status.refuted:
        when = date_text(a.recordedDate) or date_text(getattr(a, "lastOccurrence", None))
        body = f"Allergy: {reg.text(a.code)}: not allergic (refuted" + (
            f" on {when})" if when else ")"
        )
        return evidence_line(a, body, "allergy", codes_of(a.code), active=False)
    body = f"Allergy: {reg.text(a.code)}"
    extras = [
        x
        for x in (
            a.criticality and f"criticality {a.criticality}",
            status_code(a.clinicalStatus) if a.clinicalStatus else "",
        )
        if x
    ]
    reactions = [reg.text(m) for r in a.reaction or [] for m in r.manifestation or []]
    if reactions:
        extras.append("reaction " + ", ".join(reactions))
    body += (", " + ", ".join(extras)) if extras else ""
    return evidence_line(a, body, "allergy", codes_of(a.code), active=status.active)


def procedure(p: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """Procedure: "Procedure: <code>, <status>; for <reasons>; reason: <status reason>"."""
    body = f"Procedure: {reg.text(p.code)}, {_label_or(p.status, read_status(p).label)}"
    reasons = [reg.text(r) for r in p.reasonCode or []]
    if reasons:
        body += f"; for {', '.join(reasons)}"
    if p.statusReason is not None:
        body += f"; reason: {reg.text(p.statusReason)}"
    return evidence_line(p, body, "procedure", codes_of(p.code))


def encounter(e: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """Encounter: "Encounter: <type or class>[, <not done>]; reason <reasons>"."""
    kind = reg.text(e.type) or reg.text(getattr(e, "class_fhir", None))
    body = f"Encounter: {kind or 'visit'}" + (
        f", {read_status(e).label}" if read_status(e).not_done else ""
    )
    reasons = [reg.text(r) for r in e.reasonCode or []]
    if reasons:
        body += f"; reason {', '.join(reasons)}"
    return evidence_line(e, body, "encounter", codes_of(e.type or [], e.reasonCode or []))


def report(r: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """DiagnosticReport: "Report: <code>, <status>; <n> results; conclusion: <c>; text: <body>"
    (the results are evidence items of their own; only their count is named here)."""
    body = f"Report: {reg.text(r.code)}, {_label_or(r.status, read_status(r).label)}"
    if r.result:  # the results are evidence items of their own; naming them here only adds noise
        body += f"; {len(r.result)} result{'s' if len(r.result) > 1 else ''}"
    if r.conclusion:
        body += f"; conclusion: {clean_text(str(r.conclusion))}"
    texts = [t for t in (_note_text(a) for a in r.presentedForm or []) if t]
    if texts:
        body += f"; text: {clean_text(' '.join(texts))}"
    return evidence_line(r, body, "report", codes_of(r.code, r.conclusionCode or []))


def document(d: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """DocumentReference: "Document: <type> (superseded) (preliminary) (AI-generated),
    <description>; text: <inline text attachments>". "AI-generated" when ``meta.security`` holds
    v3-ObservationValue AIAST (HL7 AI Transparency on FHIR's label: an answer ChartSight or another
    AI wrote and a clinician saved), so a later answer does not pass it off as a clinician's
    note."""
    body = f"Document: {reg.text(d.type) or 'untyped'}"
    if d.status == "superseded":
        body += " (superseded)"
    if d.docStatus == "preliminary":
        body += " (preliminary)"
    if any(s.code == "AIAST" for s in (d.meta.security or [] if d.meta else [])):
        body += " (AI-generated)"
    if d.description:
        body += f", {clean_text(str(d.description))}"
    texts = [t for t in (_note_text(c.attachment) for c in d.content or []) if t]
    if texts:
        body += f"; text: {clean_text(' '.join(texts))}"
    return evidence_line(d, body, "document", codes_of(d.type))


def imaging(s: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """ImagingStudy: "Imaging study: <modalities> of <body sites>, <description>; <n> series, <m>
    instances", coded by its DICOM modality codes."""
    modalities = sorted(
        {str(m.code) for m in s.modality or [] if m.code}
        | {
            str(se.modality.code)
            for se in s.series or []
            if se.modality is not None and se.modality.code
        }
    )
    sites = sorted({reg.text(se.bodySite) for se in s.series or [] if se.bodySite is not None})
    body = f"Imaging study: {'/'.join(modalities) or 'unknown modality'}"
    if sites:
        body += f" of {', '.join(sites)}"
    body += _status_note(s) if read_status(s).not_done else ""
    if s.description:
        body += f", {clean_text(str(s.description))}"
    body += f"; {s.numberOfSeries or len(s.series or [])} series, {s.numberOfInstances or '?'} instances"
    codes = tuple(f"http://dicom.nema.org/resources/ontology/DCM|{m}" for m in modalities)
    return evidence_line(s, body, "imaging", codes)


def media(m: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """Media: "Image: <modality or type>, view <v>, of <body site>; note: <notes>"."""
    parts = [reg.text(m.modality) or reg.text(m.type) or "image"]
    if m.view is not None:
        parts.append(f"view {reg.text(m.view)}")
    if m.bodySite is not None:
        parts.append(f"of {reg.text(m.bodySite)}")
    body = (
        "Image: "
        + ", ".join(p for p in parts if p)
        + (_status_note(m) if read_status(m).not_done else "")
    )
    notes = [reg.text(n) for n in m.note or []]
    if notes:
        body += f"; note: {' '.join(notes)}"
    return evidence_line(m, body, "image", codes_of(m.modality, m.type))


def immunization(i: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """Immunization: "Immunization: <vaccine>, <status>; reason: <why not given>"."""
    status = read_status(i)
    body = f"Immunization: {reg.text(i.vaccineCode)}, {_label_or(i.status, status.label)}"
    if status.not_done and i.statusReason is not None:
        body += f"; reason: {reg.text(i.statusReason)}"
    return evidence_line(i, body, "immunization", codes_of(i.vaccineCode))


def care_plan(c: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """CarePlan: "Care plan: <category or title>, <status>; addresses <conditions>" (each
    addressed condition resolved to its code when the record holds it)."""
    body = f"Care plan: {reg.text(c.category) or reg.text(c.title) or 'untitled'}, {c.status}"
    addresses = []
    for ref in c.addresses or []:
        target = ctx.resolve(str(ref.reference or ""), c)
        addresses.append(reg.text(getattr(target, "code", None)) if target else reg.text(ref))
    if any(addresses):
        body += f"; addresses {', '.join(a for a in addresses if a)}"
    return evidence_line(
        c, body, "care-plan", codes_of(c.category or []), active=read_status(c).active
    )


def goal(g: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """Goal: "Goal: <description>, <lifecycle status> (<achievement status>)"."""
    body = f"Goal: {reg.text(g.description)}, {g.lifecycleStatus}"
    if g.achievementStatus is not None:
        body += f" ({status_code(g.achievementStatus)})"
    return evidence_line(g, body, "goal", codes_of(g.description))


def care_team(t: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """CareTeam: "Care team: <name or category>, <status>; <member> (<role>), ..." (each member by
    its display, else the referenced Practitioner's or Organization's name)."""
    body = (
        f"Care team: {t.name or reg.text(t.category) or 'unnamed'}, {t.status or 'unknown status'}"
    )
    members = []
    for part in t.participant or []:
        who = reg.text(part.member) if part.member is not None else ""
        target: Any = ctx.resolve(str(part.member.reference or ""), t) if part.member else None
        if target is not None and getattr(target, "name", None):
            name = target.name
            who = str(name) if isinstance(name, str) else reg.text(name[0])
        role = ", ".join(reg.text(r) for r in part.role or [])
        if who:
            members.append(f"{who} ({role})" if role else who)
    if members:
        body += f"; {', '.join(members)}"
    return evidence_line(
        t, body, "care-team", codes_of(t.category or []), active=t.status == "active"
    )


def consent(c: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """Consent (advance directives, DNR orders, privacy consents): "Consent: <categories>, <status>;
    scope <scope>; <provision type>"."""
    kinds = "; ".join(reg.text(k) for k in c.category or []) or "consent"
    body = f"Consent: {kinds}, {c.status}"
    if c.scope is not None:
        body += f"; scope {reg.text(c.scope)}"
    if c.provision is not None and c.provision.type:
        body += f"; provision {c.provision.type}"
    return evidence_line(
        c, body, "consent", codes_of(c.category or [], c.scope), active=c.status == "active"
    )


def _label_or(status: Any, label: str) -> str:
    """The status as words ("not done", "on hold"), else the status code itself."""
    return label or str(status or "unknown status")


# --- registration ---------------------------------------------------------------------------------

# FHIR datatype (pydantic class name) -> its compactor
DATATYPES: dict[str, DatatypeCompactor] = {
    "Coding": coding,
    "CodeableConcept": concept,
    "Quantity": quantity,
    "Age": quantity,
    "Duration": quantity,
    "Distance": quantity,
    "Count": quantity,
    "SimpleQuantity": quantity,
    "Money": quantity,
    "Range": range_,
    "Ratio": ratio,
    "Period": period,
    "Reference": reference,
    "HumanName": human_name,
    "Annotation": annotation,
    "Dosage": dosage,
    "Attachment": attachment,
}

# FHIR resource type -> its compactor
RESOURCES: dict[str, ResourceCompactor] = {
    "Patient": patient,
    "Observation": observation,
    "Condition": condition,
    "MedicationRequest": medication,
    "MedicationStatement": medication,
    "MedicationAdministration": medication,
    "MedicationDispense": medication,
    "AllergyIntolerance": allergy,
    "Procedure": procedure,
    "Encounter": encounter,
    "DiagnosticReport": report,
    "DocumentReference": document,
    "ImagingStudy": imaging,
    "Media": media,
    "Immunization": immunization,
    "CarePlan": care_plan,
    "Goal": goal,
    "CareTeam": care_team,
    "Consent": consent,
}


def register_builtins(reg: Compactors) -> None:
    """Register ``DATATYPES`` and ``RESOURCES`` in ``reg`` as "built-in". Raises
    CompactorConflict when ``reg`` already has a compactor for one of their names."""
    with reg.registering_as("built-in"):
        for name, datatype_fn in DATATYPES.items():
            reg.add_datatype(name, datatype_fn)
        for name, resource_fn in RESOURCES.items():
            reg.add_resource(name, resource_fn)


def default_compactors(*, plugins: bool = True) -> Compactors:
    """The built-in compactors, plus any installed through the ``chartsight.compactors`` entry
    point group when ``plugins`` is True (a plug-in replaces a built-in only with
    ``replace=True``; see ``Compactors``)."""
    reg = Compactors()
    register_builtins(reg)
    if plugins:
        reg.load_entry_points()
    return reg


def record_evidence(record: PatientRecord, compactors: Compactors | None = None) -> list[Evidence]:
    """The evidence items of a record (built-in compactors and installed plug-ins)."""
    return (compactors or default_compactors()).evidence(record)
