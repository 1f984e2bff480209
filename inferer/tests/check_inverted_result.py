#!/usr/bin/env python3
"""Checks a result of the inferer stage against the SciPy reference of
`invert_reference.py`; run by tests/invert.rs.

    check_inverted_result.py DIR

DIR/scores.f32: the model's blended scores [C, Z, Y, X] (float32, C order) on its grid.
DIR/expected.json: {"params": (as invert_reference.py's params.json: shape, grid,
target = the source grid, activation), "invert": "linear" | "nearest", "labels":
labels.nii.gz, "seg": seg.dcm, "kind": "fractional" | "binary", "source_uids": the
source SOP Instance UIDs in slice order, "segments": [[label, segment number], ...]}.

With "linear", labels.nii.gz must be the reference's labels (argmax of the
interpolated probabilities), except where the reference's two best classes tie within
float32 rounding. A fractional SEG must be FRACTIONAL / PROBABILITY with a Maximum
Fractional Value of 255, and highdicom must read each segment back to the reference
probability of its label within 1/255. Prints "OK ..." or the difference, exiting 1.
"""

import json
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from invert_reference import invert  # noqa: E402


def fail(msg):
    print(f"MISMATCH: {msg}")
    sys.exit(1)


def main(folder):
    folder = Path(folder)
    expected = json.loads((folder / "expected.json").read_text())
    params = expected["params"]
    scores = np.fromfile(folder / "scores.f32", dtype="<f4").reshape(params["shape"])
    _, moved, want_labels = invert(params, scores)
    report = []

    # nibabel's (i, j, k) = (column, row, slice) → (slice, row, column).
    labels = np.asarray(nib.load(expected["labels"]).dataobj)
    labels = np.ascontiguousarray(np.transpose(labels, (2, 1, 0)).astype(np.uint8))
    if labels.shape != want_labels.shape:
        fail(f"labels.nii.gz has shape {labels.shape}, the source grid {want_labels.shape}")
    if expected["invert"] == "linear":
        differ = labels != want_labels
        got_p = np.take_along_axis(moved, labels[None].astype(np.int64), 0)[0]
        want_p = np.take_along_axis(moved, want_labels[None].astype(np.int64), 0)[0]
        real = differ & (np.abs(got_p - want_p) >= 1e-5)
        if np.any(real):
            fail(f"{int(real.sum())} labels differ from the reference's argmax")
        if differ.sum() * 1000 > labels.size:
            fail(f"{int(differ.sum())} near ties")
        report.append(f"labels = reference ({int(differ.sum())} near ties)")

    if expected["kind"] == "fractional":
        seg = hd.seg.segread(expected["seg"])
        if (seg.SegmentationType, seg.SegmentationFractionalType) != ("FRACTIONAL", "PROBABILITY"):
            fail(f"{seg.SegmentationType} {seg.get('SegmentationFractionalType')}")
        if int(seg.MaximumFractionalValue) != 255:
            fail(f"Maximum Fractional Value {seg.MaximumFractionalValue}")
        segments = expected["segments"]
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=expected["source_uids"],
            segment_numbers=[n for _, n in segments],
            assert_missing_frames_are_empty=True,
        )
        if not np.issubdtype(pixels.dtype, np.floating):
            fail(f"fractions not rescaled to probabilities: {pixels.dtype}")
        worst = 0.0
        for k, (label, number) in enumerate(segments):
            got = pixels[..., k].astype(np.float64)
            diff = float(np.max(np.abs(got - moved[label])))
            worst = max(worst, diff)
            if diff > 1.0 / 255.0:
                fail(f"segment {number} (label {label}): {diff * 255:.3f}/255 from the reference")
            if np.count_nonzero(got) == 0:
                fail(f"segment {number} (label {label}) is empty")
        report.append(f"{len(segments)} segments within {worst * 255:.3f}/255 of the reference")
    print("OK " + "; ".join(report))


if __name__ == "__main__":
    main(sys.argv[1])
