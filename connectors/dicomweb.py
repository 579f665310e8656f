"""A DICOMweb client: QIDO-RS to find instances, WADO-RS to fetch them (or rendered frames)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx

from connectors.auth import BearerAuth
from connectors.errors import InvalidResponse
from connectors.http import RetryingHttp
from connectors.settings import DicomWebSettings, HttpSettings

# DICOM JSON tags (PS3.18 F.2)
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, NUMBER_OF_FRAMES, INSTANCE_NUMBER = "00080060", "00280008", "00200013"


def tag_value(dataset: dict[str, Any], tag: str) -> Any:
    """First value of a tag in a DICOM JSON dataset."""
    values = (dataset.get(tag) or {}).get("Value") or []
    return values[0] if values else None


@dataclass(frozen=True)
class InstanceRef:
    """One DICOM instance as found by QIDO-RS."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    modality: str | None = None
    frames: int = 1
    number: int | None = None


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str | None, bytes]]:
    """Parts of a ``multipart/related`` body as (content type, bytes)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError(f"multipart response without a boundary ({content_type})")
    delimiter = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk.removeprefix(b"\r\n")
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        ctype = None
        for line in head.split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-type":
                ctype = value.strip()
        parts.append((ctype, payload.removesuffix(b"\r\n")))
    return parts


class DicomWebClient:
    """QIDO-RS and WADO-RS against one DICOMweb root (e.g. ``http://pacs/dicom-web``)."""

    def __init__(
        self,
        base_url: str,
        *,
        http: HttpSettings | None = None,
        token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = RetryingHttp(
            http or HttpSettings(),
            auth=BearerAuth(token) if token else None,
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: DicomWebSettings) -> DicomWebClient | None:
        """A client for ``settings.url`` with its HTTP settings and bearer token; ``None`` when no
        DICOMweb URL is configured (images then come from FHIR attachments only)."""
        if not settings.url:
            return None
        token = settings.token.get_secret_value() if settings.token else None
        return cls(settings.url, http=settings.http, token=token)

    async def aclose(self) -> None:
        """Close the HTTP connections; the client is not used after."""
        await self.http.aclose()

    async def __aenter__(self) -> DicomWebClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def search_instances(
        self, study_uid: str, series_uid: str | None = None
    ) -> list[InstanceRef]:
        """QIDO-RS: the instances of a study (or of one series)."""
        path = (
            f"studies/{study_uid}" + (f"/series/{series_uid}" if series_uid else "") + "/instances"
        )
        url = f"{self.base_url}/{path}"
        response = await self.http.request("GET", url, headers={"Accept": "application/dicom+json"})
        if response.status_code == 204 or not response.content:
            return []
        try:
            body = response.json()
        except ValueError as exc:
            raise InvalidResponse(url, "QIDO-RS answer is not JSON") from exc
        if not isinstance(body, list):
            raise InvalidResponse(url, "QIDO-RS answer is not a JSON array")
        out = []
        for ds in body:
            sop = tag_value(ds, SOP_UID)
            if not sop:
                continue
            frames = tag_value(ds, NUMBER_OF_FRAMES)
            number = tag_value(ds, INSTANCE_NUMBER)
            out.append(
                InstanceRef(
                    study_uid=tag_value(ds, STUDY_UID) or study_uid,
                    series_uid=tag_value(ds, SERIES_UID) or series_uid or "",
                    sop_instance_uid=str(sop),
                    modality=tag_value(ds, MODALITY),
                    frames=int(frames) if frames else 1,
                    number=int(number) if number is not None else None,
                )
            )
        out.sort(
            key=lambda i: (
                i.series_uid,
                i.number if i.number is not None else 0,
                i.sop_instance_uid,
            )
        )
        return out

    def _instance_url(self, ref: InstanceRef) -> str:
        return (
            f"{self.base_url}/studies/{ref.study_uid}/series/{ref.series_uid}"
            f"/instances/{ref.sop_instance_uid}"
        )

    async def retrieve_instance(self, ref: InstanceRef) -> bytes:
        """WADO-RS: the instance as a DICOM file, in its stored transfer syntax."""
        url = self._instance_url(ref)
        response = await self.http.request(
            "GET",
            url,
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        ctype = response.headers.get("Content-Type", "")
        if ctype.startswith("application/dicom"):
            return response.content
        try:
            parts = parse_multipart(response.content, ctype)
        except ValueError as exc:
            raise InvalidResponse(url, str(exc)) from exc
        if not parts:
            raise InvalidResponse(url, "WADO-RS answer holds no DICOM part")
        return parts[0][1]

    async def rendered(
        self, ref: InstanceRef, frame: int = 1, window: tuple[float, float] | None = None
    ) -> bytes:
        """WADO-RS rendered frame as PNG (the server decodes and windows it)."""
        url = f"{self._instance_url(ref)}/frames/{frame}/rendered"
        # Sent unencoded: some servers (Orthanc's DICOMweb plugin 1.7) do not percent-decode.
        if window is not None:
            url += f"?window={window[0]:g},{window[1]:g},linear"
        response = await self.http.request("GET", url, headers={"Accept": "image/png"})
        return response.content
