"""A patient's images, each with its provenance: Media, document attachments, ImagingStudy (DICOMweb).

An image that cannot be fetched or decoded becomes an ``ImageFailure`` for that image only.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image, UnidentifiedImageError

from connectors.dicomweb import DicomWebClient, InstanceRef
from connectors.errors import ConnectorError, ImageError
from connectors.record import PatientRecord
from connectors.resources import reference_of
from connectors.settings import ImageSettings
from connectors.source import BinaryContent, FhirSource

if TYPE_CHECKING:  # pydicom is imported when a DICOM object is read (0.3-0.6 s at start-up)
    import pydicom

DICOM_TYPES = ("application/dicom", "application/dicom+octet-stream")

# Default display windows (center, width) per modality when the file names none.
DEFAULT_WINDOWS: dict[str, tuple[float, float]] = {"CT": (40.0, 400.0)}


@dataclass(frozen=True)
class ImageProvenance:
    """Where an image came from: the FHIR resource and, for DICOM, its UIDs."""

    fhir_reference: str
    source: str
    attachment_url: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    frame: int | None = None


@dataclass
class PatientImage:
    """Display-ready pixels (uint8, H×W grey or H×W×3 RGB) with modality and provenance."""

    pixels: np.ndarray
    modality: str | None
    content_type: str | None
    provenance: ImageProvenance
    description: str | None = None
    date: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    def to_pil(self) -> Image.Image:
        """The pixels as a PIL image (mode "L" for grey, "RGB" for colour)."""
        return Image.fromarray(self.pixels)

    def png_bytes(self) -> bytes:
        """The pixels encoded as PNG (lossless)."""
        buf = io.BytesIO()
        self.to_pil().save(buf, format="PNG")
        return buf.getvalue()


@dataclass(frozen=True)
class ImageFailure:
    """An image that could not be had, and why."""

    provenance: ImageProvenance
    error: str


@dataclass
class ImageSet:
    """A record's images: those fetched and decoded, and one ``ImageFailure`` per image that
    could not be had (so no image is left out silently)."""

    images: list[PatientImage] = field(default_factory=list)
    failures: list[ImageFailure] = field(default_factory=list)


# ------------------------------------------------------------------ decoding


def _to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        hi = lo + 1.0
    scaled = (arr.astype(np.float32) - lo) / (hi - lo)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def window_dicom(ds: pydicom.Dataset, frame: int = 0) -> np.ndarray:
    """Display pixels of a DICOM dataset: modality LUT, then the file's VOI window or a modality default."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[min(frame, frames - 1)]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 and arr.shape[-1] == 3:  # colour (RGB, or YBR converted by pydicom)
        if arr.dtype != np.uint8:
            arr = _to_uint8(arr, float(arr.min()), float(arr.max()))
        return np.ascontiguousarray(arr)
    modality = str(getattr(ds, "Modality", "") or "")
    values = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        windowed = apply_voi_lut(values, ds, index=0)
        lo, hi = float(np.min(windowed)), float(np.max(windowed))
        if photometric == "MONOCHROME1":
            windowed = hi + lo - windowed
        return _to_uint8(windowed, lo, hi)
    if modality in DEFAULT_WINDOWS:
        center, width = DEFAULT_WINDOWS[modality]
        lo, hi = center - width / 2, center + width / 2
    else:  # robust range for MR, X-ray and anything else without a window
        lo, hi = (float(v) for v in np.percentile(values, (0.5, 99.5)))
    out = _to_uint8(values, lo, hi)
    return 255 - out if photometric == "MONOCHROME1" else out


