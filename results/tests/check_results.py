"""Reads radflow's DICOM SEG and SR back with highdicom and pydicom and compares them
with what they were written from; run by results/tests/results.rs.

    check_results.py seg SEG.dcm EXPECTED.json
    check_results.py sr SR.dcm EXPECTED.json

EXPECTED.json (written by the test): the source files and SOP Instance UIDs in slice
order, the array shape, the path of the expected raw voxels (u8 labels for a binary
SEG, u8 fractions for a fractional one), the (label, segment number) pairs, and for
the SR the expected measurements. Exits 1 with the reason on any difference.
"""

import json
import sys

import highdicom as hd
import numpy as np
import pydicom


def fail(msg):
    print(f"MISMATCH: {msg}")
    sys.exit(1)


def check_seg(path, expected):
    seg = hd.seg.segread(path)
    uids = expected["source_uids"]
    shape = tuple(expected["shape"])
    raw = np.fromfile(expected["raw"], dtype=np.uint8)
    segments = expected["segments"]  # [[label, number], ...]
    numbers = [n for _, n in segments]
    # Geometry: every frame's position and the shared orientation are the source's.
    sources = {}
    for f in expected["source_files"]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = ds
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    for uid, ds in sources.items():
        if [float(v) for v in orientation.ImageOrientationPatient] != [
            float(v) for v in ds.ImageOrientationPatient
        ]:
            fail("orientation differs from the source")
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        ds = sources[src.ReferencedSOPInstanceUID]
        pos = frame.PlanePositionSequence[0].ImagePositionPatient
        if [float(v) for v in pos] != [float(v) for v in ds.ImagePositionPatient]:
            fail(f"frame {i + 1}: position differs from its source image")
    if str(seg.FrameOfReferenceUID) != str(next(iter(sources.values())).FrameOfReferenceUID):
        fail("frame of reference differs")
    if expected["kind"] == "binary":
        want = raw.reshape(shape)
        got = np.zeros(shape, dtype=np.uint8)
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=numbers,
            assert_missing_frames_are_empty=True,
        )
        for k, (label, _) in enumerate(segments):
            mask = pixels[..., k] > 0
            if np.any(got[mask] != 0):
                fail("segments overlap")
            got[mask] = label
        diff = int(np.count_nonzero(got != want))
        if diff:
            fail(f"{diff} voxels differ from the label map")
    else:
        want = raw.reshape((len(segments),) + shape)
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=numbers,
            assert_missing_frames_are_empty=True,
            rescale_fractional=False,
        )
        for k in range(len(segments)):
            diff = int(np.count_nonzero(pixels[..., k].astype(np.uint8) != want[k]))
            if diff:
                fail(f"segment {numbers[k]}: {diff} fractions differ")
    print(f"OK {seg.NumberOfFrames} frames")


def items(node):
    for item in getattr(node, "ContentSequence", []):
        yield item
        yield from items(item)


def meaning(item):
    return item.ConceptNameCodeSequence[0].CodeMeaning


def check_sr(path, expected):
    sr = pydicom.dcmread(path)
    # highdicom parses the TID 1500 tree (raises on a malformed one).
    hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = [i for i in items(sr) if i.ValueType == "CONTAINER" and meaning(i) == "Measurement Group"]
    got = {}
    for g in groups:
        name = next(i.TextValue for i in g.ContentSequence if meaning(i) == "Tracking Identifier")
        nums = [i for i in g.ContentSequence if i.ValueType == "NUM"]
        if len(nums) != 1:
            fail(f"{name}: {len(nums)} measurements")
        value = nums[0].MeasuredValueSequence[0]
        unit = value.MeasurementUnitsCodeSequence[0]
        got[name] = (meaning(nums[0]), float(value.NumericValue), unit.CodeValue)
        params = [i.TextValue for i in items(nums[0]) if meaning(i) == "Algorithm Parameters"]
        if params != ["sha256=" + expected["sha256"]]:
            fail(f"{name}: algorithm parameters {params}")
    want = {k: tuple(v) for k, v in expected["measurements"].items()}
    for name, (concept, value, unit) in want.items():
        if name not in got:
            fail(f"{name} missing; got {sorted(got)}")
        c, v, u = got[name]
        if (c, u) != (concept, unit) or abs(v - value) > 1e-9 * max(1.0, abs(value)):
            fail(f"{name}: got {got[name]}, want {(concept, value, unit)}")
    if len(got) != len(want):
        fail(f"{len(got)} groups, want {len(want)}")
    refs = [
        s.SeriesInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    ]
    if sorted(refs) != sorted(expected["evidence_series"]):
        fail(f"evidence {refs}")
    print(f"OK {len(got)} measurement groups")


if __name__ == "__main__":
    kind, path, expected = sys.argv[1:4]
    with open(expected) as f:
        expected = json.load(f)
    {"seg": check_seg, "sr": check_sr}[kind](path, expected)
