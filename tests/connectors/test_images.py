"""Images with provenance: attachments (inline, Binary), ImagingStudy over DICOMweb (Orthanc)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.dicomweb import DicomWebClient, InstanceRef
from connectors.errors import ImageError, ResourceNotFound
from connectors.images import collect_images, decode_image, window_dicom
from connectors.record import assemble_record
from connectors.settings import ImageSettings
from connectors.store import FhirStore, StoreSource


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


async def test_demo_images_come_with_provenance(demo_store: FhirStore):
    source = StoreSource(demo_store)
    tommy = await assemble_record(source, TOMMY_FRIESEN)
    images = await collect_images(tommy, source, ImageSettings())
    media = [i for i in images.images if i.provenance.fhir_reference == "Media/demo-ct-small"]
    assert len(media) == 1 and media[0].modality == "CT" and media[0].size == (128, 128)
    expected = window_dicom(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    assert np.array_equal(media[0].pixels, expected)
    # Synthea's ImagingStudy has no pixels anywhere: reported for that study only
    assert [f.provenance.fhir_reference for f in images.failures] == [
        f"ImagingStudy/{tommy.imaging_studies[0].id}"
    ]
    assert "no DICOMweb endpoint" in images.failures[0].error

    martina = await assemble_record(source, MARTINA_MURAZIK)
    mr = (await collect_images(martina, source, ImageSettings())).images
    assert [i.provenance.fhir_reference for i in mr] == ["DocumentReference/demo-mr-small-doc"]
    assert mr[0].provenance.attachment_url == "Binary/demo-mr-small"
    assert mr[0].modality == "MR" and mr[0].content_type == "application/dicom"


async def test_one_broken_image_does_not_spoil_the_others(store: FhirStore):
    good = np.tile(np.arange(64, dtype=np.uint8), (32, 1))
    resources = [
        {"resourceType": "Patient", "id": "p"},
        _media("good", "image/png", _png(good)),
        _media("corrupt", "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
        _media("notimage", "image/jpeg", b"hello, I am text"),
        _media("dicomjunk", "application/dicom", b"\x00" * 128 + b"DICM" + b"\x01" * 64),
    ]
    store.import_json(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": r} for r in resources],
        },
        "t",
    )
    source = StoreSource(store)
    record = await assemble_record(source, "p")
    images = await collect_images(record, source, ImageSettings())
    assert [i.provenance.fhir_reference for i in images.images] == ["Media/good"]
    assert np.array_equal(images.images[0].pixels, good)
    failed = {f.provenance.fhir_reference: f.error for f in images.failures}
    assert set(failed) == {"Media/corrupt", "Media/notimage", "Media/dicomjunk"}
    assert "cannot decode image" in failed["Media/corrupt"]
    assert "cannot decode DICOM" in failed["Media/dicomjunk"]


def test_size_limits_give_a_clear_error():
    big = _png(np.zeros((300, 300), dtype=np.uint8))
    with pytest.raises(ImageError, match="over the 100-byte limit"):
        decode_image(big, "image/png", "Media/x", ImageSettings(max_bytes=100))
    with pytest.raises(ImageError, match="300×300 pixels is over the limit"):
        decode_image(big, "image/png", "Media/x", ImageSettings(max_pixels=1000))
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"%PDF-1.4", "application/pdf", "Media/x", ImageSettings())


def _media(rid: str, ctype: str, data: bytes) -> dict:
    return {
        "resourceType": "Media",
        "id": rid,
        "status": "completed",
        "subject": {"reference": "Patient/p"},
        "content": {"contentType": ctype, "data": base64.b64encode(data).decode()},
    }


def _fresh_copy(name: str, study_uid: str, series_uid: str) -> tuple[bytes, pydicom.Dataset]:
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPInstanceUID = generate_uid()
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), ds


@pytest.mark.integration
async def test_imaging_study_pixels_come_back_through_dicomweb(orthanc, store: FhirStore):
    study_uid = generate_uid()
    files = {
        "CT_small.dcm": generate_uid(),  # explicit little endian CT
        "MR_small_jp2klossless.dcm": generate_uid(),  # JPEG 2000: needs GDCM on Orthanc's side
        "MR_small_RLE.dcm": generate_uid(),
    }
    originals = {}
    for name, series_uid in files.items():
        data, ds = _fresh_copy(name, study_uid, series_uid)
        httpx.post(f"{orthanc.url}/instances", content=data, timeout=30).raise_for_status()
        originals[ds.SOPInstanceUID] = (name, ds)
    # the ImagingStudy lists the MR series explicitly and points at the PACS through an Endpoint
    series = []
    for sop, (_name, ds) in originals.items():
        series.append(
            {
                "uid": ds.SeriesInstanceUID,
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": ds.Modality,
                },
                "instance": [
                    {
                        "uid": sop,
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            "code": f"urn:oid:{ds.SOPClassUID}",
                        },
                    }
                ],
            }
        )
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": r}
            for r in [
                {"resourceType": "Patient", "id": "p"},
                {
                    "resourceType": "Endpoint",
                    "id": "pacs",
                    "status": "active",
                    "connectionType": {
                        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                        "code": "dicom-wado-rs",
                    },
                    "payloadType": [{"text": "DICOM"}],
                    "address": orthanc.base_url,
                },
                {
                    "resourceType": "ImagingStudy",
                    "id": "s1",
                    "status": "available",
                    "subject": {"reference": "Patient/p"},
                    "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
                    "endpoint": [{"reference": "Endpoint/pacs"}],
                    "series": series,
                },
            ]
        ],
    }
    store.import_json(bundle, "imaging")
    source = StoreSource(store)
    record = await assemble_record(source, "p")
    images = await collect_images(record, source, ImageSettings())
    assert not images.failures, images.failures
    assert len(images.images) == 3
    for image in images.images:
        prov = image.provenance
        assert prov.fhir_reference == "ImagingStudy/s1" and prov.study_uid == study_uid
        assert prov.source == orthanc.base_url
        name, ds = originals[prov.sop_instance_uid]
        assert prov.series_uid == ds.SeriesInstanceUID
        expected = window_dicom(pydicom.dcmread(get_testdata_file(name)))
        assert np.array_equal(image.pixels, expected), name  # lossless all the way
        assert image.modality == ds.Modality


@pytest.mark.integration
async def test_qido_finds_instances_and_rendered_frames_decode(orthanc):
    study_uid, series_uid = generate_uid(), generate_uid()
    data, ds = _fresh_copy("MR_small_jp2klossless.dcm", study_uid, series_uid)
    httpx.post(f"{orthanc.url}/instances", content=data, timeout=30).raise_for_status()
    async with DicomWebClient(orthanc.base_url) as client:
        found = await client.search_instances(study_uid)
        assert [i.sop_instance_uid for i in found] == [ds.SOPInstanceUID]
        assert found[0].modality == "MR" and found[0].series_uid == series_uid
        for _ in range(3):  # GDCM's JPEG 2000 decoder once crashed Orthanc on the second request
            png = await client.rendered(found[0], window=(600, 1200))
            pixels, _ = decode_image(png, "image/png", "x", ImageSettings())
            assert pixels.shape[:2] == (ds.Rows, ds.Columns)
        assert await client.search_instances(generate_uid()) == []
        with pytest.raises(ResourceNotFound):
            await client.retrieve_instance(InstanceRef(study_uid, series_uid, generate_uid()))


def test_palette_images_keep_grey_as_one_channel_and_colour_as_rgb():
    grey = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1)))
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 200
    for source, shape in ((grey, (8, 64)), (Image.fromarray(red), (4, 4, 3))):
        paletted = source.convert("P")
        buf = io.BytesIO()
        paletted.save(buf, format="PNG")
        pixels, _ = decode_image(buf.getvalue(), "image/png", "Media/p", ImageSettings())
        assert pixels.shape == shape
        expected = np.asarray(paletted.convert("RGB"))
        assert np.array_equal(pixels, expected if len(shape) == 3 else expected[..., 0])