def decode_image(
    data: bytes, content_type: str | None, reference: str, settings: ImageSettings
) -> tuple[np.ndarray, str | None]:
    """Bytes of a PNG/JPEG/… or DICOM file to display pixels and the modality (DICOM only)."""
    if len(data) > settings.max_bytes:
        raise ImageError(
            reference, f"image is {len(data)} bytes, over the {settings.max_bytes}-byte limit"
        )
    if not data:
        raise ImageError(reference, "image is empty")
    ctype = (content_type or "").split(";")[0].strip().lower()
    is_dicom = ctype in DICOM_TYPES or (len(data) > 132 and data[128:132] == b"DICM")
    if is_dicom:
        try:
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data), force=ctype in DICOM_TYPES)
            rows, cols = int(ds.Rows), int(ds.Columns)
            if rows * cols * int(getattr(ds, "NumberOfFrames", 1) or 1) > settings.max_pixels:
                raise ImageError(
                    reference, f"DICOM image of {cols}×{rows} pixels is over the limit"
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = window_dicom(ds)
        except ImageError:
            raise
        except Exception as exc:  # pydicom raises many types for broken or unsupported data
            raise ImageError(
                reference, f"cannot decode DICOM: {type(exc).__name__}: {exc}"
            ) from exc
        return pixels, str(getattr(ds, "Modality", "") or "") or None
    if ctype and not ctype.startswith("image/") and ctype != "application/octet-stream":
        raise ImageError(reference, f"content type {ctype!r} is not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > settings.max_pixels:
                raise ImageError(
                    reference, f"image of {img.width}×{img.height} pixels is over the limit"
                )
            img.load()
    except ImageError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise ImageError(reference, f"cannot decode image: {exc}") from exc
    if img.mode in ("I;16", "I;16B", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        return _to_uint8(arr, float(arr.min()), float(arr.max())), None
    if img.mode in ("L", "LA", "1"):
        return np.asarray(img.convert("L")), None
    rgb = np.asarray(img.convert("RGB"))
    # A palette image whose colours are all greys is kept as one channel, like an L image.
    if (
        img.mode == "P"
        and (rgb[..., 0] == rgb[..., 1]).all()
        and (rgb[..., 1] == rgb[..., 2]).all()
    ):
        return np.ascontiguousarray(rgb[..., 0]), None
    return rgb, None


# ------------------------------------------------------------------ collecting


def _attachment_is_image(att: Any) -> bool:
    ctype = str(getattr(att, "contentType", "") or "").lower()
    return ctype.startswith("image/") or ctype.split(";")[0] in DICOM_TYPES


class ImageCollector:
    """Fetches and decodes a record's images under the limits in ``ImageSettings``."""

    def __init__(
        self,
        source: FhirSource,
        settings: ImageSettings,
        dicomweb: DicomWebClient | None = None,
        source_base_url: str | None = None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.dicomweb = dicomweb
        self.base_url = (source_base_url or "").rstrip("/")
        self._sem = asyncio.Semaphore(4)
        self._endpoint_clients: dict[str, DicomWebClient] = {}

    async def collect(self, record: PatientRecord) -> ImageSet:
        """Every image the record references, up to ``max_images``."""
        jobs: list[tuple[ImageProvenance, Any]] = []
        for media in record.media:
            if media.content is not None and _attachment_is_image(media.content):
                modality = _code(media.modality)
                jobs.append(
                    self._attachment_job(
                        reference_of(media), media.content, modality, _text(media.note)
                    )
                )
        for doc in record.documents:
            for content in doc.content or []:
                if _attachment_is_image(content.attachment):
                    jobs.append(
                        self._attachment_job(
                            reference_of(doc), content.attachment, None, doc.description
                        )
                    )
        for report in record.diagnostic_reports:
            for att in report.presentedForm or []:
                if _attachment_is_image(att):
                    jobs.append(
                        self._attachment_job(reference_of(report), att, None, report.conclusion)
                    )
        results = ImageSet()
        for study in record.imaging_studies:
            prov = ImageProvenance(
                reference_of(study), self.source.name, study_uid=_study_uid(study)
            )
            try:
                jobs.extend(await self._study_jobs(study, record))
            except ConnectorError as exc:
                results.failures.append(ImageFailure(prov, str(exc)))
        for _, job in jobs[self.settings.max_images :]:
            job.close()  # never awaited: close the coroutine so it leaves no warning
        jobs = jobs[: self.settings.max_images]
        try:
            outcomes = await asyncio.gather(*(self._run(prov, job) for prov, job in jobs))
        finally:
            for client in self._endpoint_clients.values():
                await client.aclose()
            self._endpoint_clients.clear()
        for outcome in outcomes:
            if isinstance(outcome, PatientImage):
                results.images.append(outcome)
            else:
                results.failures.append(outcome)
        return results

    async def _run(self, prov: ImageProvenance, job: Any) -> PatientImage | ImageFailure:
        async with self._sem:
            try:
                return await job
            except ConnectorError as exc:
                return ImageFailure(prov, str(exc))

    def _attachment_job(
        self, ref: str, att: Any, modality: str | None, description: str | None
    ) -> tuple[ImageProvenance, Any]:
        prov = ImageProvenance(ref, self.source.name, attachment_url=att.url)
        return prov, self._attachment_image(prov, att, modality, description)

    async def _attachment_image(
        self, prov: ImageProvenance, att: Any, modality: str | None, description: str | None
    ) -> PatientImage:
        content = await self._attachment_bytes(prov.fhir_reference, att)
        ctype = att.contentType or content.content_type
        pixels, dicom_modality = await asyncio.to_thread(
            decode_image, content.data, ctype, prov.fhir_reference, self.settings
        )
        return PatientImage(
            pixels=pixels,
            modality=dicom_modality or modality,
            content_type=ctype,
            provenance=prov,
            description=description or att.title,
            date=str(att.creation) if att.creation else None,
        )

    async def _attachment_bytes(self, ref: str, att: Any) -> BinaryContent:
        if att.data is not None:  # fhir.resources has already decoded the base64
            return BinaryContent(bytes(att.data), att.contentType, ref)
        url = str(att.url or "")
        if not url:
            raise ImageError(ref, "attachment has neither data nor url")
        if url.startswith("Binary/") or (self.base_url and url.startswith(self.base_url + "/")):
            return await self.source.binary(url)
        if urlsplit(url).scheme in ("http", "https"):
            if not self.settings.fetch_external_urls:
                raise ImageError(
                    ref,
                    f"attachment URL {url} is outside the FHIR server; set images.fetch_external_urls to fetch it",
                )
            async with httpx.AsyncClient(timeout=30, follow_redirects=False) as client:
                try:
                    response = await client.get(url)
                except httpx.HTTPError as exc:
                    raise ImageError(ref, f"cannot fetch {url}: {exc}") from exc
            if not response.is_success:
                raise ImageError(ref, f"{url} answered HTTP {response.status_code}")
            return BinaryContent(response.content, response.headers.get("Content-Type"), url)
        return await self.source.binary(url)

    async def _study_jobs(
        self, study: Any, record: PatientRecord
    ) -> list[tuple[ImageProvenance, Any]]:
        study_uid = _study_uid(study)
        ref = reference_of(study)
        if not study_uid:
            raise ImageError(ref, "ImagingStudy has no Study Instance UID identifier")
        client = await self._dicomweb_for(study)
        if client is None:
            raise ImageError(
                ref,
                "no DICOMweb endpoint (ImagingStudy.endpoint or dicomweb.url) to fetch pixels from",
            )
        listed = [
            InstanceRef(study_uid, str(series.uid), str(inst.uid), _code(series.modality))
            for series in study.series or []
            for inst in series.instance or []
        ]
        instances = listed or await client.search_instances(study_uid)
        jobs = []
        by_series: dict[str, list[InstanceRef]] = {}
        for inst in instances:
            by_series.setdefault(inst.series_uid, []).append(inst)
        for series_instances in by_series.values():
            for inst in _evenly(series_instances, self.settings.max_instances_per_series):
                prov = ImageProvenance(
                    ref,
                    client.base_url,
                    study_uid=inst.study_uid,
                    series_uid=inst.series_uid,
                    sop_instance_uid=inst.sop_instance_uid,
                    frame=1,
                )
                jobs.append((prov, self._dicom_image(client, inst, prov)))
        return jobs

    async def _dicomweb_for(self, study: Any) -> DicomWebClient | None:
        for endpoint_ref in study.endpoint or []:
            target = str(endpoint_ref.reference or "")
            rtype, _, rid = target.partition("/")
            if rtype != "Endpoint" or not rid:
                continue
            endpoint = await self.source.read("Endpoint", rid)
            address = getattr(endpoint, "address", None)
            if (
                address
                and self.dicomweb is not None
                and str(address).rstrip("/") == self.dicomweb.base_url
            ):
                return self.dicomweb
            if address:
                key = str(address).rstrip("/")
                if key not in self._endpoint_clients:
                    http = self.dicomweb.http.settings if self.dicomweb else None
                    self._endpoint_clients[key] = DicomWebClient(key, http=http)
                return self._endpoint_clients[key]
        return self.dicomweb

    async def _dicom_image(
        self, client: DicomWebClient, inst: InstanceRef, prov: ImageProvenance
    ) -> PatientImage:
        data = await client.retrieve_instance(inst)
        try:
            pixels, modality = await asyncio.to_thread(
                decode_image, data, "application/dicom", prov.fhir_reference, self.settings
            )
            ctype = "application/dicom"
        except ImageError as decode_error:
            # The PACS may decode what pydicom cannot (an unusual transfer syntax): use its rendering.
            try:
                png = await client.rendered(inst)
            except ConnectorError as exc:
                raise ImageError(
                    prov.fhir_reference, f"{decode_error.reason}; rendered frame failed too: {exc}"
                ) from exc
            pixels, _ = await asyncio.to_thread(
                decode_image, png, "image/png", prov.fhir_reference, self.settings
            )
            modality, ctype = inst.modality, "image/png"
        return PatientImage(
            pixels=pixels, modality=modality or inst.modality, content_type=ctype, provenance=prov
        )


def _evenly(items: list[InstanceRef], n: int) -> list[InstanceRef]:
    if len(items) <= n:
        return items
    step = (len(items) - 1) / max(n - 1, 1)
    return [items[round(i * step)] for i in range(n)]


def _study_uid(study: Any) -> str | None:
    for ident in study.identifier or []:
        value = str(ident.value or "")
        if value.startswith("urn:oid:"):
            return value.removeprefix("urn:oid:")
        if ident.system == "urn:dicom:uid" and value:
            return value.removeprefix("urn:oid:")
    return None


def _code(concept: Any) -> str | None:
    if concept is None:
        return None
    if getattr(concept, "code", None):
        return str(concept.code)
    for coding in getattr(concept, "coding", None) or []:
        if coding.code:
            return str(coding.code)
    return None


def _text(notes: Any) -> str | None:
    for note in notes or []:
        if getattr(note, "text", None):
            return str(note.text)
    return None


async def collect_images(
    record: PatientRecord,
    source: FhirSource,
    settings: ImageSettings,
    dicomweb: DicomWebClient | None = None,
) -> ImageSet:
    """The record's images with provenance; failures listed per image."""
    base = getattr(source, "base_url", None)
    return await ImageCollector(source, settings, dicomweb, base).collect(record)
