"""STOW-RS clients for tests/dicomweb.rs and bench/stow.py.

    stow_client.py study URL TOKEN SENT_DIR FILE...
        Sends FILE... with dicomweb-client's store_instances (one request) and writes
        each part it sent to SENT_DIR/<SOPInstanceUID>.dcm; prints the response as
        DICOM JSON.

    stow_client.py malformed URL TOKEN STUDY GOOD OTHER_STUDY...
        Posts one request to URL/studies/STUDY with hand-made parts: GOOD (stored), GOOD
        cut in the middle of its pixel data, GOOD without its SOP Instance UID, and each
        OTHER_STUDY file (a study other than STUDY). Prints {"status", "response"}.

    stow_client.py xml URL TOKEN FILE
        Posts FILE asking for application/dicom+xml and reads the answer with
        dicomweb-client's XML reader; prints {"status", "content_type", "response"}.

    stow_client.py status URL TOKEN FILE
        Posts FILE with TOKEN ("-" for none) and prints the HTTP status.
"""

import io
import json
import sys

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

BOUNDARY = "radflow-test-boundary-7f3a"


def headers(token):
    return {} if token == "-" else {"Authorization": f"Bearer {token}"}


def multipart(parts):
    body = b""
    for p in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


def post(url, token, parts, accept="application/dicom+json"):
    h = headers(token)
    h["Content-Type"] = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    h["Accept"] = accept
    return requests.post(url, data=multipart(parts), headers=h, timeout=120)


def encoded(ds):
    b = io.BytesIO()
    pydicom.dcmwrite(b, ds)
    return b.getvalue()


def study(url, token, sent_dir, files):
    client = DICOMwebClient(url, headers=headers(token))
    datasets = [pydicom.dcmread(f) for f in files]
    post_parts = client._http_post_multipart_application_dicom

    def capture(post_url, data):
        # Exactly the bytes the client encodes and sends.
        data = list(data)
        for ds, part in zip(datasets, data):
            with open(f"{sent_dir}/{ds.SOPInstanceUID}.dcm", "wb") as out:
                out.write(part)
        return post_parts(post_url, data)

    client._http_post_multipart_application_dicom = capture
    response = client.store_instances(datasets)
    print(json.dumps(response.to_json_dict()))


def malformed(url, token, study_uid, good, others):
    good_bytes = open(good, "rb").read()
    truncated = good_bytes[: len(good_bytes) // 2 + 1]
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    no_uid = pydicom.dcmread(io.BytesIO(encoded(ds)))
    del no_uid.SOPInstanceUID
    parts = [good_bytes, truncated, encoded(no_uid)] + [open(f, "rb").read() for f in others]
    r = post(f"{url}/studies/{study_uid}", token, parts)
    print(json.dumps({"status": r.status_code, "response": r.json()}))


def xml(url, token, file):
    from xml.etree.ElementTree import fromstring

    from dicomweb_client.web import _load_xml_dataset

    r = post(f"{url}/studies", token, [open(file, "rb").read()], accept="application/dicom+xml")
    ds = _load_xml_dataset(fromstring(r.content))
    print(
        json.dumps(
            {
                "status": r.status_code,
                "content_type": r.headers["Content-Type"],
                "response": ds.to_json_dict(),
            }
        )
    )


def status(url, token, file):
    r = post(f"{url}/studies", token, [open(file, "rb").read()])
    print(r.status_code)


if __name__ == "__main__":
    cmd, url, token, *rest = sys.argv[1:]
    if cmd == "study":
        study(url, token, rest[0], rest[1:])
    elif cmd == "malformed":
        malformed(url, token, rest[0], rest[1], rest[2:])
    elif cmd == "xml":
        xml(url, token, rest[0])
    elif cmd == "status":
        status(url, token, rest[0])
    else:
        sys.exit(f"unknown command {cmd}")
