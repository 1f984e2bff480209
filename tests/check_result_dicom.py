"""Checks the DICOM objects of one radflow result against the rest of it, with
highdicom, pydicom and nibabel; run by the pipeline tests.

    check_result_dicom.py RESULT_DIR SERIES_DIR

RESULT_DIR holds labels.nii.gz, summary.json, seg.dcm and sr.dcm; SERIES_DIR the
source files as they were sent. The SEG must hold exactly the label map of
labels.nii.gz (read with nibabel, its planes matched to the source images by their
positions along the normal), and the SR exactly the volumes of summary.json. Prints
"OK ..." or the difference, exiting 1.
"""

import json
import os
import sys
import tempfile

import nibabel as nib
import numpy as np
import pydicom

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "results", "tests"))
import check_results  # noqa: E402


def main(result, series_dir):
    summary = json.load(open(os.path.join(result, "summary.json")))
    files = sorted(
        os.path.join(series_dir, f) for f in os.listdir(series_dir) if f.endswith(".dcm")
    )
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    o = np.array([float(v) for v in sources[0].ImageOrientationPatient])
    normal = np.cross(o[:3], o[3:])
    order = sorted(
        range(len(sources)),
        key=lambda i: float(np.dot(normal, [float(v) for v in sources[i].ImagePositionPatient])),
    )
    uids = [str(sources[i].SOPInstanceUID) for i in order]

    # nibabel's (i, j, k) = (column, row, slice) → (slice, row, column).
    labels = np.asarray(nib.load(os.path.join(result, "labels.nii.gz")).dataobj)
    labels = np.ascontiguousarray(np.transpose(labels, (2, 1, 0)).astype(np.uint8))
    if labels.shape[0] != len(uids):
        check_results.fail(f"{labels.shape[0]} label planes for {len(uids)} source images")

    listed = {d["file"]: d for d in summary["dicom"]}
    if sorted(listed) != ["seg.dcm", "sr.dcm"]:
        check_results.fail(f"summary.json lists {sorted(listed)}")
    seg_path, sr_path = (os.path.join(result, f) for f in ("seg.dcm", "sr.dcm"))
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    sr = pydicom.dcmread(sr_path, stop_before_pixels=True)
    for name, ds in (("seg.dcm", seg), ("sr.dcm", sr)):
        entry = listed[name]
        if (str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID)) != (
            entry["sop_instance_uid"], entry["series_instance_uid"], entry["sop_class_uid"]
        ):
            check_results.fail(f"{name}: identity differs from summary.json")
        for attr in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
            if str(ds.get(attr, "")) != str(sources[0].get(attr, "")):
                check_results.fail(f"{name}: {attr} is not the source's")

    labels_by_number = {
        int(s.SegmentNumber): next(l["index"] for l in summary["labels"] if l["name"] == s.SegmentLabel)
        for s in seg.SegmentSequence
    }
    segments = [[label, n] for n, label in sorted(labels_by_number.items())]
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "labels.raw")
        labels.tofile(raw)
        check_results.check_seg(seg_path, {
            "kind": "binary", "source_uids": uids, "source_files": files,
            "shape": list(labels.shape), "raw": raw, "segments": segments,
        })
    segmented = set(labels_by_number.values())
    measurements = {
        l["name"]: ["Volume", l["volume_ml"], "ml"]
        for l in summary["labels"] if l["index"] in segmented
    }
    check_results.check_sr(sr_path, {
        "sha256": summary["model_sha256"],
        "measurements": measurements,
        "evidence_series": [summary["series_uid"], str(seg.SeriesInstanceUID)],
    })


if __name__ == "__main__":
    main(*sys.argv[1:3])
