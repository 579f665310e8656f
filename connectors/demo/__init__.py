"""Demo data for the embedded default: five Synthea patients, plus images attached at import time."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from connectors.images import window_dicom
from connectors.store import FhirStore, ImportReport

DEMO_DIR = Path(__file__).parent

# Demo patients that get images (resource ids as in their bundles).
TOMMY_FRIESEN = "6234b038-fa0d-476f-b373-6c22de018cf7"
MARTINA_MURAZIK = "beaf0c3d-bcd4-4155-8a7b-f493bdc8f9fe"


def demo_bundles() -> list[Path]:
    """The packaged Synthea bundles."""
    return sorted(DEMO_DIR.glob("*.json.gz"))


def _png_of(path: str | Path) -> bytes:
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    buf = io.BytesIO()
    Image.fromarray(window_dicom(ds)).save(buf, format="PNG")
    return buf.getvalue()


def demo_images_bundle() -> dict[str, Any]:
    """A transaction Bundle attaching pydicom's test images to two demo patients."""
    import pydicom  # (here, not at import: every CLI command imports this module)
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm")
    mr = get_testdata_file("MR_small.dcm")
    if not isinstance(ct, str) or not isinstance(
        mr, str
    ):  # pragma: no cover - both ship inside pydicom's wheel
        raise FileNotFoundError("pydicom's test files CT_small.dcm / MR_small.dcm are missing")
    b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    ct_ds = pydicom.dcmread(ct, stop_before_pixels=True)
    resources: list[dict[str, Any]] = [
        {
            "resourceType": "Media",
            "id": "demo-ct-small",
            "status": "completed",
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/media-type",
                        "code": "image",
                        "display": "Image",
                    }
                ]
            },
            "modality": {
                "coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]
            },
            "subject": {"reference": f"Patient/{TOMMY_FRIESEN}"},
            "createdDateTime": "2020-07-06T16:30:00+00:00",
            "content": {
                "contentType": "image/png",
                "data": b64(_png_of(ct)),
                "title": "CT slice (pydicom test image CT_small.dcm, demo only)",
                "creation": "2020-07-06T16:30:00+00:00",
            },
            "note": [{"text": f"Demo image; DICOM Study UID {ct_ds.StudyInstanceUID}"}],
        },
        {
            "resourceType": "Binary",
            "id": "demo-mr-small",
            "contentType": "application/dicom",
            "data": b64(Path(mr).read_bytes()),
        },
        {
            "resourceType": "DocumentReference",
            "id": "demo-mr-small-doc",
            "status": "current",
            "type": {
                "coding": [
                    {
                        "system": "http://loinc.org",
                        "code": "18748-4",
                        "display": "Diagnostic imaging study",
                    }
                ]
            },
            "subject": {"reference": f"Patient/{MARTINA_MURAZIK}"},
            "date": "2019-11-02T09:00:00+00:00",
            "description": "MR image (pydicom test image MR_small.dcm, demo only)",
            "content": [
                {
                    "attachment": {
                        "contentType": "application/dicom",
                        "url": "Binary/demo-mr-small",
                        "title": "MR_small.dcm",
                    }
                }
            ],
        },
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"{r['resourceType']}/{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


def import_demo(store: FhirStore) -> list[ImportReport]:
    """Import the demo patients and their images into ``store`` (idempotent)."""
    reports = [store.import_path(path) for path in demo_bundles()]
    reports.append(store.import_json(demo_images_bundle(), "demo images (pydicom test files)"))
    return reports
