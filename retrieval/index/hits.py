"""What a search may return (``CaseFilter``) and what it returns (``CaseHit``), and how much of a
hit a caller may see (``shown_to``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from retrieval.cases import CasePrivacy, generalised_summary


@dataclass(frozen=True)
class CaseFilter:
    """Which cases a search may return; applied inside the FAISS search (an IDSelector)."""

    exclude_patient: str | None = None
    exclude_identifiers: tuple[str, ...] = ()  # also leave out cases of patients with these
    modality: str | None = None
    sex: str | None = None
    age_band: str | None = None

    @property
    def narrows(self) -> bool:
        """True when the filter allows only some cases (a modality, sex or age band), so the
        search takes an allow-list; exclusions alone leave every other case allowed."""
        return bool(self.modality or self.sex or self.age_band)


@dataclass(frozen=True)
class CaseHit:
    """A similar case found by a search: its key and patient, the inner-product ``score`` of the
    fused vectors (higher is closer), the summary and the columns filters use."""

    key: str
    patient_id: str
    score: float
    summary: str
    sex: str | None
    age_band: str | None
    modalities: tuple[str, ...]
    label: str | None
    kind: str


def generalised_hit(hit: CaseHit, n: int) -> CaseHit:
    """``hit`` as a caller who may read only one patient's record sees it: no case key and no
    patient id (the case is "similar-case-<n>"), the summary ``generalised_summary``'s; sex, age
    band (90+ pooled), modalities, label, kind and score are kept."""
    band = hit.age_band
    if band is not None and band[:2].isdigit() and int(band.split("-")[0].rstrip("+")) >= 90:
        band = "90+"
    return replace(
        hit,
        key=f"similar-case-{n}",
        patient_id="",
        summary=generalised_summary(hit.summary),
        age_band=band,
    )


def shown_to(hits: list[CaseHit], privacy: CasePrivacy) -> list[CaseHit]:
    """``hits`` as a caller with ``privacy`` may see them: as they are ("full"), or each
    ``generalised_hit`` ("generalised", numbered from 1 in rank order)."""
    if privacy == "generalised":
        return [generalised_hit(h, n) for n, h in enumerate(hits, 1)]
    return hits
