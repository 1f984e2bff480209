#!/usr/bin/env python3
"""SEG and SR writing: a 512x512x300 CT series (radflow's phantom) and a 4-label map on
its grid (four ellipsoids), written as a DICOM Segmentation (binary) by

- radflow:   results/examples/write_results.rs (radflow-results' write_seg and
             write_sr, the code the inferer runs), release build
- highdicom: hd.seg.Segmentation from the same label map (read back from the raw file
             radflow wrote) and the same source headers, then save_as

Each writer runs as its own process, interleaved round by round, with a warm page
cache. Time is the writing step alone (headers and label map already in memory), as
each process measures it; memory is what writing adds to the resident set on top of
its inputs (the peak is reset through /proc/self/clear_refs once the inputs are in
memory). radflow's SEG is then read back with highdicom and compared voxel for voxel
with the label map, and both SEGs are checked with dciodvfy.

Usage: python3 bench/results_dicom.py [--example PATH] [--radflow PATH] [--runs 3]
                                       [--keep DIR]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SLICES, SIZE = 300, 512


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def highdicom_write(series_dir, inputs, out):
    """The reference writer, run in its own process (see main)."""
    import highdicom as hd
    import numpy as np
    import pydicom
    from pydicom.sr.codedict import codes

    uids = open(os.path.join(inputs, "slice_uids.txt")).read().split("\n")
    by_uid = {}
    for name in os.listdir(series_dir):
        if name.endswith(".dcm"):
            ds = pydicom.dcmread(os.path.join(series_dir, name))
            by_uid[ds.SOPInstanceUID] = ds
    sources = [by_uid[u] for u in uids]
    labels = np.fromfile(os.path.join(inputs, "labels.u8"), dtype=np.uint8).reshape(
        len(uids), sources[0].Rows, sources[0].Columns
    )
    algorithm = hd.AlgorithmIdentificationSequence(
        name="bench-organs", version="1.0.0", family=codes.cid7162.ArtificialIntelligence,
    )
    anatomy = hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure")
    organs = [
        (1, "liver", "10200004", "Liver"),
        (2, "spleen", "78961009", "Spleen"),
        (3, "left_kidney", "64033007", "Kidney"),
        (4, "vertebra", "51282000", "Spine"),
    ]
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=name,
            segmented_property_category=anatomy,
            segmented_property_type=hd.sr.CodedConcept(value, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for n, name, value, meaning in organs
    ]
    before = status_kib("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t = time.perf_counter()
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="radflow-bench",
        manufacturer_model_name="bench-organs",
        software_versions="1.0.0",
        device_serial_number="1",
    )
    seg.save_as(os.path.join(out, "seg.dcm"))
    seconds = time.perf_counter() - t
    peak = status_kib("VmHWM:")
    print(json.dumps({
        "seg_s": seconds,
        "frames": int(seg.NumberOfFrames),
        "rss_before_kib": before,
        "peak_kib": peak,
        "write_extra_kib": max(0, peak - before),
        "seg_bytes": os.path.getsize(os.path.join(out, "seg.dcm")),
    }))


def check_readback(seg_path, inputs):
    """radflow's SEG read back by highdicom equals the label map."""
    import highdicom as hd
    import numpy as np

    uids = open(os.path.join(inputs, "slice_uids.txt")).read().split("\n")
    seg = hd.seg.segread(seg_path)
    want = np.fromfile(os.path.join(inputs, "labels.u8"), dtype=np.uint8)
    want = want.reshape(len(uids), seg.Rows, seg.Columns)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2, 3, 4],
        assert_missing_frames_are_empty=True,
    )
    got = np.zeros(want.shape, dtype=np.uint8)
    for k in range(4):
        got[pixels[..., k] > 0] = k + 1
    differ = int((got != want).sum())
    return differ


def run_json(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dciodvfy_errors(path):
    out = subprocess.run(["dciodvfy", path], capture_output=True, text=True)
    return [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")]


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--highdicom":
        highdicom_write(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser()
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    ap.add_argument("--example", default=os.path.join(target, "release/examples/write_results"))
    ap.add_argument("--radflow", default=os.path.join(target, "release/radflow"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", help="folder for the series and outputs (kept)")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="radflow-bench-seg-")
    os.makedirs(work, exist_ok=True)
    series = os.path.join(work, "ct")
    if not os.path.isdir(series):
        subprocess.run(
            [args.radflow, "synth", "--out", series, "--slices", str(SLICES), "--size",
             str(SIZE), "--spacing", "1.0", "--seed", "4"],
            check=True, stdout=subprocess.DEVNULL,
        )
        os.remove(os.path.join(series, "truth.json"))
    for name in os.listdir(series):
        with open(os.path.join(series, name), "rb") as f:
            f.read()

    out = {"radflow": os.path.join(work, "radflow"), "highdicom": os.path.join(work, "highdicom")}
    for d in out.values():
        os.makedirs(d, exist_ok=True)
    runs = {"radflow": [], "highdicom": []}
    for _ in range(args.runs):
        runs["radflow"].append(run_json([args.example, series, out["radflow"]]))
        runs["highdicom"].append(
            run_json([sys.executable, __file__, "--highdicom", series, out["radflow"],
                      out["highdicom"]])
        )
    differ = check_readback(os.path.join(out["radflow"], "seg.dcm"), out["radflow"])
    errors = {
        "radflow SEG": dciodvfy_errors(os.path.join(out["radflow"], "seg.dcm")),
        "radflow SR": dciodvfy_errors(os.path.join(out["radflow"], "sr.dcm")),
        "highdicom SEG": dciodvfy_errors(os.path.join(out["highdicom"], "seg.dcm")),
    }
    label_map_mib = SLICES * SIZE * SIZE / 2**20

    def med(tool, key):
        return statistics.median(r[key] for r in runs[tool])

    ref = med("highdicom", "seg_s")
    print(f"CPU: {os.cpu_count()} cores; {args.runs} runs per writer (median); "
          f"label map {SLICES}x{SIZE}x{SIZE} u8 = {label_map_mib:.0f} MiB\n")
    print("| writer | SEG s | speed | frames | SEG MB | extra memory MiB | runs (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for tool in ("radflow", "highdicom"):
        wall = med(tool, "seg_s")
        each = " ".join(f"{r['seg_s']:.3f}" for r in runs[tool])
        first = runs[tool][0]
        print(f"| {tool} | {wall:.3f} | {ref / wall:.1f}x | {first['frames']} | "
              f"{first['seg_bytes'] / 1e6:.1f} | "
              f"{med(tool, 'write_extra_kib') / 1024:.1f} | {each} |")
    print(f"\nradflow SR: {med('radflow', 'sr_s') * 1000:.1f} ms; "
          f"source headers read in {med('radflow', 'headers_s'):.3f} s")
    print(f"radflow SEG read back by highdicom: {differ} voxels differ from the label map")
    for what, errs in errors.items():
        print(f"dciodvfy {what}: {len(errs)} errors" + ("".join(f"\n  {e}" for e in errs)))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
